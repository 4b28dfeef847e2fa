"""Generated request bodies made cheap (`bound`), aimed at the field a coverage case is about
(`aim`), and made to keep the rules between fields that a schema cannot state (`plausible`), for
tests/e2e/test_fuzz.py."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

from tests.e2e.conftest import MODEL_ID

MAX_TOKENS = 4
MAX_CHOICES = 2
MAX_EMBEDDING_INPUTS = 4
MAX_PROMPTS = 4  # prompts in one /v1/completions request
# Prompt processing is most of a bounded request's time (18 s for 1000 tokens of random text on
# a busy shared core): strings in messages, tools and prompts are cut, and so are their lists,
# and a chat body's messages and tools together hold at most MAX_PROMPT_BYTES of JSON (a token
# is at least a byte), trailing tools and then leading messages dropped to make it so.
MAX_STRING = 64
MAX_ITEMS = 3
MAX_PROMPT_BYTES = 800
MAX_PROMPT_TOKENS = 64
MAX_TEXT = 2000  # characters of one embedding input


def _cap(body: dict[str, Any], key: str, limit: int) -> None:
    """Lower an int field over `limit` to it; leave anything else (a violation) alone."""
    value = body.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        body[key] = limit


def _shorten(value: Any) -> Any:
    """`value` with every string in it cut to MAX_STRING characters and every list to MAX_ITEMS
    items (no schema in these fields sets a maximum length that this could undo)."""
    if isinstance(value, str):
        return value[:MAX_STRING]
    if isinstance(value, list):
        return [_shorten(v) for v in value[:MAX_ITEMS]]
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    return value


def _prompt_bytes(body: dict[str, Any]) -> int:
    parts = [body.get("messages"), body.get("tools")]
    return len(json.dumps(parts, ensure_ascii=False, default=repr).encode("utf-8", "surrogatepass"))


def bound(path: str, body: Any) -> Any:
    """A generated body made cheap and aimed at the served model (see the module docstring)."""
    if not isinstance(body, dict):
        return body
    body = copy.deepcopy(body)
    if isinstance(body.get("model"), str):
        body["model"] = MODEL_ID
    if path == "/chat/completions":
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            # Cria's default is the rest of the context: far too slow for thousands of cases.
            body["max_completion_tokens"] = MAX_TOKENS
        _cap(body, "max_tokens", MAX_TOKENS)
        _cap(body, "max_completion_tokens", MAX_TOKENS)
        _cap(body, "n", MAX_CHOICES)
        for key in ("messages", "tools"):
            if key in body:
                body[key] = _shorten(body[key])
        while _prompt_bytes(body) > MAX_PROMPT_BYTES:
            if isinstance(body.get("tools"), list) and body["tools"]:
                body["tools"].pop()
                if not body["tools"]:
                    del body["tools"]  # an empty list is a 400 of its own
            elif isinstance(body.get("messages"), list) and len(body["messages"]) > 1:
                body["messages"].pop(0)
            else:
                break
    elif path == "/completions":
        if body.get("max_tokens") is None:
            body["max_tokens"] = MAX_TOKENS
        _cap(body, "max_tokens", MAX_TOKENS)
        _cap(body, "n", MAX_CHOICES)
        _cap(body, "best_of", MAX_CHOICES)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            body["prompt"] = prompt[:MAX_STRING]
        elif (
            isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
        ):
            # Several prompts (a list of token ids is one).
            body["prompt"] = [
                p[: MAX_STRING if isinstance(p, str) else MAX_PROMPT_TOKENS]
                for p in prompt[:MAX_PROMPTS]
            ]
        elif isinstance(prompt, list):
            body["prompt"] = prompt[:MAX_PROMPT_TOKENS]
    elif path == "/embeddings":
        inputs = body.get("input")
        if isinstance(inputs, str):
            body["input"] = inputs[:MAX_TEXT]
        elif isinstance(inputs, list) and len(inputs) <= 2048:  # more: a 400 before any work
            body["input"] = [
                x[:MAX_TEXT] if isinstance(x, str) else x for x in inputs[:MAX_EMBEDDING_INPUTS]
            ]
    return body


# What a coverage case is about, from its description: the field a positive one varies, the
# field a negative one breaks, or the body as a whole (the violation is not in a field).
POSITIVE_FIELD = re.compile(r"^Object with valid '([^']+)' value")
NEGATIVE_FIELD = re.compile(r"^([A-Za-z_]+)(?: ->|:)")
WHOLE_BODY = re.compile(
    r"^(Missing required property|Unsupported Content-Type|Malformed Content-Type)"
)


def aim(body: Any, required: set[str], description: str, positive: bool) -> Any:
    """A coverage case (made on a template holding every top-level field) cut down to the
    required fields and the one it is about. Otherwise the template's other values (max_tokens 0,
    stream_options without stream, OpenAI-only fields) meet a 400 first, for every such case:
    the varied field is never judged, and a negative case's violation never gets past
    validation, where a 5xx could hide."""
    if not isinstance(body, dict):
        return body
    if WHOLE_BODY.match(description):
        keep = required
    else:
        match = (POSITIVE_FIELD if positive else NEGATIVE_FIELD).match(description)
        if match is None or match.group(1) not in body:
            return body
        keep = required | {match.group(1)}
    return {k: v for k, v in body.items() if k in keep}


VOCABULARY = 49152  # token ids of the bundled model (SmolLM2): others are a 400
INT_FIELDS = {
    "n",
    "best_of",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "top_logprobs",
    "logprobs",
}


def _integral(value: Any) -> Any:
    """2.0 -> 2: JSON Schema counts it an integer (the generator sends some), Cria's strict
    validation refuses it with a 400 (a difference from the spec, but not what this is after)."""
    return (
        int(value)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63
        else value
    )


def _token_id(value: Any) -> Any:
    return (
        abs(value) % VOCABULARY if isinstance(value, int) and not isinstance(value, bool) else value
    )


def plausible(path: str, body: Any) -> Any:
    """A valid body (of the honoured view) made to keep the rules between fields that a schema
    cannot state, which OpenAI has too (stream_options only with stream, top_logprobs only with
    logprobs, tool_choice naming a tool only with tools, tool messages answering earlier calls,
    best_of >= n and not streamed...), and Cria's few limits (logit_bias keys and prompt token
    ids in the vocabulary, json response formats without tools): with many fields in a case, one
    broken rule would otherwise make most of them a 400."""
    if not isinstance(body, dict):
        return body
    body = {k: _integral(v) if k in INT_FIELDS else v for k, v in copy.deepcopy(body).items()}
    if body.get("stream") is not True:
        body.pop("stream_options", None)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] < 1:
            del body[key]  # 0: a 400 (completions: but with echo), and `bound` sets its own
    if isinstance(body.get("logit_bias"), dict):
        bias = {}
        for key, value in body["logit_bias"].items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                digits = "".join(c for c in key if c in "0123456789")
                bias[str(int(digits or "0") % VOCABULARY)] = max(-100, min(100, int(value)))
        body["logit_bias"] = bias
    if path == "/completions":
        body.pop("suffix", None)  # fill-in-the-middle: the bundled model has no such tokens
        if body.get("prompt") is None or body["prompt"] == []:
            body["prompt"] = "<|endoftext|>"  # the spec's default for null, which Cria refuses
        elif isinstance(body["prompt"], list):
            body["prompt"] = [
                [_token_id(t) for t in p] if isinstance(p, list) else _token_id(p)
                for p in body["prompt"]
            ]
        if body.get("best_of") is not None and body.get("stream") is True:
            del body["best_of"]
        if isinstance(body.get("best_of"), int) and isinstance(body.get("n"), int):
            body["best_of"] = max(body["best_of"], body["n"], 1)
    elif path == "/chat/completions":
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            for key in ("tools", "tool_choice", "parallel_tool_calls"):
                body.pop(key, None)
        tools = body.get("tools")
        if isinstance(tools, list):
            named = {
                t["function"]["name"]: t
                for t in tools
                if isinstance(t, dict)
                and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str)
            }
            body["tools"] = list(named.values()) or None
        if not body.get("tools"):
            body.pop("tools", None)
            if body.get("tool_choice") != "none" and body.get("tool_choice") != "auto":
                body.pop("tool_choice", None)
        elif isinstance(body.get("tool_choice"), dict):
            body["tool_choice"] = "auto"  # it may name a function that is not among the tools
        body["messages"] = _answered(body.get("messages"))
    return body


def _answered(messages: Any) -> Any:
    """Tool messages kept only where they answer an earlier assistant tool call, and tool call
    arguments made JSON where they are not."""
    if not isinstance(messages, list):
        return messages
    calls: set[str] = set()
    kept = []
    for message in messages:
        if not isinstance(message, dict):
            kept.append(message)
            continue
        answers = message.get("tool_call_id")
        if message.get("role") == "tool" and (not isinstance(answers, str) or answers not in calls):
            continue
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict):
                if isinstance(call.get("id"), str):
                    calls.add(call["id"])
                function = call.get("function")
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        json.loads(function["arguments"])
                    except ValueError:
                        function["arguments"] = "{}"
        kept.append(message)
    return kept or [{"role": "user", "content": "Hi"}]
