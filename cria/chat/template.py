"""The model's own Jinja chat template (from the GGUF), rendered in a sandbox."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cria.errors import InvalidRequest


class _TemplateRaised(Exception):
    pass


# What a template's own code can raise on messages it does not expect (`'x' + none`, a filter
# given the wrong type, an index out of range, runaway recursion): the request gets a 400 naming
# the messages, never a 500. A GGUF's template is data, so its failures are the input's.
_RENDER_ERRORS = (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError)


def _for_template(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """A message as templates expect it: `content` a string. OpenAI allows an assistant message
    without content (or `content: null`); it means no text, and most templates concatenate
    `message['content']`. An assistant turn with `tool_calls` keeps a null content: templates
    that render calls tell "calls only" apart by `content is none`."""
    if message.get("content") is None and not message.get("tool_calls"):
        return {**message, "content": ""}
    return message


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """Renders OpenAI-style messages into a prompt string with the model's template.

    The template runs in Jinja's immutable sandbox: a GGUF is untrusted input.
    """

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        # A template that reads `tools` renders tool definitions itself (HF convention).
        self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        extra = {} if tools is None else {"tools": list(tools)}
        try:
            return self._template.render(
                messages=[_for_template(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except _TemplateRaised as exc:
            raise InvalidRequest(f"the model's chat template rejected the messages: {exc}", param="messages") from None
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"the model's chat template failed on these messages: {exc}", param="messages") from None
        except _RENDER_ERRORS as exc:
            raise InvalidRequest(
                f"the model's chat template failed on these messages: {type(exc).__name__}: {exc}",
                param="messages",
            ) from None
