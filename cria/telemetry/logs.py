"""Logging: the text or JSON format of every record, and the access line of each HTTP request.

The access line is written by the `AccessLog` middleware (`api/middleware.py`) to the
`cria.access` logger. The generation routes fill the request's `AccessRecord` (found through a
context variable the middleware sets) once per finished sequence: O(1), nothing per token, and
nothing in the engine.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from cria.engine.types import Timings, Usage

ACCESS_LOGGER = "cria.access"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The fields of an access line, in order (also the keys of a JSON access record).
ACCESS_FIELDS = (
    "request_id",
    "method",
    "route",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "total_ms",
)

# The reserved attribute of a LogRecord that carries an access line's fields.
ACCESS_ATTR = "access"


class AccessRecord:
    """What the routes tell the access log about one HTTP request: tokens summed over its
    sequences, and the earliest first token and submission (TTFT of the first sequence)."""

    __slots__ = ("completion_tokens", "first_token", "prompt_tokens", "submitted")

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.submitted: float | None = None
        self.first_token: float | None = None

    def add_sequence(self, usage: Usage, timings: Timings) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        if self.submitted is None or timings.submitted < self.submitted:
            self.submitted = timings.submitted
        if self.first_token is None or timings.first_token < self.first_token:
            self.first_token = timings.first_token

    @property
    def ttft_ms(self) -> float | None:
        if self.submitted is None or self.first_token is None:
            return None
        return round((self.first_token - self.submitted) * 1000.0, 1)


current_access: ContextVar[AccessRecord | None] = ContextVar("cria_access", default=None)


def note_sequence(usage: Usage, timings: Timings) -> None:
    """Add a finished sequence to the current HTTP request's access line (if any)."""
    record = current_access.get()
    if record is not None:
        record.add_sequence(usage, timings)


def access_text(fields: dict[str, Any]) -> str:
    """The message of an access line in the text format: `key=value` pairs, a missing value
    (None) left empty."""
    return " ".join(
        f"{key}={'' if fields.get(key) is None else fields[key]}" for key in ACCESS_FIELDS
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, ms), level, logger, message, the
    access fields as keys for access lines, and the traceback as `exception` if any."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        millis = int(record.created * 1000) % 1000
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, ACCESS_ATTR, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def make_handler(log_format: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger's level and its one handler in the chosen format (a no-op if the root
    logger already has handlers, like logging.basicConfig). uvicorn's loggers propagate to it
    (`uvicorn.run(log_config=None)`), so every record has the same format."""
    logging.basicConfig(level=level.upper(), handlers=[make_handler(log_format)])
