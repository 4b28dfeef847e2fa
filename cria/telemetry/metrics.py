"""Every Prometheus instrument of Cria, in one registry per app; recorded through methods.

Nothing else imports prometheus_client. Names follow vLLM's words with a `cria_` prefix, units
in the name and `_total` on counters (prometheus_client appends it: Counter objects are named
without it). These names are a contract for users' dashboards.

Who records what:
- the pure-ASGI middleware (api/middleware.py): `cria_requests_total{route,status}`;
- the error mapping (api/errors.py) and SSE error events: `cria_errors_total{type}`;
- the routes, from each sequence's last Delta (its Usage and engine-taken Timings): tokens,
  successes and the per-request latency histograms; client disconnects: cancellations;
- the engine thread, once per step (StepObserver): step time and sequences per step;
- GET /metrics, at scrape time from engine.stats(): the queue, slot and KV cache gauges, and the
  engine restarts counter.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from cria.engine.types import EngineStats, FinishReason, Timings, Usage

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
)  # fmt: skip
_TOKEN_INTERVAL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
_STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The instruments of one app, in their own CollectorRegistry (two apps can live in one
    process). Thread-safe: prometheus_client locks each instrument."""

    def __init__(
        self,
        *,
        model_id: str,
        architecture: str,
        context_size: int,
        gpu_layers: int,
        llama_cpp_version: str,
        adapter_ids: Sequence[str] = (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._requests = Counter(
            "cria_requests", "HTTP requests by route template and status code.",
            ["route", "status"], registry=reg,
        )  # fmt: skip
        self._success = Counter(
            "cria_request_success",
            "Sequences generated to the end, by finish reason and model (the base model's id "
            "or a LoRA adapter's).",
            ["finish_reason", "model"], registry=reg,
        )  # fmt: skip
        self._model_id = model_id
        for reason in FinishReason:  # every series exists from the start, at 0
            for model in (model_id, *adapter_ids):
                self._success.labels(reason.value, model)
        self._prompt_tokens = Counter(
            "cria_prompt_tokens",
            "Prompt tokens of finished sequences (a request with n choices counts its prompt n times).",
            labelnames=["model"], registry=reg,
        )
        self._generated_tokens = Counter(
            "cria_generated_tokens", "Completion tokens of finished sequences.", labelnames=["model"], registry=reg
        )
        self._prefix_hits = Counter(
            "cria_prefix_cache_hit_tokens",
            "Prompt tokens reused from a slot's KV cache (or the prompt cache) instead of prefilled.",
            labelnames=["model"], registry=reg,
        )
        self._cancelled = Counter(
            "cria_requests_cancelled",
            "Requests whose client went away before the response was complete.",
            registry=reg,
        )
        self._errors = Counter(
            "cria_errors", "Errors sent to clients (JSON or SSE error event), by error type.",
            ["type"], registry=reg,
        )  # fmt: skip
        self._e2e = Histogram(
            "cria_e2e_request_latency_seconds",
            "Per sequence: from submission to the engine until its last token.",
            buckets=_E2E_BUCKETS, labelnames=["model"], registry=reg,
        )  # fmt: skip
        self._ttft = Histogram(
            "cria_time_to_first_token_seconds",
            "Per sequence: from submission to the engine until its first sampled token.",
            buckets=_LATENCY_BUCKETS, labelnames=["model"], registry=reg,
        )  # fmt: skip
        self._itl = Histogram(
            "cria_inter_token_latency_seconds",
            "Per sequence of 2+ tokens: mean time between its sampled tokens "
            "((last - first) / (n - 1)).",
            buckets=_TOKEN_INTERVAL_BUCKETS, labelnames=["model"], registry=reg,
        )  # fmt: skip
        self._queue_time = Histogram(
            "cria_request_queue_time_seconds",
            "Per sequence: time waiting for a slot.",
            buckets=_LATENCY_BUCKETS, labelnames=["model"], registry=reg,
        )  # fmt: skip
        self._prefill_time = Histogram(
            "cria_request_prefill_time_seconds",
            "Per sequence: from getting a slot until its first sampled token (prompt prefill).",
            buckets=_LATENCY_BUCKETS, labelnames=["model"], registry=reg,
        )  # fmt: skip
        for model in (model_id, *adapter_ids):  # every model's series exists from the start
            for per_model in (
                self._prompt_tokens, self._generated_tokens, self._prefix_hits, self._e2e,
                self._ttft, self._itl, self._queue_time, self._prefill_time,
            ):  # fmt: skip
                per_model.labels(model)
        self._step_time = Histogram(
            "cria_decode_step_seconds",
            "Engine steps: plan, one llama_decode for the batch, sampling and hand-off.",
            buckets=_STEP_BUCKETS, registry=reg,
        )  # fmt: skip
        self._batch = Histogram(
            "cria_batch_sequences",
            "Sequences (decoding or prefilling) per engine step.",
            buckets=_BATCH_BUCKETS, registry=reg,
        )  # fmt: skip
        self._running = Gauge("cria_requests_running", "Sequences holding a slot.", registry=reg)
        self._waiting = Gauge(
            "cria_requests_waiting", "Sequences submitted and waiting for a slot.", registry=reg
        )
        self._slots_free = Gauge("cria_slots_free", "Slots not serving a sequence.", registry=reg)
        self._kv_used = Gauge(
            "cria_kv_cache_used_cells",
            "KV cache cells holding tokens, summed over slots (idle slots keep theirs for reuse).",
            registry=reg,
        )
        self._kv_total = Gauge(
            "cria_kv_cache_total_cells", "KV cache cells: slots x context size.", registry=reg
        )
        self._cache_entries = Gauge(
            "cria_prompt_cache_entries",
            "Evicted prompts whose KV state the host-memory prompt cache keeps.",
            registry=reg,
        )
        self._cache_bytes = Gauge(
            "cria_prompt_cache_bytes", "Host memory the prompt cache's entries take.", registry=reg
        )
        self._restarts = Counter(
            "cria_engine_restarts",
            "Times a dead engine process was started again (--engine-process).",
            registry=reg,
        )
        self._n_restarts_counted = 0
        self._model = Info("cria_model", "The served model.", registry=reg)
        self._model.info(
            {
                "id": model_id,
                "architecture": architecture,
                "context_size": str(context_size),
                "gpu_layers": str(gpu_layers),
                "llama_cpp_python_version": llama_cpp_version,
            }
        )

    # ---- HTTP layer ----

    def record_request(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def record_error(self, error_type: str) -> None:
        self._errors.labels(error_type).inc()

    def record_cancelled(self) -> None:
        self._cancelled.inc()

    def record_finished(
        self, reason: FinishReason, usage: Usage, timings: Timings, *, adapter: str | None = None
    ) -> None:
        """One sequence finished: its tokens, its finish reason and its latencies, labelled with
        the model that generated it (a LoRA adapter's id, or the base model's)."""
        model = adapter or self._model_id
        self._success.labels(reason.value, model).inc()
        self._prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self._generated_tokens.labels(model).inc(usage.completion_tokens)
        if usage.cached_tokens:
            self._prefix_hits.labels(model).inc(usage.cached_tokens)
        self._e2e.labels(model).observe(timings.e2e_s)
        self._ttft.labels(model).observe(timings.ttft_s)
        self._queue_time.labels(model).observe(timings.queue_s)
        self._prefill_time.labels(model).observe(timings.prefill_s)
        inter_token = timings.inter_token_s
        if inter_token is not None:
            self._itl.labels(model).observe(inter_token)

    # ---- engine thread (StepObserver) ----

    def observe_step(self, seconds: float, n_seqs: int) -> None:
        self._step_time.observe(seconds)
        self._batch.observe(n_seqs)

    # ---- scrape time ----

    def set_engine(self, stats: EngineStats) -> None:
        self._running.set(stats.n_running)
        self._waiting.set(stats.n_waiting)
        self._slots_free.set(stats.n_slots_free)
        self._kv_used.set(stats.n_kv_used_cells)
        self._kv_total.set(stats.n_kv_total_cells)
        self._cache_entries.set(stats.n_prompt_cache_entries)
        self._cache_bytes.set(stats.prompt_cache_bytes)

    def set_engine_restarts(self, n_restarts: int) -> None:
        """A counter kept up at scrape time, whatever the engine's state."""
        if n_restarts > self._n_restarts_counted:
            self._restarts.inc(n_restarts - self._n_restarts_counted)
            self._n_restarts_counted = n_restarts

    def render(self) -> bytes:
        """The registry in Prometheus text format (content type: CONTENT_TYPE)."""
        return generate_latest(self.registry)
