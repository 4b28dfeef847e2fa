"""The one mapping from errors to OpenAI-shaped JSON: {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cria.errors import (
    CriaError,
    EngineFailure,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)

log = logging.getLogger(__name__)


def error_body(error: CriaError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(error: CriaError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


def _param_of(loc: tuple[int | str, ...]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union tags are dropped."""
    if not loc:
        return None
    out = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in {"str", "int", "float", "bool", "list", "dict"}:
            out += f".{part}"
    return out


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    if not errors:
        return InvalidRequest("invalid request body")
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidRequest(f"malformed JSON in the request body: {first['msg']}", code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequest("the request body must be a JSON object", code="invalid_json")
    param = _param_of(tuple(first["loc"]))
    # Union fields report one error per member: name the field once, with each reason.
    same = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
    reasons = "; ".join(dict.fromkeys(str(e["msg"]) for e in same[:4]))
    if first["type"] == "missing":
        return InvalidRequest(f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    return InvalidRequest(f"invalid value for '{param}': {reasons}", param=param, code="invalid_value")


def _respond(request: Request, error: CriaError) -> JSONResponse:
    """Every error response passes here: it is counted by type."""
    request.app.state.cria.metrics.record_error(error.type)
    return error_response(error)


async def _cria_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CriaError)
    return _respond(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err: CriaError = NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}")
    else:
        err = CriaError(str(exc.detail))
        err.status = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _respond(request, err)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return _respond(request, EngineFailure("internal server error"))


def install_error_handlers(app: Any) -> None:
    """Register every handler once; handlers are found by class hierarchy."""
    app.add_exception_handler(CriaError, _cria_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def dumps(body: Any) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
