"""The error envelope of API.md: {"error": {"message", "type", "param", "code"}} for every error."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def _validation_handler(_req: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
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


def _http_handler(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
    kinds = {401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error"}
    return envelope(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "api_error"),
                    headers=getattr(exc, "headers", None))


def _api_handler(_req: Request, exc: APIError) -> JSONResponse:
    return envelope(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _unexpected_handler(req: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", req.method, req.url.path)
    return envelope(500, "The server failed to handle the request.", "api_error",
                    code="internal_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
