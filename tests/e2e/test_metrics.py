"""GET /metrics against the real server: every contract name with its type, and counters,
histograms and gauges that move by what the traffic did. The session server is shared, so
every assertion is on the difference between a scrape before and one after."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL_ID, Server

Labels = tuple[tuple[str, str], ...]
Scrape = dict[str, dict[tuple[str, Labels], float]]  # family -> (sample name, labels) -> value

CONTRACT = {
    # family name as the parser reports it (counters without _total) -> type
    "cria_requests": "counter",
    "cria_request_success": "counter",
    "cria_prompt_tokens": "counter",
    "cria_generated_tokens": "counter",
    "cria_prefix_cache_hit_tokens": "counter",
    "cria_requests_cancelled": "counter",
    "cria_errors": "counter",
    "cria_e2e_request_latency_seconds": "histogram",
    "cria_time_to_first_token_seconds": "histogram",
    "cria_inter_token_latency_seconds": "histogram",
    "cria_request_queue_time_seconds": "histogram",
    "cria_request_prefill_time_seconds": "histogram",
    "cria_decode_step_seconds": "histogram",
    "cria_batch_sequences": "histogram",
    "cria_requests_running": "gauge",
    "cria_requests_waiting": "gauge",
    "cria_slots_free": "gauge",
    "cria_kv_cache_used_cells": "gauge",
    "cria_kv_cache_total_cells": "gauge",
    "cria_prompt_cache_entries": "gauge",
    "cria_prompt_cache_bytes": "gauge",
    "cria_model_info": "gauge",  # an Info metric is exposed as a gauge of value 1
}
REQUEST_HISTOGRAMS = [
    "cria_e2e_request_latency_seconds",
    "cria_time_to_first_token_seconds",
    "cria_inter_token_latency_seconds",
    "cria_request_queue_time_seconds",
    "cria_request_prefill_time_seconds",
]


def scrape_text(server: Server) -> str:
    r = httpx.get(server.base_url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def scrape(server: Server) -> tuple[Scrape, dict[str, str]]:
    """Samples by family, and each family's type."""
    samples: Scrape = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(scrape_text(server)):
        types[family.name] = family.type
        values = samples.setdefault(family.name, {})
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Scrape, family: str, sample: str | None = None, **labels: str) -> float:
    """A sample's value, summed over the series whose labels include `labels` (0 if none
    exists yet): `model` is left out where every model counts."""
    name, want = sample or family, set(labels.items())
    return sum(
        v for (n, got), v in samples.get(family, {}).items() if n == name and want <= set(got)
    )


def eventually(server: Server, check: Callable[[Scrape], bool], timeout: float = 10.0) -> Scrape:
    """Scrape until `check` holds (the middleware counts a request just after its last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        samples, _types = scrape(server)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never satisfied the check within {timeout}s")
        time.sleep(0.05)


def test_every_contract_name_has_its_type(server: Server) -> None:
    samples, types = scrape(server)
    for name, kind in CONTRACT.items():
        assert types.get(name) == kind, (name, types.get(name))
    text = scrape_text(server)
    assert ":" not in "".join(line.split("{")[0] for line in text.splitlines() if line.startswith("cria"))
    (labels,) = [dict(k[1]) for k in samples["cria_model_info"]]
    assert labels["id"] == MODEL_ID and labels["architecture"] == "llama"
    assert int(labels["context_size"]) > 0 and labels["gpu_layers"] == "0"
    assert labels["llama_cpp_python_version"]


def test_generation_counts_tokens_successes_and_latencies(server: Server, client: openai.OpenAI) -> None:
    server.wait_idle()
    before, _ = scrape(server)
    prompt = "Metrics test: the quick brown fox jumps over the lazy dog, again and again and again"
    first = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    again = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    chat = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=200,
        temperature=0,
    )
    usages = [first.usage, again.usage, chat.usage]
    assert all(u is not None for u in usages)
    n_prompt = sum(u.prompt_tokens for u in usages if u is not None)
    n_generated = sum(u.completion_tokens for u in usages if u is not None)
    n_cached = sum(
        u.prompt_tokens_details.cached_tokens or 0
        for u in usages
        if u is not None and u.prompt_tokens_details is not None
    )
    assert n_cached > 0  # the repeated prompt came from the slot's cache
    assert chat.choices[0].finish_reason == "stop"

    after = eventually(
        server,
        lambda s: value(s, "cria_requests", "cria_requests_total", route="/v1/chat/completions", status="200")
        >= value(before, "cria_requests", "cria_requests_total", route="/v1/chat/completions", status="200") + 1,
    )

    def delta(family: str, sample: str | None = None, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert delta("cria_prompt_tokens", "cria_prompt_tokens_total") == n_prompt
    assert delta("cria_generated_tokens", "cria_generated_tokens_total") == n_generated
    assert delta("cria_prefix_cache_hit_tokens", "cria_prefix_cache_hit_tokens_total") == n_cached
    assert delta("cria_request_success", "cria_request_success_total", finish_reason="length") == 2
    assert delta("cria_request_success", "cria_request_success_total", finish_reason="stop") == 1
    assert delta("cria_requests", "cria_requests_total", route="/v1/completions", status="200") == 2
    # Inter-token latency needs two sampled tokens: the chat's end-of-generation token counts.
    n_with_interval = 2 + (chat.usage is not None and chat.usage.completion_tokens >= 1)
    for name in REQUEST_HISTOGRAMS:
        n_expected = n_with_interval if name == "cria_inter_token_latency_seconds" else 3
        assert delta(name, name + "_count") == n_expected, name
        assert delta(name, name + "_sum") >= 0, name
    assert delta("cria_time_to_first_token_seconds", "cria_time_to_first_token_seconds_sum") > 0
    steps = delta("cria_decode_step_seconds", "cria_decode_step_seconds_count")
    assert steps >= 5  # at least one step per token of the first request
    assert delta("cria_batch_sequences", "cria_batch_sequences_count") == steps
    assert delta("cria_batch_sequences", "cria_batch_sequences_sum") >= steps


def test_errors_are_counted_by_route_template_and_type(server: Server, http: httpx.Client) -> None:
    before, _ = scrape(server)
    assert http.get("/no/such/route").status_code == 404
    assert http.get("/v1/models/no-such-model").status_code == 404
    bad = http.post("/v1/completions", json={"model": MODEL_ID})  # no prompt
    assert bad.status_code == 400

    after = eventually(
        server,
        lambda s: value(s, "cria_errors", "cria_errors_total", type="invalid_request_error")
        >= value(before, "cria_errors", "cria_errors_total", type="invalid_request_error") + 3,
    )

    def delta(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert delta("cria_requests", "cria_requests_total", route="unmatched", status="404") == 1
    assert delta("cria_requests", "cria_requests_total", route="/v1/models/{model_id:path}", status="404") == 1
    assert delta("cria_requests", "cria_requests_total", route="/v1/completions", status="400") == 1
    assert delta("cria_errors", "cria_errors_total", type="invalid_request_error") == 3
    # The raw path never becomes a label.
    assert not any("no-such-model" in dict(k[1]).get("route", "") for k in after["cria_requests"])


def test_client_disconnect_counts_a_cancellation(server: Server) -> None:
    server.wait_idle()
    before, _ = scrape(server)
    body = {"model": MODEL_ID, "prompt": "Write forever:", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    deadline = time.monotonic() + 30
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3 or time.monotonic() > deadline:
                break  # leaving the block closes the connection mid-stream
    assert seen >= 3
    key = ("cria_requests_cancelled", "cria_requests_cancelled_total")
    after = eventually(server, lambda s: value(s, *key) >= value(before, *key) + 1)
    assert value(after, *key) == value(before, *key) + 1
    server.wait_idle(timeout=10)


def test_gauges_when_idle(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2)
    stats = server.wait_idle()
    samples, _ = scrape(server)
    (labels,) = [dict(k[1]) for k in samples["cria_model_info"]]
    n_slots = stats["n_slots"]
    assert value(samples, "cria_requests_running") == 0
    assert value(samples, "cria_requests_waiting") == 0
    assert value(samples, "cria_slots_free") == n_slots == 8
    total = value(samples, "cria_kv_cache_total_cells")
    assert total == n_slots * int(labels["context_size"])
    assert 0 < value(samples, "cria_kv_cache_used_cells") <= total  # idle slots keep their cache
