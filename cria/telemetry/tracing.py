"""OpenTelemetry tracing of one app, exported to Zipkin (v2 JSON over HTTP) in batches.

The only opentelemetry import besides the middleware's types. Each app has its own
TracerProvider (never the global one): `Tracing.create()` returns None when no endpoint is
set, and then nothing is traced (no middleware, no span, no check beyond `is None`).

Who traces what:
- the pure-ASGI middleware (api/middleware.py): one SERVER span per HTTP request (method,
  route template, status code), joined to an incoming W3C `traceparent`;
- the routes, from each sequence's last Delta (api/generate.py, beside the metrics): child
  spans `queue`, `prefill` and `decode`, made after the fact from the engine's Timings.

Export happens on the BatchSpanProcessor's thread, off the request path. An unreachable or
failing collector never raises into it: failures are logged at most once a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from contextvars import Token
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from cria.engine.types import FinishReason, Timings, Usage

log = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 5  # per batch; bounds the flush at shutdown too
LOG_EVERY_S = 60.0

# Attribute names: OTel GenAI semantic conventions where they exist, cria.* otherwise.
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
PREFIX_CACHED_TOKENS = "cria.prefix_cached_tokens"
SLOT = "cria.slot"
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS = "http.response.status_code"
URL_PATH = "url.path"

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")


class _RateLimit(logging.Filter):
    """Lets one record through per `every` seconds (the rest are counted, then reported)."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every = every
        self._next = 0.0
        self._dropped = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._dropped += 1
                return False
            self._next = now + self.every
            if self._dropped:
                record.msg = f"{record.msg} ({self._dropped} similar messages suppressed)"
                self._dropped = 0
            return True


class _QuietExporter(SpanExporter):
    """Wraps the Zipkin exporter: an export that raises (connection refused, timeout) becomes
    a FAILURE and a rate-limited warning instead of a traceback per batch."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self.inner = inner
        self.endpoint = endpoint

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self.inner.export(spans)
        except Exception as exc:
            log.warning("cannot export %d spans to %s: %s", len(spans), self.endpoint, exc)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception:  # pragma: no cover - closing a requests session
            pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_limit_installed = False


def _install_rate_limit() -> None:
    """Export failures are logged here and by the Zipkin exporter (non-2xx answers): at most
    one line a minute from each."""
    global _limit_installed
    if _limit_installed:
        return
    _limit_installed = True
    log.addFilter(_RateLimit())
    logging.getLogger("opentelemetry.exporter.zipkin.json").addFilter(_RateLimit())


class Tracing:
    """The tracer of one app and the provider that exports its spans."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("cria")
        # perf_counter seconds -> epoch nanoseconds, for spans made from engine Timings.
        self._epoch_offset_ns = time.time_ns() - time.perf_counter_ns()

    @classmethod
    def create(cls, endpoint: str | None, *, service_name: str = "cria") -> Tracing | None:
        """None without an endpoint: no provider, no exporter, no spans."""
        if endpoint is None:
            return None
        _install_rate_limit()
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        # Imported here: the exporter pulls in `requests` (~10 MiB), only needed with -z.
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        exporter = ZipkinExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
        provider.add_span_processor(BatchSpanProcessor(_QuietExporter(exporter, endpoint)))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is left and stop the export thread."""
        try:
            self.provider.shutdown()
        except Exception as exc:  # pragma: no cover - never fail a shutdown over traces
            log.warning("tracing shutdown failed: %s", exc)

    def epoch_ns(self, perf_counter_s: float) -> int:
        return self._epoch_offset_ns + int(perf_counter_s * 1e9)

    def start_server_span(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> ServerSpan:
        """The SERVER span of one HTTP request, child of the caller's span when the request
        carries a W3C `traceparent`; it is the current span until `ServerSpan.end()`."""
        carrier = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in _TRACE_HEADERS
        }
        parent = _PROPAGATOR.extract(carrier, context=otel_context.Context())
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={HTTP_METHOD: method, URL_PATH: path},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return ServerSpan(span, token, method)

    def for_request(self, *, model: str, max_tokens: int) -> RequestTrace:
        """What the sequences of the current request need to record their spans: the current
        span (the middleware's server span) as their parent."""
        return RequestTrace(self, otel_context.get_current(), model, max_tokens)


@dataclass(frozen=True, slots=True)
class ServerSpan:
    span: Span
    token: Token[otel_context.Context]
    method: str

    def end(self, *, route: str | None, status: int) -> None:
        otel_context.detach(self.token)
        span = self.span
        if route is not None:
            span.update_name(f"{self.method} {route}")
            span.set_attribute(HTTP_ROUTE, route)
        span.set_attribute(HTTP_STATUS, status)
        if status >= 500:
            span.set_status(StatusCode.ERROR)
        span.end()


@dataclass(frozen=True, slots=True)
class RequestTrace:
    tracing: Tracing
    parent: otel_context.Context
    model: str
    max_tokens: int

    def record_sequence(self, reason: FinishReason, usage: Usage, timings: Timings) -> None:
        """The spans `queue`, `prefill` and `decode` of one finished sequence, after the fact."""
        tracing = self.tracing
        tracer = tracing.tracer
        submitted = tracing.epoch_ns(timings.submitted)
        admitted = max(submitted, tracing.epoch_ns(timings.admitted))
        first = max(admitted, tracing.epoch_ns(timings.first_token))
        finished = max(first, tracing.epoch_ns(timings.finished))
        common: dict[str, AttributeValue] = {
            REQUEST_MODEL: self.model,
            REQUEST_MAX_TOKENS: self.max_tokens,
        }
        if timings.slot is not None:
            common[SLOT] = timings.slot
        spans: tuple[tuple[str, int, int, dict[str, AttributeValue]], ...] = (
            ("queue", submitted, admitted, common),
            (
                "prefill",
                admitted,
                first,
                {**common, INPUT_TOKENS: usage.prompt_tokens, PREFIX_CACHED_TOKENS: usage.cached_tokens},
            ),
            (
                "decode",
                first,
                finished,
                {
                    **common,
                    INPUT_TOKENS: usage.prompt_tokens,
                    OUTPUT_TOKENS: usage.completion_tokens,
                    FINISH_REASONS: (reason.value,),
                },
            ),
        )
        for name, start, end, attributes in spans:
            span = tracer.start_span(
                name,
                context=self.parent,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                start_time=start,
            )
            span.end(end_time=end)

