"""RequestMetrics: counts every HTTP request by route template and status code.
RequestTracing (only when tracing is on): one SERVER span per HTTP request.
AccessLog: one `cria.access` line per HTTP request, and its `x-request-id`.

Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, streaming bodies pass
through untouched, and context variables propagate.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cria.telemetry.logs import (
    ACCESS_ATTR,
    ACCESS_LOGGER,
    AccessRecord,
    access_text,
    current_access,
)
from cria.telemetry.metrics import Metrics
from cria.telemetry.tracing import Tracing

UNMATCHED = "unmatched"


class RequestMetrics:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes becomes a 500 outside this middleware

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.record_request(route_of(scope) or UNMATCHED, status)


def route_of(scope: Scope) -> str | None:
    """The template of the route the router matched (/v1/models/{model_id:path}), never the
    raw path: it keeps metric series and span names bounded."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None


class RequestTracing:
    """The SERVER span of each HTTP request (joined to an incoming `traceparent`). It is the
    current OTel context while the app runs, so the routes' spans become its children."""

    def __init__(self, app: ASGIApp, *, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        span = self.tracing.start_server_span(scope["method"], scope["path"], scope["headers"])
        try:
            await self.app(scope, receive, send_status)
        finally:
            span.end(route=route_of(scope), status=status)


REQUEST_ID_HEADER = b"x-request-id"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
access_log = logging.getLogger(ACCESS_LOGGER)


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's `x-request-id` if it is short and plain (letters, digits, `._:@/+=-`),
    else a new one of 12 hex characters."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _SANE_REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex[:12]


class AccessLog:
    """One access line per HTTP request once its response is over: request id (also sent back
    as `x-request-id`), method, route template, status, prompt and completion tokens and TTFT
    (from the `AccessRecord` the generation routes fill through `current_access`), total time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 500
        record = AccessRecord()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = current_access.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_access.reset(token)
            if access_log.isEnabledFor(logging.INFO):
                fields = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route_of(scope) or scope["path"],
                    "status": status,
                    "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "ttft_ms": record.ttft_ms,
                    "total_ms": round((time.perf_counter() - start) * 1000.0, 1),
                }
                access_log.info(access_text(fields), extra={ACCESS_ATTR: fields})
