"""Tracing without a collector: span shapes from Timings, and export failures kept quiet."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cria.engine.types import FinishReason, Timings, Usage
from cria.telemetry.tracing import Tracing, _QuietExporter


def test_no_endpoint_no_tracing() -> None:
    assert Tracing.create(None) is None


def test_sequence_spans_are_children_of_the_server_span_with_epoch_times() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    server = tracing.start_server_span(
        "POST", "/v1/chat/completions", [(b"traceparent", f"00-{trace_id}-{parent_id}-01".encode())]
    )
    t0 = time.perf_counter()
    tracing.for_request(model="m", max_tokens=8).record_sequence(
        FinishReason.LENGTH,
        Usage(prompt_tokens=5, completion_tokens=8, cached_tokens=2),
        Timings(submitted=t0, admitted=t0 + 0.01, first_token=t0 + 0.03, finished=t0 + 0.1, n_sampled=8),
    )
    server.end(route="/v1/chat/completions", status=200)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"queue", "prefill", "decode", "POST /v1/chat/completions"}
    root = spans["POST /v1/chat/completions"]
    assert root.parent is not None and f"{root.parent.span_id:016x}" == parent_id
    assert f"{root.context.trace_id:032x}" == trace_id
    for name in ("queue", "prefill", "decode"):
        assert spans[name].parent is not None and spans[name].parent.span_id == root.context.span_id
    queue, prefill, decode = spans["queue"], spans["prefill"], spans["decode"]
    assert queue.start_time is not None and decode.end_time is not None
    assert abs(queue.start_time - time.time_ns()) < 5e9  # epoch nanoseconds, not perf_counter
    assert queue.end_time == prefill.start_time and prefill.end_time == decode.start_time
    assert decode.end_time - queue.start_time == pytest.approx(0.1e9, abs=1e4)
    assert dict(prefill.attributes or {})["gen_ai.usage.input_tokens"] == 5
    assert dict(prefill.attributes or {})["cria.prefix_cached_tokens"] == 2
    assert dict(decode.attributes or {})["gen_ai.usage.output_tokens"] == 8
    assert dict(decode.attributes or {})["gen_ai.response.finish_reasons"] == ("length",)
    assert dict(root.attributes or {})["http.response.status_code"] == 200
    provider.shutdown()


class _Broken(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("refused")


def test_an_export_that_raises_is_a_failure_not_an_exception() -> None:
    assert _QuietExporter(_Broken(), "http://x").export([]) is SpanExportResult.FAILURE
