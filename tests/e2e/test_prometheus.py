"""A real Prometheus server scrapes Cria and answers queries on its series.

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`; `.ci/run` installs it);
without it the test is skipped, and test_metrics.py still checks the exposition with
prometheus-client's parser.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL_ID, Server, free_port, stop_process

DEADLINE = 60.0


@pytest.fixture
def prometheus(server: Server, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (apt-get install -y prometheus)")
    target = server.base_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cria\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process(process)


def _query(base: str, promql: str) -> list[float]:
    """The values of an instant query's result vector ([] if Prometheus is not up yet)."""
    try:
        r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.TransportError:
        return []
    if r.status_code != 200:
        return []
    body = r.json()
    assert body["status"] == "success", body
    return [float(item["value"][1]) for item in body["data"]["result"]]


def _wait_for(base: str, promql: str, deadline: float, *, at_least: float = 0.0) -> list[float]:
    """Poll until every series of `promql` is positive and at least `at_least` (a scrape can
    land between two requests, so a counter may need a later scrape to reach its total)."""
    while time.monotonic() < deadline:
        values = _query(base, promql)
        if values and all(v > 0 and v >= at_least for v in values):
            return values
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never answered {promql!r} with a value >= {at_least} (> 0)")


def test_real_prometheus_scrapes_cria(prometheus: str, client: openai.OpenAI) -> None:
    deadline = time.monotonic() + DEADLINE
    _wait_for(prometheus, 'up{job="cria"}', deadline)  # Prometheus is up and has scraped Cria
    for _ in range(3):  # traffic after the first scrape, so the counters rise under its eyes
        client.completions.create(
            model=MODEL_ID, prompt="Prometheus", max_tokens=4, extra_body={"ignore_eos": True}
        )
        time.sleep(0.5)
    assert _wait_for(prometheus, "cria_generated_tokens_total", deadline, at_least=12)[0] >= 12
    _wait_for(prometheus, "rate(cria_generated_tokens_total[1m])", deadline)
    _wait_for(
        prometheus,
        "histogram_quantile(0.5, sum by (le) (rate(cria_time_to_first_token_seconds_bucket[1m])))",
        deadline,
    )
    (info,) = httpx.get(
        prometheus + "/api/v1/query", params={"query": "cria_model_info"}, timeout=5
    ).json()["data"]["result"]
    assert info["metric"]["id"] == MODEL_ID
