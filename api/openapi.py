"""The OpenAPI document, completed so that it says what the API answers (client generators and
Schemathesis read it; tests/api/test_schemathesis.py holds it to that).

FastAPI writes, per operation, its success response and a 422 in its own validation shape. This
API answers validation errors with 400, every error in one envelope (API.md), authenticates with a
bearer key, limits rates, and takes an Idempotency-Key on POSTs. `install(app)` makes
`app.openapi()` add to FastAPI's document what each route's parameters and dependencies make
possible, so a route added later is described without anyone remembering to:

    400  every operation (validation, checks in the route; any body nested too deep)
    401  it needs the caller's key (depends on get_tenant)
    404  it names an object in its path (another tenant's objects are 404 too)
    413  every operation (any body over max_json_body_bytes, or over the upload limit)
    415  it takes a body (sent as another media type than the one it reads)
    422  it takes an Idempotency-Key (the key was used with another request)
    429  it needs the caller's key (rate limit, job and storage quotas; Retry-After)
    500  every operation
    503  every operation (its database is unreachable: restarting, failing over; Retry-After)

plus what a route declares in `responses=` (409 on cancel, ...). Every error
response has the envelope schema unless the route gave it another one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.deps import get_tenant
from api.errors import iter_route_contexts
from api.idempotency import MAX_KEY_LENGTH, idempotency
from api.models_registry import known_model_ids

ERROR = "Error"
ERROR_SCHEMA = {
    "type": "object",
    "title": ERROR,
    "description": "Every error, whatever its status: API.md's envelope.",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string", "description": "What went wrong and what to do."},
            "type": {"type": "string", "description": "invalid_request_error, "
                     "authentication_error, rate_limit_error or api_error."},
            "param": {"type": ["string", "null"], "description": "The parameter at fault."},
            "code": {"type": ["string", "null"], "description": "A stable machine-readable "
                     "code, e.g. invalid_value, not_found, rate_limit_exceeded."},
        },
    }},
}
DESCRIPTIONS = {
    400: "Invalid request: a parameter or the body fails validation, or names something "
         "unusable (the envelope's `param` says which)",
    401: "Missing, wrong or revoked API key",
    404: "No such object for this tenant",
    409: "Conflict with the object's current state",
    413: "Request body too large",
    415: "Request body sent as an unsupported media type",
    422: "Idempotency-Key already used with a different request",
    429: "Rate limit (rate_limit_exceeded) or quota (quota_running_jobs, quota_storage_bytes, "
         "quota_webhook_endpoints) exceeded",
    500: "Internal error",
    503: "A service this route needs is unreachable",
}
BEARER = "bearerAuth"
RETRY_AFTER = {"description": "Seconds to wait before retrying.",
               "schema": {"type": "integer", "minimum": 0}}
# What api.idempotency accepts, once HTTP has stripped the value's outer spaces and tabs: 1 to
# MAX_KEY_LENGTH printable characters (str.isprintable) of ISO-8859-1, the charset of HTTP headers.
_KEY_EDGE = r"[!-~\xA1-\xAC\xAE-\xFF]"
_KEY_INNER = r"[ -~\xA1-\xAC\xAE-\xFF]"
IDEMPOTENCY_KEY_PATTERN = rf"^{_KEY_EDGE}(?:{_KEY_INNER}{{0,{MAX_KEY_LENGTH - 2}}}{_KEY_EDGE})?$"
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Replays the first answer to a repeat of this request within the TTL; the same "
                   "key with a different request is 422.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH,
               "pattern": IDEMPOTENCY_KEY_PATTERN},
}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and so /openapi.json and /docs) serve the completed document."""
    fastapi_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            try:
                complete(app, fastapi_document())
            except BaseException:
                app.openapi_schema = None  # not half a document
                raise
        return app.openapi_schema

    app.openapi = openapi


def complete(app: FastAPI, doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas[ERROR] = ERROR_SCHEMA
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>` (`driftsafe tenants create`)."}
    for route in iter_route_contexts(app.routes):  # included routers unfolded
        if not isinstance(getattr(route, "original_route", route), APIRoute) \
                or not route.include_in_schema:
            continue
        for method in route.methods:
            operation = doc["paths"].get(route.path_format, {}).get(method.lower())
            if operation is not None:
                _complete_operation(route, operation)
    # FastAPI's own 422 shape: no route answers it any more.
    for name in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{name}"' not in _text(doc):
            schemas.pop(name, None)
    _known_models(app, schemas)
    _closed_forms(doc, schemas)
    _links(doc)
    return doc


def _closed_forms(doc: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A form body takes its declared fields only (the route answers 400 to any other), so its
    schema says additionalProperties: false."""
    for operations in doc["paths"].values():
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            ref = (form or {}).get("schema", {}).get("$ref", "")
            if ref.startswith("#/components/schemas/"):
                schemas[ref.rsplit("/", 1)[1]]["additionalProperties"] = False


def _complete_operation(route, operation: dict[str, Any]) -> None:
    calls = {d.call for d in _walk(route.dependant)}
    params = {kind: [p for d in _walk(route.dependant) for p in getattr(d, kind)]
              for kind in ("path_params", "query_params", "header_params")}
    authenticated, idempotent = get_tenant in calls, idempotency in calls
    has_body = route.body_field is not None
    responses = operation.setdefault("responses", {})
    if _is_fastapi_validation_error(responses.get("422")):
        del responses["422"]

    # Every route: the body limiter (api.app.BodyLimit) reads any request's body, so whatever
    # the route does with it, one too large is 413 and one nested too deep is 400.
    statuses = {400, 413, 500, 503}
    if authenticated:
        statuses |= {401, 429}
        operation["security"] = [{BEARER: []}]
    if params["path_params"]:
        statuses.add(404)
    if has_body:
        statuses.add(415)
    extra = [p for d in _walk(route.dependant) for p in getattr(d.call, "openapi_parameters", ())]
    if idempotent:
        statuses.add(422)
        extra.append(IDEMPOTENCY_KEY)
    declared = operation.get("parameters", [])
    for parameter in extra:  # read from the request by a dependency, unseen by FastAPI
        if not any(p.get("name") == parameter["name"] for p in declared):
            operation["parameters"] = declared = [*declared, dict(parameter)]
    statuses |= {int(code) for code in responses if code.isdigit() and int(code) >= 400}

    for status in sorted(statuses):
        response = responses.setdefault(str(status), {})
        if not response.get("description"):
            response["description"] = DESCRIPTIONS.get(status, "Error")
        if not response.get("content"):
            response["content"] = {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{ERROR}"}}}
        if status == 429:
            response.setdefault("headers", {})["Retry-After"] = RETRY_AFTER
    _only_declared_media(route, responses.get("200"))


def _walk(dependant: Dependant):
    yield dependant
    for sub in dependant.dependencies:
        yield from _walk(sub)


def _is_fastapi_validation_error(response: dict | None) -> bool:
    return response is not None and "HTTPValidationError" in _text(response)


def _only_declared_media(route, ok: dict | None) -> None:
    """A route that declares its own success media types (a zip, a JSONL file) and has no
    response model does not also answer JSON, whatever FastAPI's default response class says."""
    content = (ok or {}).get("content") or {}
    if route.response_model is None and len(content) > 1 and not content.get(
            "application/json", {}).get("schema"):
        content.pop("application/json", None)


def _links(doc: dict[str, Any]) -> None:
    """What a create answers is what its object's own routes take: POST /v1/files links to
    /v1/files/{file_id}/... with file_id = the new object's id (stateful clients and tests
    follow these)."""
    paths = doc["paths"]
    for path, item in paths.items():
        created = item.get("post", {}).get("responses", {}).get("200")
        if created is None or "{" in path:
            continue
        for target, target_item in paths.items():
            match = re.fullmatch(re.escape(path) + r"/\{(\w+)\}(/.*)?", target)
            if match is None:
                continue
            for op in target_item.values():
                if "operationId" in op:
                    created.setdefault("links", {})[op["operationId"]] = {
                        "operationId": op["operationId"],
                        "parameters": {match.group(1): "$response.body#/id"}}


def _known_models(app: FastAPI, schemas: dict[str, Any]) -> None:
    """`model` names a base model this deployment can fine-tune (the jobs route checks it
    against the same list): say which, so that a client can, too."""
    settings = getattr(app.state, "settings", None)
    job_create = schemas.get("JobCreate", {}).get("properties", {})
    if settings is not None and "model" in job_create:
        job_create["model"]["enum"] = known_model_ids(settings)


def _text(value: Any) -> str:
    return json.dumps(value)
