"""RequestMetrics: counts every HTTP request by route template and status code.

Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, streaming bodies pass
through untouched, and context variables propagate.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cria.telemetry.metrics import Metrics

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
            # The router writes the matched route into the scope: label by its template
            # (/v1/models/{model_id:path}), never the raw path, to keep the series bounded.
            route = scope.get("route")
            path = getattr(route, "path", None)
            self.metrics.record_request(path if isinstance(path, str) else UNMATCHED, status)
