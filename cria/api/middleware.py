"""RequestMetrics: counts every HTTP request by route template and status code.
RequestTracing (only when tracing is on): one SERVER span per HTTP request.

Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, streaming bodies pass
through untouched, and context variables propagate.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
