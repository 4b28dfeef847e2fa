"""The pre-encoded hot-path chunk is byte-identical to encoding the chunk dict."""

from __future__ import annotations

import json

import pytest

from cria.api import protocol
from cria.api.errors import dumps

TEXTS = ["", "hello", 'a "quoted" \\ back\\slash', "line\nbreak\ttab", "é 漢字 🦙", "\x00\x1f", "987654321", '"index":1']


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("index", [0, 7, 127])
def test_completion_text_chunk(text: str, index: int) -> None:
    def sample(i: int, t: str) -> dict[str, object]:
        return protocol.completion("cmpl-987654321", 987654321, "m\"odel", [protocol.completion_choice(i, t, None)], None)

    assert protocol.TextChunk(sample)(index, text) == dumps(sample(index, text))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_usage", [False, True])
def test_chat_text_chunk(text: str, with_usage: bool) -> None:
    def sample(i: int, t: str) -> dict[str, object]:
        return protocol.chat_chunk(
            "chatcmpl-x", 1, "m", [protocol.chat_chunk_choice(i, {"content": t})], with_usage=with_usage
        )

    encoded = protocol.TextChunk(sample)(3, text)
    assert encoded == dumps(sample(3, text))
    assert json.loads(encoded)["choices"][0]["delta"]["content"] == text
