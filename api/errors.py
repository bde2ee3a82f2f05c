"""The error envelope of API.md: {"error": {"message", "type", "param", "code"}} for every error."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.responses import JSONResponse

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # FastAPI < 0.165 unfolds included routers into app.routes itself
    def iter_route_contexts(routes):
        return iter(routes)

log = logging.getLogger(__name__)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


def not_found(what: str, object_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No {what} found with id '{object_id}'.", param=param, code="not_found")


def envelope(status: int, message: str, type: str = "invalid_request_error",
             param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def param_from_loc(loc) -> str | None:
    """('body', 'method', 'supervised', 'hyperparameters', 'n_epochs', 'constrained-int') ->
    'method.supervised.hyperparameters.n_epochs': drop the location kind and union-member tags."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "form") else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and _IDENT.match(item) and item not in ("int", "float", "str"):
            parts.append(item)
        else:
            break
    text = ".".join(parts).replace(".[", "[")
    return text or None


def _unsupported_media_type(req: Request, errors) -> str | None:
    """The media type the route reads its body as, when the body failed because it was sent as
    something else (or, with a body, as nothing): FastAPI only reads JSON from a JSON
    Content-Type, and a form from a form one."""
    body = getattr(req.scope.get("route"), "body_field", None)
    if body is None or not any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors):
        return None
    wanted = body.field_info.media_type
    sent = req.headers.get("content-type")
    if sent is None:  # absent: unsupported only if there was a body to misread
        return wanted if any(e.get("type") != "missing" for e in errors) else None
    media = sent.partition(";")[0].strip().lower()
    if wanted == "application/json":
        kind, _, sub = media.partition("/")
        json_like = kind == "application" and (sub == "json" or sub.endswith("+json"))
        return None if json_like else wanted
    return None if media == wanted else wanted


def _validation_handler(req: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    wanted = _unsupported_media_type(req, errors)
    if wanted is not None:
        return envelope(415, f"Send the request body as {wanted} (Content-Type: {wanted}).",
                        param="Content-Type", code="unsupported_media_type")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return envelope(400, "The request body is not valid JSON.", code="invalid_json")
    param = param_from_loc(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown parameter"
    elif first.get("type") == "missing":
        msg = "missing required parameter"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    where = f"'{param}'" if param else "request body"
    return envelope(400, f"Invalid {where}: {msg}{more}.", param=param, code="invalid_value")


def allowed_methods(req: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own 405 names only the methods
    of the first route whose path matched, while FastAPI makes one route per method."""
    methods: set[str] = set()
    for route in iter_route_contexts(req.app.routes):
        match, _ = route.matches(req.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _http_handler(req: Request, exc: StarletteHTTPException) -> JSONResponse:
    # The client's mistake (a malformed multipart form, say, which Starlette answers 400) is an
    # invalid request, as in OpenAI's envelope; only a 5xx is ours.
    kind = ("authentication_error" if exc.status_code == 401 else "rate_limit_error"
            if exc.status_code == 429 else "invalid_request_error"
            if 400 <= exc.status_code < 500 else "api_error")
    headers = dict(getattr(exc, "headers", None) or {})
    message = str(exc.detail)
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(req))
        message = f"{req.method} is not allowed here; the Allow header lists what is."
    return envelope(exc.status_code, message, kind, headers=headers or None)


def _api_handler(_req: Request, exc: APIError) -> JSONResponse:
    return envelope(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _unexpected_handler(req: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", req.method, req.url.path)
    return envelope(500, "The server failed to handle the request.", "api_error",
                    code="internal_error")


def _database_down_handler(req: Request, exc: Exception) -> JSONResponse:
    """The database is unreachable (restarting, failing over): a 503 the client may retry, not a
    500 that looks like a bug. The pool replaces dead connections on the next checkout."""
    log.warning("database unavailable on %s %s: %s", req.method, req.url.path,
                str(exc).splitlines()[0][:200])
    return envelope(503, "The service's database is unavailable; retry shortly.", "api_error",
                    code="database_unavailable", headers={"Retry-After": "2"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(OperationalError, _database_down_handler)
    app.add_exception_handler(InterfaceError, _database_down_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
