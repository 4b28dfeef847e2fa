"""One exception hierarchy for everything a client can be told; `api/errors.py` maps it to HTTP."""

from __future__ import annotations


class CriaError(Exception):
    """Base of every error that reaches a client. Subclasses fix status, type and code."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After: worth retrying then

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(CriaError):
    status = 400
    type = "invalid_request_error"


class ContextOverflow(InvalidRequest):
    code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class NotFound(CriaError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(CriaError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Overloaded(CriaError):
    """The waiting queue is full. The client should retry after `retry_after` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "server_overloaded"
    retry_after = 1


class EngineUnavailable(CriaError):
    """The engine is still loading the model, or it died."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"


class EngineLoading(EngineUnavailable):
    """The engine is loading the model (at start, or again after its process died): retrying
    in a moment will work."""

    retry_after = 1


class EngineFailure(CriaError):
    """The engine could not finish one request (the others go on)."""

    status = 500
    type = "server_error"
    code = "engine_error"


class StartupError(Exception):
    """A bad option or model: `cria` prints the message on one line and exits with code 2."""
