"""Log formats (text and JSON), the access line, and the per-request access record."""

from __future__ import annotations

import json
import logging
import sys

from cria.api.middleware import request_id_of
from cria.engine.types import Timings, Usage
from cria.telemetry.logs import (
    ACCESS_ATTR,
    ACCESS_FIELDS,
    AccessRecord,
    JsonFormatter,
    access_text,
    current_access,
    make_handler,
    note_sequence,
)

FIELDS = {
    "request_id": "0123456789ab",
    "method": "POST",
    "route": "/v1/chat/completions",
    "status": 200,
    "prompt_tokens": 31,
    "completion_tokens": 8,
    "ttft_ms": 12.5,
    "total_ms": 80.25,
}


def _record(msg: str, *, name: str = "cria.access", extra: dict[str, object] | None = None) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)
    for key, value in (extra or {}).items():
        setattr(record, key, value)
    return record


def test_access_text_has_every_field_in_order() -> None:
    assert access_text(FIELDS) == (
        "request_id=0123456789ab method=POST route=/v1/chat/completions status=200 "
        "prompt_tokens=31 completion_tokens=8 ttft_ms=12.5 total_ms=80.25"
    )


def test_access_text_leaves_a_missing_ttft_empty() -> None:
    text = access_text({**FIELDS, "route": "/nope", "status": 404, "prompt_tokens": 0, "completion_tokens": 0, "ttft_ms": None})
    assert " ttft_ms= total_ms=80.25" in text
    assert "route=/nope status=404 prompt_tokens=0 completion_tokens=0" in text


def test_text_handler_line() -> None:
    handler = make_handler("text")
    line = handler.format(_record(access_text(FIELDS), extra={ACCESS_ATTR: FIELDS}))
    assert line.endswith(" INFO cria.access: " + access_text(FIELDS))
    assert "\n" not in line


def test_json_formatter_access_record() -> None:
    line = JsonFormatter().format(_record(access_text(FIELDS), extra={ACCESS_ATTR: FIELDS}))
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "INFO" and out["logger"] == "cria.access"
    assert out["message"] == access_text(FIELDS)
    for key in ACCESS_FIELDS:
        assert out[key] == FIELDS[key]
    assert out["time"].endswith("Z") and out["time"][10] == "T"


def test_json_formatter_plain_record_with_args_and_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    record = logging.LogRecord("cria", logging.WARNING, __file__, 1, "hello %s\nworld", ("x",), exc)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "hello x\nworld"
    assert out["level"] == "WARNING" and out["logger"] == "cria"
    assert "ValueError: boom" in out["exception"]
    assert "status" not in out
    assert make_handler("json").formatter.__class__ is JsonFormatter


def test_access_record_sums_tokens_and_takes_the_first_ttft() -> None:
    record = AccessRecord()
    assert record.ttft_ms is None
    record.add_sequence(Usage(10, 5), Timings(100.0, 100.1, 100.25, 101.0, 5))
    record.add_sequence(Usage(10, 7), Timings(100.0, 100.1, 100.5, 101.0, 7))
    assert (record.prompt_tokens, record.completion_tokens) == (20, 12)
    assert record.ttft_ms == 250.0


def test_note_sequence_fills_the_current_record_only() -> None:
    note_sequence(Usage(1, 1), Timings(0.0, 0.0, 0.0, 0.0, 1))  # no request: ignored
    record = AccessRecord()
    token = current_access.set(record)
    try:
        note_sequence(Usage(3, 4), Timings(1.0, 1.0, 1.002, 1.5, 4))
    finally:
        current_access.reset(token)
    assert (record.prompt_tokens, record.completion_tokens, record.ttft_ms) == (3, 4, 2.0)


def test_request_id_honours_a_sane_header_and_replaces_others() -> None:
    assert request_id_of([(b"x-request-id", b"abc-123.X")]) == "abc-123.X"
    for bad in (b"", b"a b", b"x" * 200, b"\xff\xfe", b"a\nb"):
        rid = request_id_of([(b"x-request-id", bad)])
        assert len(rid) == 12 and int(rid, 16) >= 0
    assert request_id_of([]) != request_id_of([])
