#!/usr/bin/env python3
"""Cria against its peers on one model: llama.cpp's C++ llama-server and llama-cpp-python's server.

One run does, for each round, for each server in turn (A B C A B C ..., never two at once):
start it, wait until it is healthy, run bench/loadgen.py's load at each concurrency
(N = concurrency x requests-per-stream requests, at least 4) and one prefill run, sample its
resident memory, stop it. After the rounds it runs llama-batched-bench once, as the batching
ceiling of the same llama.cpp (S_TG t/s at each batch size B = min(concurrency, --parallel): a
server decodes at most --parallel streams at once, the rest wait in its queue). It prints
medians over rounds of every figure loadgen reports, per server and concurrency, with the ratio
Cria/peer (also paired within each round, steadier when the machine drifts), and writes
OUT/compare.json (medians and every raw per-round number), OUT/throughput.png and server logs
under OUT/logs/.

    .venv/bin/python bench/compare.py [--rounds 3] [--concurrency 1,4,8,16] \
        [--requests-per-stream 2] [--max-tokens 128] [--endpoint completions] [--out bench/out]

    # the report again from an earlier run's compare.json, with this version's ratios
    .venv/bin/python bench/compare.py --from-json bench/results/compare-cpu-3.json

    # a quick smoke test (a few minutes on 2 cores)
    .venv/bin/python bench/compare.py --rounds 1 --concurrency 1,4 --requests-per-stream 1 \
        --max-tokens 16

Peers (see --help for overriding their locations):
  * llama-server / llama-batched-bench, built from the llama.cpp that llama-cpp-python 0.3.36
    vendors by ../shared/peers/build_llama_server.sh (cached; run if the binaries are missing);
  * llama-cpp-python[server]==0.3.36 in bench/.peers-venv (created if missing).

Bench-only dependencies: bench/requirements.txt (httpx, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import loadgen  # noqa: E402  (bench/loadgen.py, imported so every figure is computed one way)

LCP_VERSION = "0.3.36"
DEFAULT_PEERS_CACHE = Path(os.environ.get("PEERS_CACHE", Path.home() / ".cache" / "cria-peers"))
DEFAULT_LLAMA_DIR = DEFAULT_PEERS_CACHE / f"llama.cpp-from-llama-cpp-python-{LCP_VERSION}"
BUILD_SCRIPT = REPO.parent / "shared" / "peers" / "build_llama_server.sh"
MAIN_PY = REPO / ".venv" / "bin" / "python"

SERVERS = ("cria", "llama-server", "llama-cpp-python")
PEERS = ("llama-server", "llama-cpp-python")
SHORT = {"cria": "cria", "llama-server": "llama-server", "llama-cpp-python": "llama-cpp-py"}

# loadgen's figures, in the order the table shows them; True where higher is better.
LOAD_METRICS: list[tuple[str, str, bool]] = [
    ("ttft_ms_p50", "TTFT p50 (ms)", False),
    ("ttft_ms_p95", "TTFT p95 (ms)", False),
    ("itl_ms_p50", "ITL p50 (ms)", False),
    ("itl_ms_p95", "ITL p95 (ms)", False),
    ("decode_tok_s_p50", "decode tok/s p50", True),
    ("aggregate_output_tok_s", "aggregate out tok/s", True),
    ("requests_per_s", "requests/s", True),
    ("errors", "errors", False),
]
# Also kept (medians) but not ratioed: they say whether a run is comparable at all.
EXTRA_METRICS = [
    "wall_s",
    "completed",
    "requests_not_max_tokens",
    "usage_missing",
    "mean_prompt_tokens",
    "engine_python_share",  # Cria only, from /health's totals around the run
    "engine_python_us_per_seq",
]


def engine_totals(server: Server) -> dict[str, float] | None:
    """Cria's engine totals from /health (steps' time, its Python time in them, sequences
    summed over steps); None for a server without them."""
    try:
        url = f"http://127.0.0.1:{server.port}{server.health_path}"
        engine = httpx.get(url, timeout=10).json().get("engine") or {}
    except (httpx.HTTPError, ValueError):
        return None
    keys = ("step_seconds", "python_seconds", "n_seq_steps")
    return {k: float(engine[k]) for k in keys} if all(k in engine for k in keys) else None


def engine_python(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """The engine's Python time (outside llama_decode and sampling) over one run: its share of
    the step time, and microseconds per running sequence per step."""
    if before is None or after is None:
        return {}
    busy = after["step_seconds"] - before["step_seconds"]
    python = after["python_seconds"] - before["python_seconds"]
    seqs = after["n_seq_steps"] - before["n_seq_steps"]
    if busy <= 0 or seqs <= 0:
        return {}
    return {
        "engine_python_share": round(python / busy, 4),
        "engine_python_us_per_seq": round(1e6 * python / seqs, 1),
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Arguments and environment
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels")
    p.add_argument(
        "--requests-per-stream",
        type=int,
        default=2,
        help="requests per concurrent stream (N = c x this, at least 4)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--out", default=str(BENCH / "out"), help="output folder")
    p.add_argument("--model", default=None, help="GGUF path (default: Cria's bundled model)")
    p.add_argument("--threads", type=int, default=2, help="compute threads for every server")
    p.add_argument("--parallel", type=int, default=8, help="slots (Cria, llama-server)")
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma-separated subset of: " + ", ".join(SERVERS),
    )
    p.add_argument(
        "--llama-bin",
        default=None,
        help=f"folder with llama-server and llama-batched-bench (default: {DEFAULT_LLAMA_DIR}/bin, "
        "built by build_llama_server.sh if missing)",
    )
    p.add_argument(
        "--peers-venv",
        default=str(BENCH / ".peers-venv"),
        help="virtualenv with llama-cpp-python[server] (created if missing)",
    )
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to become healthy")
    p.add_argument(
        "--run-timeout", type=float, default=1800.0, help="seconds one load run may take"
    )
    p.add_argument(
        "--serial-cap",
        type=float,
        default=600.0,
        help="llama-cpp-python serialises requests: skip a run of it whose estimated "
        "duration (from its previous run) is over this many seconds, and stop one at "
        "1.5x this",
    )
    p.add_argument(
        "--no-ban-eog-peer",
        action="store_true",
        help="do not send logit_bias against end-of-generation tokens to "
        "llama-cpp-python (it ignores `ignore_eos`, so it may stop before max_tokens)",
    )
    p.add_argument("--no-batched-bench", action="store_true", help="skip llama-batched-bench")
    p.add_argument(
        "--from-json",
        metavar="COMPARE.json",
        default=None,
        help="run nothing: print the report of an earlier run's compare.json again",
    )
    p.add_argument("--batched-bench-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    try:
        args.concurrency_levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error("--concurrency takes comma-separated integers, e.g. 1,4,8,16")
    if not args.concurrency_levels or min(args.concurrency_levels) < 1:
        p.error("--concurrency levels must be at least 1")
    if args.rounds < 1 or args.requests_per_stream < 1 or args.max_tokens < 1:
        p.error("--rounds, --requests-per-stream and --max-tokens must be at least 1")
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.server_list if s not in SERVERS]
    if bad or not args.server_list:
        p.error(f"unknown server(s) {bad}; choose from {', '.join(SERVERS)}")
    args.server_list = [s for s in SERVERS if s in args.server_list]  # keep A B C order
    return args


def main_python() -> str:
    return str(MAIN_PY) if MAIN_PY.exists() else sys.executable


def default_model() -> str:
    out = subprocess.run(
        [
            main_python(),
            "-c",
            "from cria.models.spec import bundled_model_path; print(bundled_model_path())",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"cannot locate the bundled model: {out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1]


def find_llama_bin(args: argparse.Namespace, notes: list[str]) -> Path | None:
    need = ("llama-server", "llama-batched-bench")
    if args.llama_bin:
        b = Path(args.llama_bin)
        return b if all((b / n).exists() for n in need) else None
    b = DEFAULT_LLAMA_DIR / "bin"
    if all((b / n).exists() for n in need):
        return b
    if not BUILD_SCRIPT.exists():
        notes.append(f"llama.cpp binaries missing and {BUILD_SCRIPT} not found")
        return None
    log(f"llama.cpp binaries missing: building them with {BUILD_SCRIPT} (6-8 min on 2 cores)")
    out = subprocess.run(["bash", str(BUILD_SCRIPT), LCP_VERSION], capture_output=True, text=True)
    if out.returncode != 0:
        notes.append(f"build_llama_server.sh failed: {out.stderr.strip()[-800:]}")
        return None
    b = Path(out.stdout.strip().splitlines()[-1])
    return b if all((b / n).exists() for n in need) else None


def ensure_peers_venv(args: argparse.Namespace, notes: list[str]) -> Path | None:
    venv = Path(args.peers_venv)
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import llama_cpp.server, llama_cpp; print(llama_cpp.__version__)"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    log(f"creating {venv} with llama-cpp-python[server]=={LCP_VERSION}")
    base = shutil.which("python3") or sys.executable
    try:
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", f"llama-cpp-python[server]=={LCP_VERSION}"],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        notes.append(f"could not create {venv}: {(exc.stderr or '')[-800:]}")
        return None
    return py if subprocess.run(check, capture_output=True).returncode == 0 else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tokenizer_facts(model: str) -> dict[str, Any]:
    """Token counts of loadgen's prompts and the model's end-of-generation ids (main venv)."""
    code = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import llama_cpp
from loadgen import PROMPTS
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
counts = [len(llm.tokenize(p.encode("utf-8"), add_bos=True, special=False)) for p in PROMPTS]
vocab = llama_cpp.llama_model_get_vocab(llm.model)
n = llama_cpp.llama_vocab_n_tokens(vocab)
eog = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]
print(json.dumps({"prompt_tokens": counts, "eog_ids": eog, "n_vocab": n}))
"""
    out = subprocess.run(
        [main_python(), "-c", code, model, str(BENCH)], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-800:])
    facts: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return facts


# --------------------------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------------------------


def _cmd(argv: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout + out.stderr).strip()
    return text or None


def machine_info(
    args: argparse.Namespace, llama_bin: Path | None, peers_py: Path | None
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
            "",
        )
        info["cpu_simd"] = [
            f
            for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c")
            if f" {f}" in flags
        ]
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_mib"] = round(int(line.split()[1]) / 1024)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["cria_version"] = importlib.metadata.version("cria")
    info["cria_git"] = _cmd(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"]
    )
    lcp = _cmd([main_python(), "-c", "import llama_cpp; print(llama_cpp.__version__)"])
    info["llama_cpp_python_main_venv"] = lcp.splitlines()[-1] if lcp else None
    if peers_py:
        lcp = _cmd([str(peers_py), "-c", "import llama_cpp; print(llama_cpp.__version__)"])
        info["llama_cpp_python_peers_venv"] = lcp.splitlines()[-1] if lcp else None
    # The llama.cpp commit: the sdist's changelog names it; the cmake build records a short one.
    src = DEFAULT_LLAMA_DIR / "src"
    with contextlib.suppress(OSError):
        m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", (src / "CHANGELOG.md").read_text())
        if m:
            info["llama_cpp_commit_sdist_changelog"] = m.group(1)
    with contextlib.suppress(OSError):
        m = re.search(
            r'LLAMA_COMMIT = "([^"]+)"',
            (DEFAULT_LLAMA_DIR / "build" / "common" / "build-info.cpp").read_text(),
        )
        if m:
            info["llama_cpp_commit_build_info"] = m.group(1)
    if llama_bin:
        v = _cmd([str(llama_bin / "llama-server"), "--version"], env=llama_env(llama_bin))
        info["llama_server_version"] = v.splitlines()[-2:] if v else None
        info["llama_bin"] = str(llama_bin)
    return info


def llama_env(llama_bin: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(llama_bin) + (
        ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
    )
    return env


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants (via /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def read_mem_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB), summed over the process tree."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in proc_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key = line.split(":", 1)[0]
                if key in total:
                    total[key] += int(line.split()[1])
    return total


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        total = sum(f[:8])
        return total - idle, total
    return None


def _tree_jiffies(pid: int | None) -> int:
    """utime + stime of a process tree plus this process (the load generator)."""
    t = os.times()
    n = round((t.user + t.system) * _CLK_TCK)
    for p in proc_tree(pid) if pid else []:
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            n += int(f[11]) + int(f[12])
    return n


class ForeignCpu:
    """How many cores processes other than ours kept busy (machine busy - server tree - us)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid

    def __enter__(self) -> ForeignCpu:
        self.t0, self.m0, self.o0 = time.perf_counter(), _cpu_jiffies(), _tree_jiffies(self.pid)
        return self

    def stop(self) -> float | None:
        dt = time.perf_counter() - self.t0
        m1, o1 = _cpu_jiffies(), _tree_jiffies(self.pid)
        if not self.m0 or not m1 or dt <= 0:
            return None
        busy = (m1[0] - self.m0[0]) - (o1 - self.o0)
        return round(max(0.0, busy / _CLK_TCK / dt), 2)

    def __exit__(self, *exc: Any) -> None:
        pass


def foreign_cores_now(seconds: float = 1.0) -> float | None:
    with ForeignCpu() as f:
        time.sleep(seconds)
    return f.stop()


class MemSampler:
    """Samples VmRSS of a process tree in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, read_mem_kib(self.pid)["VmRSS"])
            self._stop.wait(self.interval)

    def __enter__(self) -> MemSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak_kib = max(self.peak_kib, read_mem_kib(self.pid)["VmRSS"])


class Server:
    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        health_path: str,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.port, self.health_path = name, argv, port, health_path
        self.log_path, self.env = log_path, env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self._log.write(("$ " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        # A session of its own, so stopping it also stops anything it spawned (by its pgid).
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=REPO,
            start_new_session=True,
        )
        _LIVE.add(self)

    def wait_healthy(self, timeout: float) -> float:
        assert self.proc is not None
        t0 = time.perf_counter()
        url = f"http://127.0.0.1:{self.port}{self.health_path}"
        with httpx.Client(timeout=5.0) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"exited with code {self.proc.returncode} before becoming healthy "
                        f"(log: {self.log_path})\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if c.get(url).status_code == 200:
                        return time.perf_counter() - t0
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(
                        f"not healthy after {timeout:.0f} s (log: {self.log_path})\n{self.log_tail()}"
                    )
                time.sleep(0.25)

    def model_id(self) -> str:
        r = httpx.get(self.base_url + "/models", timeout=10.0)
        r.raise_for_status()
        data = r.json().get("data") or []
        if not data:
            raise RuntimeError("GET /v1/models lists no model")
        return str(data[0]["id"])

    def log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait(timeout=10)
        # Anything left in its process group (a child that ignored SIGTERM).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log:
            self._log.close()
            self._log = None
        _LIVE.discard(self)
        return rc


_LIVE: set[Server] = set()
BUSY_WARN = 0.2  # cores kept busy by other processes, above which a warning is recorded


def stop_all() -> None:
    for s in list(_LIVE):
        with contextlib.suppress(Exception):
            s.stop()


def make_server(
    name: str,
    args: argparse.Namespace,
    rnd: int,
    llama_bin: Path | None,
    peers_py: Path | None,
    log_dir: Path,
) -> Server:
    port = free_port()
    log_path = log_dir / f"{name}-round{rnd}.log"
    t = str(args.threads)
    if name == "cria":
        argv = [
            main_python(),
            "-m",
            "cria",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            t,
            "--parallel",
            str(args.parallel),
            "--context-size",
            "2048",
            "--model",
            args.model,
        ]
        return Server(name, argv, port, "/health", log_path)
    if name == "llama-server":
        if llama_bin is None:
            raise RuntimeError("llama-server binary not available")
        # -c is the whole KV cache, shared by the slots: 8 x 2048 like Cria's --context-size.
        argv = [
            str(llama_bin / "llama-server"),
            "-m",
            args.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            t,
            "-tb",
            t,
            "--parallel",
            str(args.parallel),
            "-c",
            str(2048 * args.parallel),
        ]
        return Server(name, argv, port, "/health", log_path, env=llama_env(llama_bin))
    if name == "llama-cpp-python":
        if peers_py is None:
            raise RuntimeError("llama-cpp-python peers venv not available")
        # interrupt_requests defaults to True: a new request would cut off the one streaming.
        argv = [
            str(peers_py),
            "-m",
            "llama_cpp.server",
            "--model",
            args.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            t,
            "--n_threads_batch",
            t,
            "--n_ctx",
            "2048",
            "--interrupt_requests",
            "False",
        ]
        return Server(name, argv, port, "/v1/models", log_path)  # it has no /health
    raise ValueError(name)


# --------------------------------------------------------------------------------------------
# Load runs (loadgen, in process)
# --------------------------------------------------------------------------------------------

_original_body = loadgen._body


def _body_with_extra(args: argparse.Namespace, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = _original_body(args, prompt, max_tokens)
    body.update(getattr(args, "extra_body", None) or {})
    return body


loadgen._body = _body_with_extra  # lets a server get extra request fields (llama-cpp-python)


def loadgen_args(
    base_url: str,
    model: str,
    endpoint: str,
    *,
    concurrency: int = 1,
    requests: int = 4,
    max_tokens: int = 16,
    prefill: bool = False,
    extra_body: dict[str, Any] | None = None,
) -> argparse.Namespace:
    argv = [
        "--base-url",
        base_url,
        "--model",
        model,
        "--endpoint",
        endpoint,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--max-tokens",
        str(max_tokens),
    ]
    if prefill:
        argv.append("--prefill")
    a = loadgen.parse_args(argv)
    a.extra_body = extra_body
    return a


def run_async(coro: Any, timeout: float) -> dict[str, Any]:
    async def go() -> Any:
        return await asyncio.wait_for(coro, timeout)

    out: dict[str, Any] = asyncio.run(go())
    return out


def load_run(
    server: Server,
    model_id: str,
    args: argparse.Namespace,
    c: int,
    n: int,
    extra_body: dict[str, Any] | None,
    timeout: float,
) -> dict[str, Any]:
    la = loadgen_args(
        server.base_url,
        model_id,
        args.endpoint,
        concurrency=c,
        requests=n,
        max_tokens=args.max_tokens,
        extra_body=extra_body,
    )
    t0 = time.perf_counter()
    try:
        summary = run_async(loadgen.run_load(la), timeout)
        summary["status"] = "ok"
    except TimeoutError:
        summary = {"status": "failed", "run_error": f"timed out after {timeout:.0f} s"}
    except (Exception, SystemExit) as exc:  # loadgen raises SystemExit when warm-up fails
        summary = {"status": "failed", "run_error": f"{type(exc).__name__}: {exc}"[:1000]}
    summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
    summary.setdefault("concurrency", c)
    summary.setdefault("requests", n)
    return summary


def prefill_run(
    server: Server, model_id: str, args: argparse.Namespace, timeout: float
) -> dict[str, Any]:
    la = loadgen_args(server.base_url, model_id, args.endpoint, prefill=True)
    try:
        out = run_async(loadgen.run_prefill(la), timeout)
        out["status"] = "ok"
        return out
    except TimeoutError:
        return {"status": "failed", "run_error": f"timed out after {timeout:.0f} s"}
    except (Exception, SystemExit) as exc:
        return {"status": "failed", "run_error": f"{type(exc).__name__}: {exc}"[:1000]}


def bench_server(
    name: str,
    args: argparse.Namespace,
    rnd: int,
    llama_bin: Path | None,
    peers_py: Path | None,
    log_dir: Path,
    eog_ids: list[int],
    sink: list[dict[str, Any]],
) -> dict[str, Any]:
    rec: dict[str, Any] = {"server": name, "round": rnd, "status": "ok", "loads": {}, "notes": []}
    sink.append(rec)  # there at once, so an interrupted run keeps what it measured
    try:
        server = make_server(name, args, rnd, llama_bin, peers_py, log_dir)
    except Exception as exc:
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        return rec
    rec["argv"] = server.argv
    rec["log"] = str(server.log_path)
    extra_body = None
    if name == "llama-cpp-python" and eog_ids and not args.no_ban_eog_peer:
        # It ignores `ignore_eos`; forbid the end-of-generation tokens so every request
        # generates max_tokens tokens, as it does on the other two servers.
        extra_body = {"logit_bias": {str(i): -1.0e4 for i in eog_ids}}
        rec["extra_body"] = extra_body
    busy = foreign_cores_now()
    rec["foreign_cores_before"] = busy
    if busy is not None and busy > BUSY_WARN:
        msg = (
            f"round {rnd} {name}: other processes kept {busy:.2f} cores busy just before "
            "the start; its figures are unreliable"
        )
        rec["notes"].append(msg)
        log("WARNING: " + msg)
    try:
        log(f"round {rnd}: starting {name}")
        server.start()
        proc = server.proc
        assert proc is not None
        rec["startup_s"] = round(server.wait_healthy(args.startup_timeout), 2)
        rec["model_id"] = server.model_id()
        rec["rss_idle_mib"] = round(read_mem_kib(proc.pid)["VmRSS"] / 1024, 1)
        log(f"round {rnd}: {name} healthy in {rec['startup_s']} s, model id {rec['model_id']!r}")
        serial = name == "llama-cpp-python"
        prev: dict[str, Any] | None = None
        with MemSampler(proc.pid) as mem, ForeignCpu(proc.pid) as foreign:
            for c in args.concurrency_levels:
                n = max(4, c * args.requests_per_stream)
                timeout = args.run_timeout
                if serial:
                    timeout = min(timeout, 1.5 * args.serial_cap)
                    if prev and prev.get("status") == "ok" and prev.get("requests_per_s"):
                        est = n / prev["requests_per_s"]
                        if est > args.serial_cap:
                            msg = (
                                f"c={c} skipped: estimated {est:.0f} s serialised "
                                f"(> --serial-cap {args.serial_cap:.0f} s)"
                            )
                            rec["loads"][str(c)] = {
                                "status": "skipped",
                                "concurrency": c,
                                "requests": n,
                                "reason": msg,
                            }
                            rec["notes"].append(msg)
                            log(f"round {rnd}: {name} {msg}")
                            continue
                if proc.poll() is not None:
                    raise RuntimeError(f"server died (code {proc.returncode})\n{server.log_tail()}")
                log(f"round {rnd}: {name} c={c} n={n} max_tokens={args.max_tokens}")
                before = engine_totals(server) if name == "cria" else None
                s = load_run(server, rec["model_id"], args, c, n, extra_body, timeout)
                if s["status"] == "ok" and before is not None:
                    s.update(engine_python(before, engine_totals(server)))
                rec["loads"][str(c)] = s
                if s["status"] == "ok":
                    log(
                        f"round {rnd}: {name} c={c}: {s['aggregate_output_tok_s']} tok/s, "
                        f"TTFT p50 {s['ttft_ms_p50']} ms, errors {s['errors']}, {s['wall_s']} s"
                    )
                else:
                    log(f"round {rnd}: {name} c={c} FAILED: {s['run_error']}")
                prev = s
            log(f"round {rnd}: {name} prefill")
            rec["prefill"] = prefill_run(server, rec["model_id"], args, args.run_timeout)
            if rec["prefill"]["status"] == "ok":
                log(f"round {rnd}: {name} prefill {rec['prefill']['prompt_tok_s_median']} tok/s")
            else:
                log(f"round {rnd}: {name} prefill FAILED: {rec['prefill']['run_error']}")
            hwm = read_mem_kib(proc.pid)["VmHWM"]
            rec["foreign_cores_during"] = foreign.stop()
            if (rec["foreign_cores_during"] or 0) > BUSY_WARN:
                msg = (
                    f"round {rnd} {name}: other processes kept {rec['foreign_cores_during']:.2f} "
                    "cores busy (on average) during its runs; its figures are unreliable"
                )
                rec["notes"].append(msg)
                log("WARNING: " + msg)
        rec["rss_peak_sampled_mib"] = round(mem.peak_kib / 1024, 1)
        rec["vmhwm_mib"] = round(hwm / 1024, 1)
        rec["peak_rss_mib"] = round(max(hwm, mem.peak_kib) / 1024, 1)
    except KeyboardInterrupt:
        rec["status"] = "interrupted"
        raise
    except Exception as exc:
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        log(f"round {rnd}: {name} FAILED: {exc}")
    finally:
        rc = server.stop()
        rec["exit_code"] = rc
        log(f"round {rnd}: stopped {name} (exit code {rc})")
    return rec


# --------------------------------------------------------------------------------------------
# llama-batched-bench
# --------------------------------------------------------------------------------------------


def parse_batched_bench(text: str) -> list[dict[str, float]]:
    """Rows of its markdown table, keyed by the header's column names (PP, TG, B, S_TG t/s, ...)."""
    rows: list[dict[str, float]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
            continue
        if header is None or set("".join(cells)) <= set("-: "):
            continue
        if len(cells) != len(header):
            continue
        try:
            rows.append({h: float(v) for h, v in zip(header, cells)})
        except ValueError:
            continue
    return rows


def run_batched_bench(
    args: argparse.Namespace, llama_bin: Path, npp: int, log_dir: Path
) -> dict[str, Any]:
    npl = ceiling_batches(args)
    ctx = max(16384, max(npl) * (npp + args.max_tokens) + 64)
    argv = [
        str(llama_bin / "llama-batched-bench"),
        "-m",
        args.model,
        "-c",
        str(ctx),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(npp),
        "-ntg",
        str(args.max_tokens),
        "-npl",
        ",".join(map(str, npl)),
        "-t",
        str(args.threads),
    ]
    rec: dict[str, Any] = {"argv": argv, "npp": npp, "ntg": args.max_tokens, "status": "ok"}
    rec["foreign_cores_before"] = busy = foreign_cores_now()
    if busy is not None and busy > BUSY_WARN:
        rec["note"] = f"other processes kept {busy:.2f} cores busy just before it: unreliable"
        log("WARNING: llama-batched-bench: " + rec["note"])
    log("llama-batched-bench: " + " ".join(argv[1:]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=llama_env(llama_bin),
        start_new_session=True,
    )
    _BG.add(proc)
    try:
        out, err = proc.communicate(timeout=args.batched_bench_timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rec["status"] = "failed"
        rec["error"] = f"timed out after {args.batched_bench_timeout:.0f} s"
    finally:
        _BG.discard(proc)
    rec["elapsed_s"] = round(time.perf_counter() - t0, 2)
    (log_dir / "llama-batched-bench.log").write_text(out + "\n--- stderr ---\n" + err)
    rec["exit_code"] = proc.returncode
    rows = parse_batched_bench(out) or parse_batched_bench(err)
    rec["rows"] = rows
    if rec["status"] == "ok" and (proc.returncode != 0 or not rows):
        rec["status"] = "failed"
        rec["error"] = f"exit code {proc.returncode}, {len(rows)} table rows; " + err.strip()[-600:]
    rec["s_tg_tok_s"] = {str(int(r["B"])): r.get("S_TG t/s") for r in rows if "B" in r}
    rec["s_tok_s"] = {str(int(r["B"])): r.get("S t/s") for r in rows if "B" in r}
    return rec


_BG: set[subprocess.Popen[str]] = set()


def effective_batch(args: argparse.Namespace, c: int, server: str = "cria") -> int:
    """The most sequences a server decodes together at concurrency c: Cria and llama-server
    have --parallel slots, and the streams beyond them wait in the queue; llama-cpp-python's
    server runs one request at a time."""
    return 1 if server == "llama-cpp-python" else min(c, args.parallel)


def ceiling_batches(args: argparse.Namespace) -> list[int]:
    return sorted(
        {effective_batch(args, c, s) for c in args.concurrency_levels for s in args.server_list}
    )


# --------------------------------------------------------------------------------------------
# Aggregation and report
# --------------------------------------------------------------------------------------------


def median(values: list[Any]) -> float | None:
    xs = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return round(statistics.median(xs), 3) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return None if a != 0 else 1.0
    return round(a / b, 3)


def aggregate(
    args: argparse.Namespace, rounds: list[dict[str, Any]], ceiling: dict[str, Any] | None
) -> dict[str, Any]:
    med: dict[str, Any] = {}
    for name in args.server_list:
        recs = [r for r in rounds if r["server"] == name]
        per_c: dict[str, Any] = {}
        for c in args.concurrency_levels:
            runs = [r["loads"].get(str(c)) for r in recs]
            ok = [s for s in runs if s and s.get("status") == "ok"]
            d: dict[str, Any] = {m: median([s.get(m) for s in ok]) for m, _, _ in LOAD_METRICS}
            d.update({m: median([s.get(m) for s in ok]) for m in EXTRA_METRICS})
            d["rounds_ok"] = len(ok)
            d["rounds_failed"] = sum(1 for s in runs if not s or s.get("status") == "failed")
            d["rounds_skipped"] = sum(1 for s in runs if s and s.get("status") == "skipped")
            per_c[str(c)] = d
        pre = [r.get("prefill") or {} for r in recs]
        med[name] = {
            "load": per_c,
            "prefill_tok_s": median(
                [p.get("prompt_tok_s_median") for p in pre if p.get("status") == "ok"]
            ),
            "prefill_prompt_tokens": median(
                [p.get("prompt_tokens_median") for p in pre if p.get("status") == "ok"]
            ),
            "peak_rss_mib": median([r.get("peak_rss_mib") for r in recs]),
            "rss_idle_mib": median([r.get("rss_idle_mib") for r in recs]),
            "startup_s": median([r.get("startup_s") for r in recs]),
            "model_ids": sorted({r["model_id"] for r in recs if r.get("model_id")}),
            "rounds_failed": sum(1 for r in recs if r["status"] != "ok"),
        }
    ratios: dict[str, Any] = {}
    if "cria" in med:
        for peer in PEERS:
            if peer not in med:
                continue
            rp: dict[str, Any] = {"load": {}}
            for c in args.concurrency_levels:
                a, b = med["cria"]["load"][str(c)], med[peer]["load"][str(c)]
                rp["load"][str(c)] = {m: ratio(a[m], b[m]) for m, _, _ in LOAD_METRICS}
            for m in ("prefill_tok_s", "peak_rss_mib"):
                rp[m] = ratio(med["cria"][m], med[peer][m])
            ratios[f"cria/{peer}"] = rp
    for name in med:
        for c in args.concurrency_levels:
            d = med[name]["load"][str(c)]
            # Streams decoding at once / the time between two tokens of a stream: the server's
            # decode rate while its batch is full, the figure comparable to S_TG (which has no
            # prefill, no queueing and no ramp at the start and end of a run).
            itl = d.get("itl_ms_p50")
            d["steady_decode_tok_s"] = (
                round(effective_batch(args, c, name) * 1000.0 / itl, 2) if itl else None
            )
    for peer in PEERS:
        if "cria" in med and peer in med:
            ratios[f"cria/{peer}"]["paired"] = paired_ratios(args, rounds, peer)
    if ceiling and ceiling.get("s_tg_tok_s"):
        for name in med:
            per_c = {}
            for c in args.concurrency_levels:
                d = med[name]["load"][str(c)]
                stg = ceiling["s_tg_tok_s"].get(str(effective_batch(args, c, name)))
                per_c[str(c)] = {
                    "batch": effective_batch(args, c, name),
                    "aggregate": ratio(d["aggregate_output_tok_s"], stg),
                    "steady_decode": ratio(d["steady_decode_tok_s"], stg),
                }
            ratios[f"{name}/batched-bench S_TG"] = per_c
    return {"medians": med, "ratios": ratios}


PAIRED = ("aggregate_output_tok_s", "decode_tok_s_p50", "ttft_ms_p50")


def paired_ratios(
    args: argparse.Namespace, rounds: list[dict[str, Any]], peer: str
) -> dict[str, Any]:
    """Cria/peer within each round (the two ran minutes apart), then the median over rounds:
    steadier than a ratio of medians when the machine's speed drifts between rounds."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rounds:
        by_round.setdefault(r["round"], {})[r["server"]] = r
    out: dict[str, Any] = {"load": {}}
    pairs = [(rs["cria"], rs[peer]) for rs in by_round.values() if "cria" in rs and peer in rs]
    for c in args.concurrency_levels:
        per_m: dict[str, Any] = {}
        for m in PAIRED:
            xs = []
            for a, b in pairs:
                sa, sb = a["loads"].get(str(c)) or {}, b["loads"].get(str(c)) or {}
                if sa.get("status") == "ok" and sb.get("status") == "ok":
                    xs.append(ratio(sa.get(m), sb.get(m)))
            per_m[m] = {"median": median(xs), "rounds": xs}
        out["load"][str(c)] = per_m
    xs = []
    for a, b in pairs:
        pa, pb = a.get("prefill") or {}, b.get("prefill") or {}
        if pa.get("status") == "ok" and pb.get("status") == "ok":
            xs.append(ratio(pa.get("prompt_tok_s_median"), pb.get("prompt_tok_s_median")))
    out["prefill_tok_s"] = {"median": median(xs), "rounds": xs}
    return out


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def render_table(
    args: argparse.Namespace,
    agg: dict[str, Any],
    ceiling: dict[str, Any] | None,
    rounds: list[dict[str, Any]],
) -> str:
    med, rat = agg["medians"], agg["ratios"]
    names = list(med)
    peers = [p for p in PEERS if p in med and "cria" in med]
    cols = [SHORT[n] for n in names] + [
        f"c/{'ls' if p == 'llama-server' else 'lcp'}" for p in peers
    ]
    w0, w = 22, 13
    lines: list[str] = []
    head = f"{'':<{w0}}" + "".join(f"{c:>{w}}" for c in cols)
    lines.append(
        f"Medians over {args.rounds} round(s); endpoint /{args.endpoint}, max_tokens "
        f"{args.max_tokens}, N = max(4, c x {args.requests_per_stream}); "
        f"c/ls = Cria/llama-server, c/lcp = Cria/llama-cpp-python "
        f"(latency, errors: < 1 is Cria better; tok/s, req/s: > 1)"
    )
    for c in args.concurrency_levels:
        n = max(4, c * args.requests_per_stream)
        lines.append("")
        lines.append(f"concurrency {c} ({n} requests)".ljust(w0) + head[w0:])
        lines.append("-" * len(head))
        for m, label, _ in LOAD_METRICS:
            row = [med[s]["load"][str(c)][m] for s in names]
            row += [rat[f"cria/{p}"]["load"][str(c)][m] for p in peers]
            lines.append(f"{label:<{w0}}" + "".join(f"{fmt(v):>{w}}" for v in row))
        notes = []
        for s in names:
            d = med[s]["load"][str(c)]
            if d["rounds_skipped"]:
                notes.append(f"{SHORT[s]}: skipped in {d['rounds_skipped']} round(s)")
            if d["rounds_failed"]:
                notes.append(f"{SHORT[s]}: failed in {d['rounds_failed']} round(s)")
            if d.get("requests_not_max_tokens"):
                notes.append(
                    f"{SHORT[s]}: {d['requests_not_max_tokens']:g} request(s) short of max_tokens"
                )
        if notes:
            lines.append("  note: " + "; ".join(notes))
    if "cria" in med:
        parts = []
        for c in args.concurrency_levels:
            d = med["cria"]["load"][str(c)]
            if d.get("engine_python_share") is not None:
                parts.append(
                    f"c={c} {100 * d['engine_python_share']:.1f}% "
                    f"({fmt(d.get('engine_python_us_per_seq'), 1)} us/seq)"
                )
        if parts:
            lines.append("")
            lines.append(
                "Cria's engine Python (outside llama_decode and sampling), share of the step "
                "(us per sequence per step): " + "; ".join(parts)
            )
    for p in peers:
        pr = rat[f"cria/{p}"].get("paired") or {}
        lines.append("")
        lines.append(
            f"Cria/{p} paired within each round, median over rounds (per-round values):"
        )
        for c in args.concurrency_levels:
            parts = []
            for m in PAIRED:
                v = pr.get("load", {}).get(str(c), {}).get(m) or {}
                rs = ", ".join(fmt(x) for x in v.get("rounds") or [])
                parts.append(f"{m.split('_')[0]} {fmt(v.get('median'))} ({rs})")
            lines.append(f"  c={c}: " + "; ".join(parts))
        v = pr.get("prefill_tok_s") or {}
        rs = ", ".join(fmt(x) for x in v.get("rounds") or [])
        lines.append(f"  prefill: {fmt(v.get('median'))} ({rs})")
    lines.append("")
    lines.append(f"{'per server':<{w0}}" + head[w0:])
    lines.append("-" * len(head))
    for key, label in (("prefill_tok_s", "prefill tok/s"), ("peak_rss_mib", "peak RSS (MiB)")):
        row = [med[s][key] for s in names] + [rat[f"cria/{p}"][key] for p in peers]
        lines.append(f"{label:<{w0}}" + "".join(f"{fmt(v):>{w}}" for v in row))
    row = [med[s]["startup_s"] for s in names]
    lines.append(f"{'startup (s)':<{w0}}" + "".join(f"{fmt(v):>{w}}" for v in row))
    if ceiling:
        lines.append("")
        if ceiling.get("status") == "ok":
            lines.append(
                f"llama-batched-bench ceiling (npp {ceiling['npp']}, ntg {ceiling['ntg']}, "
                f"-t {args.threads}) at B = min(c, --parallel {args.parallel}), the most "
                "sequences a server decodes at once (llama-cpp-python: B = 1)"
            )
            lines.append(
                "  agg/S_TG: aggregate out tok/s (prefill, queueing and ramps included) / S_TG;"
            )
            lines.append(
                "  steady/S_TG: B / ITL p50, about the decode rate with B streams / S_TG (ITL p50"
            )
            lines.append("  also counts the quicker steps of a run's ramp-down: it can read above 1)")
            hdr = f"{'c':>4}{'B':>4}{'S_TG t/s':>10}"
            for name in names:
                hdr += f"{SHORT[name] + ' agg':>18}{'steady':>9}"
            lines.append(hdr)
            for c in args.concurrency_levels:
                b = effective_batch(args, c)
                row = f"{c:>4}{b:>4}{fmt(ceiling['s_tg_tok_s'].get(str(b))):>10}"
                for name in names:
                    r = rat.get(f"{name}/batched-bench S_TG", {}).get(str(c), {})
                    row += f"{fmt(r.get('aggregate')):>18}{fmt(r.get('steady_decode')):>9}"
                lines.append(row)
        else:
            lines.append(f"llama-batched-bench FAILED: {ceiling.get('error')}")
    problems = []
    for r in rounds:
        if r["status"] != "ok":
            first = (r.get("error") or "").splitlines()[:1]
            problems.append(f"round {r['round']} {r['server']}: {r['status']}: {''.join(first)}")
        for c, s in r["loads"].items():
            if s.get("status") == "failed":
                problems.append(f"round {r['round']} {r['server']} c={c}: {s['run_error']}")
            elif s.get("errors"):
                problems.append(
                    f"round {r['round']} {r['server']} c={c}: {s['errors']} request error(s): "
                    f"{'; '.join(s.get('error_samples') or [])[:300]}"
                )
        p = r.get("prefill")
        if p and p.get("status") == "failed":
            problems.append(f"round {r['round']} {r['server']} prefill: {p['run_error']}")
        problems.extend(r.get("notes") or [])
    if ceiling and ceiling.get("note"):
        problems.append("llama-batched-bench: " + ceiling["note"])
    if problems:
        lines.append("")
        lines.append("notes and problems:")
        lines.extend("  " + x for x in problems)
    return "\n".join(lines)


def plot(
    args: argparse.Namespace,
    agg: dict[str, Any],
    ceiling: dict[str, Any] | None,
    path: Path,
    info: dict[str, Any],
) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -r bench/requirements.txt): no plot"
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = args.concurrency_levels
    styles = {
        "cria": ("o-", "tab:blue"),
        "llama-server": ("s-", "tab:orange"),
        "llama-cpp-python": ("^-", "tab:green"),
    }
    for name, d in agg["medians"].items():
        ys = [d["load"][str(c)]["aggregate_output_tok_s"] for c in xs]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            st, col = styles[name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], st, color=col, label=name)
    if ceiling and ceiling.get("s_tg_tok_s"):
        pts = [(c, ceiling["s_tg_tok_s"].get(str(effective_batch(args, c)))) for c in xs]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "k--",
                marker="x",
                label=f"llama-batched-bench S_TG (npp {ceiling['npp']}, B = min(c, {args.parallel}))",
            )
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate output tok/s (median over rounds)")
    ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        f"{Path(args.model).name}: {args.threads} threads, max_tokens {args.max_tokens}, "
        f"/{args.endpoint}\n{info.get('cpu_model', '')}, {info.get('nproc')} cores, "
        f"{args.rounds} round(s)",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def report_again(args: argparse.Namespace) -> int:
    """The table of an earlier run, aggregated by this version (its own settings apply)."""
    old = json.loads(Path(args.from_json).read_text())
    for key, value in old["config"].items():
        if key != "from_json":
            setattr(args, key, value)
    args.concurrency_levels = [int(c) for c in args.concurrency_levels]
    args.parallel = int(old["config"].get("parallel", args.parallel))
    agg = aggregate(args, old["rounds"], old.get("batched_bench"))
    print(render_table(args, agg, old.get("batched_bench"), old["rounds"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return report_again(args)
    out_dir = Path(args.out)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    notes: list[str] = []
    if not args.model:
        args.model = default_model()
    args.model = str(Path(args.model).resolve())
    log(f"model {args.model}")

    llama_bin = None
    if "llama-server" in args.server_list or not args.no_batched_bench:
        llama_bin = find_llama_bin(args, notes)
        if llama_bin is None:
            notes.append("llama-server / llama-batched-bench unavailable: recorded as failed")
    peers_py = ensure_peers_venv(args, notes) if "llama-cpp-python" in args.server_list else None
    info = machine_info(args, llama_bin, peers_py)
    log(
        f"machine: {info.get('cpu_model')}, {info.get('nproc')} cores; llama.cpp "
        f"{info.get('llama_cpp_commit_sdist_changelog')}"
    )

    try:
        tok = tokenizer_facts(args.model)
    except Exception as exc:
        tok = {"prompt_tokens": [], "eog_ids": [], "error": str(exc)}
        notes.append(f"could not tokenize loadgen's prompts: {exc}")
    raw_mean = statistics.fmean(tok["prompt_tokens"]) if tok["prompt_tokens"] else None

    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items()},
        "machine": info,
        "model": {
            "path": args.model,
            "size_mib": round(Path(args.model).stat().st_size / 2**20, 1),
        },
        "prompts": {
            "tokens_per_prompt": tok["prompt_tokens"],
            "mean_tokens": raw_mean,
            "eog_ids": tok["eog_ids"],
        },
        "notes": notes,
        "rounds": [],
        "batched_bench": None,
    }
    rounds: list[dict[str, Any]] = result["rounds"]
    ceiling: dict[str, Any] | None = None
    interrupted = False
    t_start = time.perf_counter()
    try:
        for rnd in range(1, args.rounds + 1):
            for name in args.server_list:
                bench_server(name, args, rnd, llama_bin, peers_py, log_dir, tok["eog_ids"], rounds)
                write_json(out_dir / "compare.json", result)  # partial results survive a crash
        if not args.no_batched_bench:
            if llama_bin is None:
                ceiling = {"status": "failed", "error": "llama-batched-bench binary not available"}
            elif raw_mean is None:
                ceiling = {"status": "failed", "error": "prompt token count unknown"}
            else:
                npp = raw_mean
                if args.endpoint == "chat":
                    npp = chat_prompt_mean(rounds, tok["prompt_tokens"]) or raw_mean
                ceiling = run_batched_bench(args, llama_bin, round(npp), log_dir)
            result["batched_bench"] = ceiling
    except KeyboardInterrupt as exc:
        interrupted = True
        notes.append(f"interrupted ({str(exc) or 'Ctrl-C'}): partial results")
        log("interrupted: stopping servers, writing partial results")
    finally:
        stop_all()
        for p in list(_BG):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    agg = aggregate(args, rounds, ceiling)
    result.update(agg)
    table = render_table(args, agg, ceiling, rounds)
    result["table"] = table
    png = out_dir / "throughput.png"
    err = plot(args, agg, ceiling, png, info)
    if err:
        notes.append(err)
    write_json(out_dir / "compare.json", result)
    print()
    print(table)
    if notes:
        print("\nnotes:")
        for n in notes:
            print("  " + n)
    print(
        f"\nwrote {out_dir / 'compare.json'}" + ("" if err else f", {png}") + f", logs in {log_dir}"
        f" ({result['elapsed_s']:.0f} s)"
    )
    return 130 if interrupted else 0


def chat_prompt_mean(rounds: list[dict[str, Any]], raw: list[int]) -> float | None:
    """With /chat the template adds tokens: raw mean + the median offset the servers reported."""
    offsets = []
    for r in rounds:
        for s in r["loads"].values():
            for q in s.get("per_request") or []:
                if q.get("prompt_tokens") is not None and q["prompt_index"] < len(raw):
                    offsets.append(q["prompt_tokens"] - raw[q["prompt_index"]])
    return statistics.fmean(raw) + statistics.median(offsets) if offsets and raw else None


def write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".compare-", suffix=".json")
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
