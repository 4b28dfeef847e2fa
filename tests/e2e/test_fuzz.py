"""Fuzzing with OpenAI's own OpenAPI spec: schemathesis generates requests for every operation
Cria serves that the spec has, against the real server. Whatever comes in, the server answers in
time, never with a 5xx, every 4xx with an OpenAI-shaped error body, every 200 with a body that
OpenAI's response schema accepts (streams: every chunk, ending in [DONE]), and its log holds no
Traceback.

The spec is OpenAI's openapi.yaml at ../shared/openai/openapi.yaml (beside the repository); the
tests are skipped when it is absent. tests/e2e/_fuzz_spec.py cuts it down to the five operations
and the component schemas they reference, in JSON Schema terms. Two tests use it:

* test_openai_spec_fuzz: the spec as OpenAI has it, valid (positive) and schema-violating
  (negative) cases, from schemathesis' coverage phase (each field's boundary values, missing and
  mistyped fields, other methods, wrong content types: a fixed set of ~2000) and its fuzzing
  phase (Hypothesis). A coverage case is cut down to the required fields and the one field it is
  about (`aim`), so that this field is what the server judges. Most other positive bodies hold
  fields Cria does not honour and meet strict mode's 400: right, but shallow.
* test_honoured_fuzz: valid cases from the chat and completions bodies restricted to what Cria
  honours (`honoured_view`), kept to the rules between fields that a schema cannot state
  (`plausible`), so that they reach sampling, streaming, logprobs, stop, logit_bias and tools.

Each body names the served model (a negative one when its `model` is a string, so that the
violation lies elsewhere) and has bounded costs (`bound`): at most MAX_TOKENS tokens, n and
best_of at most 2, short prompts and a few short embedding inputs. A case whose request was
already checked is counted as a repeat and not sent again.

Environment: FUZZ_EXAMPLES sets Hypothesis' max_examples per operation in test_openai_spec_fuzz's
fuzzing phase (positive and negative together), FUZZ_HONOURED_EXAMPLES in test_honoured_fuzz
(default: the same), FUZZ_SEED the seed (random by default; the report and every failure name
it), FUZZ_CASE_LOG a JSON-lines file to which every case and its answer are appended. The cases
per operation, mode and status are printed at the end of the module.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.core import NotSet
from schemathesis.core.transport import Response

from cria.api import protocol, strict
from cria.api.routes.capabilities import EXTENSIONS
from tests.e2e._fuzz_cases import (
    MAX_CHOICES,
    MAX_EMBEDDING_INPUTS,
    MAX_PROMPT_TOKENS,
    MAX_STRING,
    MAX_TOKENS,
    aim,
    bound,
    plausible,
)
from tests.e2e._fuzz_spec import OPERATIONS, SPEC_PATH, honoured_view, load_spec, required_fields
from tests.e2e.conftest import MODEL_ID, Server
from tests.openai_schema import validate, validate_each

RESPONSE_SCHEMAS = {
    "/models": ("ListModelsResponse", None),
    "/models/{model}": ("Model", None),
    "/completions": ("CreateCompletionResponse", "CreateCompletionStreamResponse"),
    "/chat/completions": ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    "/embeddings": ("CreateEmbeddingResponse", None),
}
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
HONOURED_EXAMPLES = int(os.environ.get("FUZZ_HONOURED_EXAMPLES", str(MAX_EXAMPLES)))
# The cases differ from run to run; FUZZ_SEED repeats a run's (a failure message names its seed).
SEED = int(os.environ.get("FUZZ_SEED") or random.getrandbits(64))
REQUEST_TIMEOUT = 30.0  # seconds; a request that takes longer counts as a hang
# A bounded body streams at most MAX_PROMPTS x MAX_CHOICES x (MAX_TOKENS + 1) events and a usage
# chunk; schemathesis stops reading a stream after 20 by default (and marks it cut short).
MAX_STREAM_EVENTS = 200

CASE_LOG = os.environ.get("FUZZ_CASE_LOG")  # a JSON-lines file: every case and its answer
COUNTS: Counter[tuple[str, str, int | str]] = Counter()  # (operation, mode, status) -> cases
DUPLICATE = "repeat"  # the status counted for a case whose request was already checked
CHECKED: set[str] = set()  # every request that passed, as a key (see `request_key`)


def honoured_fields(model: type[BaseModel]) -> set[str]:
    """The top-level fields of one of Cria's request models that it honours with any value."""
    return (
        {f.alias or name for name, f in model.model_fields.items()}
        - set(EXTENSIONS)
        - set(strict.JUDGED)
    )


# Spec path -> the top-level request fields Cria honours (with any value): what
# GET /v1/capabilities says, which `_honoured` checks.
HONOURED = {
    "/chat/completions": honoured_fields(protocol.ChatCompletionRequest),
    "/completions": honoured_fields(protocol.CompletionRequest),
}


@pytest.fixture(scope="module", autouse=True)
def _honoured(server: Server) -> None:
    """The server honours what the honoured view was made from (its own words on it)."""
    model = httpx.get(server.v1 + "/capabilities", timeout=10).json()["data"][0]
    limited = set(model["parameter_values"])
    params = model["parameters"]
    assert set(params["/v1/chat/completions"]) - limited == HONOURED["/chat/completions"]
    assert set(params["/v1/completions"]) - limited == HONOURED["/completions"]


@pytest.fixture(scope="module")
def log_reader(server: Server) -> Iterator[list[int]]:
    """The server log's read offset, so that each case reads only what it added."""
    yield [server.log_path.stat().st_size]


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not COUNTS:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        write_report(reporter.write_line, time.monotonic() - started)


def write_report(write_line: Callable[[str], None], seconds: float) -> None:
    total = sum(COUNTS.values())
    dups = sum(c for (_o, _m, s), c in COUNTS.items() if s == DUPLICATE)
    write_line("")
    write_line(
        f"fuzz: {total} cases ({dups} repeats of a request already checked, not sent) "
        f"in {seconds:.0f}s, FUZZ_SEED={SEED}; per operation (mode: status x count):"
    )
    served = {f"{method.upper()} {path}" for path, method in OPERATIONS.items()}
    # Coverage's requests with methods the spec does not list, all paths together.
    probes: Counter[int | str] = Counter()
    for (op, _mode, status), count in COUNTS.items():
        if op not in served:
            probes[status] += count
    for op in sorted(served, key=lambda o: o.split()[1]):
        parts = []
        for mode in ("positive", "negative", "honoured"):
            statuses = sorted(
                ((s, c) for (o, m, s), c in COUNTS.items() if o == op and m == mode), key=str
            )
            if statuses:
                shown = ", ".join(f"{s} x{c}" for s, c in statuses)
                parts.append(f"{mode} {sum(c for _s, c in statuses)} ({shown})")
        if parts:
            write_line(f"  {op}: " + "; ".join(parts))
    if probes:
        shown = ", ".join(f"{s} x{c}" for s, c in sorted(probes.items(), key=str))
        write_line(f"  other methods on these paths: {sum(probes.values())} ({shown})")


def request_key(case: schemathesis.Case) -> str:
    """What the server receives, as a string: equal for two cases that send the same request."""
    parts = [
        case.method,
        case.operation.path,
        case.path_parameters,
        case.query,
        dict(case.headers or {}),
        case.media_type,
        case.body,
    ]
    return json.dumps(parts, sort_keys=True, default=repr)


# ---- what every response must be ----


def content_type(response: Response) -> str:
    return response.headers.get("content-type", [""])[0]


def check_error_body(response: Response) -> None:
    assert content_type(response).startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def sse_payloads(text: str) -> list[Any]:
    data = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", text[-500:]
    return [json.loads(d) for d in data[:-1]]


def _unechoed(bodies: list[Any]) -> None:
    """The spec types /v1/completions' token_logprobs as numbers and top_logprobs as objects;
    with echo, OpenAI itself sends null for the prompt's first token (it has no logprob), as
    Cria does: a null there is put as 0 and {} for validation, a null elsewhere stays."""
    for body in bodies:
        choices = body.get("choices") if isinstance(body, dict) else None
        for choice in choices if isinstance(choices, list) else []:
            logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
            if isinstance(logprobs, dict):
                for key, empty in (("token_logprobs", 0.0), ("top_logprobs", {})):
                    values = logprobs.get(key)
                    if isinstance(values, list) and values and values[0] is None:
                        values[0] = empty


def check_success(path: str, response: Response, echo: bool = False) -> None:
    whole, chunk = RESPONSE_SCHEMAS[path]
    if content_type(response).startswith("text/event-stream"):
        assert not response.stream_cut_short, (
            f"the stream did not end in {REQUEST_TIMEOUT}s or {MAX_STREAM_EVENTS} events"
        )
        assert chunk is not None, path
        payloads = sse_payloads(response.text)
        errors = [p for p in payloads if isinstance(p, dict) and "error" in p]
        # An error after the headers is a failure on the server's side (the request was fine).
        assert not errors, errors
        if echo:
            _unechoed(payloads)
        validate_each(chunk, payloads)
    else:
        body = response.json()
        if path == "/embeddings":
            # The spec types `embedding` as numbers only; OpenAI itself sends encoding_format
            # base64 as a string of little-endian float32s, as Cria does: check it decoded.
            for item in body.get("data", []):
                if isinstance(item, dict) and isinstance(item.get("embedding"), str):
                    raw = base64.b64decode(item["embedding"], validate=True)
                    item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        if echo:
            _unechoed([body])
        validate(whole, body)


def new_log(server: Server, offset: list[int]) -> str:
    with server.log_path.open("rb") as f:
        f.seek(offset[0])
        data = f.read()
    offset[0] += len(data)
    return data.decode("utf-8", errors="replace")


def load_schema(
    spec: dict[str, Any], phases: list[str], modes: list[GenerationMode], max_examples: int
) -> schemathesis.schemas.BaseSchema:
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(request_timeout=REQUEST_TIMEOUT)
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    schema.config.seed = SEED
    # The spec's few `example`s hold other models' names: no examples phase.
    schema.config.phases.update(phases=phases)
    schema.config.generation.update(
        modes=modes,
        max_examples=max_examples,
        # Unknown fields are a 400 in strict mode: a case spent on one reaches nothing deeper.
        allow_extra_parameters=False,
        database="none",  # no .hypothesis/ directory in the repository
    )
    return schema


if not SPEC_PATH.is_file():
    pytest.skip(
        f"OpenAI's OpenAPI spec is not at {SPEC_PATH} (../shared beside the repository)",
        allow_module_level=True,
    )
SPEC = load_spec(SPEC_PATH)
REQUIRED = {
    path: required_fields(SPEC, path) for path, method in OPERATIONS.items() if method == "post"
}
BOTH_MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
schema = load_schema(SPEC, ["coverage", "fuzzing"], BOTH_MODES, MAX_EXAMPLES)
honoured_schema = load_schema(
    honoured_view(SPEC, HONOURED), ["fuzzing"], [GenerationMode.POSITIVE], HONOURED_EXAMPLES
)


@schema.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """GET /models/{model}: the served model's id as often as a generated one."""
    if not isinstance(path_parameters, dict) or "model" not in path_parameters:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, "model": MODEL_ID}])


SETTINGS = settings(
    deadline=None,  # the CPU is shared: REQUEST_TIMEOUT is the limit that matters
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@SETTINGS
@schema.parametrize()
def test_openai_spec_fuzz(case: schemathesis.Case, server: Server, log_reader: list[int]) -> None:
    check_case(case, server, log_reader)


@SETTINGS
@honoured_schema.parametrize()
def test_honoured_fuzz(case: schemathesis.Case, server: Server, log_reader: list[int]) -> None:
    check_case(case, server, log_reader, mode="honoured")


def check_case(
    case: schemathesis.Case, server: Server, log_reader: list[int], mode: str | None = None
) -> None:
    """Send one case (aimed and bounded) and check the answer; a repeat is counted, not sent."""
    path = case.operation.path
    meta = case.meta  # read before any change: a changed body is validated again
    mode = mode or (meta.generation.mode.value if meta is not None else "?")
    phase = meta.phase.name.value if meta is not None else "?"
    description = (meta.phase.data.description if meta is not None else None) or ""
    operation = f"{case.method} {path}"
    generated = case.body
    if not isinstance(case.body, NotSet):
        body = case.body
        if phase == "coverage" and path in REQUIRED:
            body = aim(body, REQUIRED[path], description, positive=mode == "positive")
        if mode == "honoured":
            body = plausible(path, body)
        case.body = bound(path, body)
    key = request_key(case)
    if key in CHECKED:  # e.g. coverage's enum of OpenAI's model names, all made the served one
        COUNTS[(operation, mode, DUPLICATE)] += 1
        return
    started = time.monotonic()
    try:
        response = case.call(base_url=server.v1, timeout=REQUEST_TIMEOUT)
    except (requests.Timeout, TimeoutError):
        pytest.fail(
            f"no answer in {REQUEST_TIMEOUT}s (FUZZ_SEED={SEED}): {operation} {case.body!r:.2000}"
        )
    elapsed = time.monotonic() - started
    COUNTS[(operation, mode, response.status_code)] += 1
    if CASE_LOG:
        with open(CASE_LOG, "a", encoding="utf-8") as f:
            record = {"op": operation, "mode": mode, "phase": phase, "description": description,
                      "status": response.status_code, "seconds": round(elapsed, 3), "body": case.body,
                      "response": response.text_lossy()[:300]}  # fmt: skip
            if generated is not case.body:
                record["generated"] = generated
            f.write(json.dumps(record, default=repr) + "\n")
    shown = (
        f"{operation} ({phase}, {mode}: {description}; FUZZ_SEED={SEED}) -> {response.status_code} in {elapsed:.1f}s\n"
        f"request: {case.body!r:.2000}\nresponse: {response.text_lossy()[:2000]}"
    )
    assert response.status_code < 500, shown
    if response.status_code >= 400:
        try:
            check_error_body(response)
        except AssertionError as exc:
            raise AssertionError(f"not an OpenAI-shaped error: {exc}\n{shown}") from None
    elif response.status_code == 200:
        try:
            echo = (
                path == "/completions"
                and isinstance(case.body, dict)
                and case.body.get("echo") is True
            )
            check_success(path, response, echo)
        except AssertionError as exc:
            raise AssertionError(f"{str(exc)[:4000]}\n{shown}") from None
    else:
        pytest.fail(f"unexpected status\n{shown}")
    log = new_log(server, log_reader)
    assert "Traceback" not in log, f"{shown}\nserver log:\n{log[-4000:]}"
    CHECKED.add(key)


# ---- the checks and the bounds themselves ----


def _answer(
    status: int, body: bytes, content_type: str = "application/json", cut_short: bool = False
) -> Response:
    request = requests.Request("POST", "http://127.0.0.1/v1/completions").prepare()
    return Response(
        status,
        {"content-type": [content_type]},
        body,
        request,
        0.0,
        True,
        stream_cut_short=cut_short,
    )


def test_checks_refuse_bad_answers() -> None:
    """What a broken server answers fails the checks above, so that their passing means something."""
    good_error = (
        b'{"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": null}}'
    )
    check_error_body(_answer(400, good_error))
    for bad in (b'{"detail": "Not Found"}', b'{"error": {"message": "m"}}', b'{"error": "m"}'):
        with pytest.raises(AssertionError):
            check_error_body(_answer(404, bad))
    with pytest.raises(AssertionError):
        check_error_body(_answer(400, good_error, "text/plain"))
    check_success("/models", _answer(200, b'{"object": "list", "data": []}'))
    with pytest.raises(AssertionError):
        check_success("/models", _answer(200, b'{"object": "list"}'))
    chunk = b'data: {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [{"index": 0, "text": "a", "logprobs": null, "finish_reason": null}]}\n\n'
    check_success("/completions", _answer(200, chunk + b"data: [DONE]\n\n", "text/event-stream"))

    def echoed(token_logprobs: list[float | None]) -> bytes:
        top = [None if v is None else {"a": v} for v in token_logprobs]
        logprobs = {
            "tokens": ["a"] * len(top),
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": [0] * len(top),
        }
        choice = {"index": 0, "text": "a", "logprobs": logprobs, "finish_reason": "length"}
        return json.dumps(
            {
                "id": "c",
                "object": "text_completion",
                "created": 1,
                "model": "m",
                "choices": [choice],
            }
        ).encode()

    check_success("/completions", _answer(200, echoed([None, -1.0])), echo=True)
    for logprobs, echo in (([None, -1.0], False), ([-1.0, None], True)):
        with pytest.raises(AssertionError):
            check_success("/completions", _answer(200, echoed(logprobs)), echo=echo)
    for stream, cut_short in (
        (chunk, False),  # no [DONE]
        (chunk + b'data: {"error": {"message": "m"}}\n\ndata: [DONE]\n\n', False),  # an error event
        (chunk + b"data: [DONE]\n\n", True),  # cut short
        (b'data: {"id": "c"}\n\ndata: [DONE]\n\n', False),  # a chunk OpenAI's schema refuses
    ):
        with pytest.raises(AssertionError):
            check_success("/completions", _answer(200, stream, "text/event-stream", cut_short))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=40,
)
BODY_FIELDS = [
    *("model", "messages", "tools", "tool_choice", "prompt", "input", "n", "best_of"),
    *("max_tokens", "max_completion_tokens", "stream", "stream_options", "logit_bias"),
    *("top_logprobs", "response_format", "suffix"),
]


@settings(max_examples=300, deadline=None, database=None)
@given(
    path=st.sampled_from(sorted(REQUIRED)), body=st.dictionaries(st.sampled_from(BODY_FIELDS), JSON)
)
def test_bound_bounds(path: str, body: dict[str, Any]) -> None:
    """Whatever the body (made `plausible` or not), `bound` leaves no int field over its cap, no
    long text where prompts are made, and bounding twice changes nothing more."""
    plausible(path, body)  # does not fail on any body either
    bounded = bound(path, body)
    assert bound(path, bounded) == bounded
    caps = {
        "/chat/completions": {
            "n": MAX_CHOICES,
            "max_tokens": MAX_TOKENS,
            "max_completion_tokens": MAX_TOKENS,
        },
        "/completions": {"n": MAX_CHOICES, "best_of": MAX_CHOICES, "max_tokens": MAX_TOKENS},
        "/embeddings": {},
    }[path]
    for key, cap in caps.items():
        value = bounded.get(key)
        too_big = isinstance(value, int) and not isinstance(value, bool) and value > cap
        assert not too_big, (key, value)
    if path == "/chat/completions":
        assert (
            bounded.get("max_tokens") is not None
            or bounded.get("max_completion_tokens") is not None
        )
        assert (
            _longest(bounded.get("messages")) <= MAX_STRING
            and _longest(bounded.get("tools")) <= MAX_STRING
        )
    elif path == "/completions":
        assert bounded.get("max_tokens") is not None
        prompt = bounded.get("prompt")
        assert not isinstance(prompt, str) or len(prompt) <= MAX_STRING
        assert not isinstance(prompt, list) or len(prompt) <= MAX_PROMPT_TOKENS
    elif isinstance(bounded.get("input"), list) and len(body["input"]) <= 2048:
        assert len(bounded["input"]) <= MAX_EMBEDDING_INPUTS


def _longest(value: Any) -> int:
    """The longest string or list anywhere in `value`, by length."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return max([len(value), *(_longest(v) for v in value)])
    if isinstance(value, dict):
        return max([0, *(_longest(v) for v in value.values())])
    return 0
