"""resolve_model: find and check the model (a hand-written GGUF, or the bundled one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cria.errors import StartupError
from cria.models.gguf import is_gguf
from cria.models.spec import (
    BUNDLED_FILE,
    BUNDLED_ID,
    CHATML_TEMPLATE,
    bundled_model_path,
    resolve_embedding_model,
    resolve_model,
)
from cria.settings import Settings

from ._gguf import gguf_bytes, model_pairs, write_gguf


def settings(**kwargs: object) -> Settings:
    return Settings(**kwargs)  # type: ignore[arg-type]


def test_a_valid_model_is_described(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny-model.gguf", model_pairs(chat_template="{{ x }}"))
    spec = resolve_model(settings(model=path))
    assert spec.path == path
    assert spec.id == "tiny-model"  # the file's stem
    assert spec.architecture == "llama"
    assert spec.n_ctx_train == 4096
    assert spec.chat_template == "{{ x }}"
    assert spec.has_chat_template
    # The token list (100 > 64 entries) is kept so that BOS/EOS texts can be looked up.
    assert spec.bos_text == "<s>"
    assert spec.eos_text == "</s>"


def test_model_alias_replaces_the_id(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", model_pairs())
    assert resolve_model(settings(model=path, model_alias="my-model")).id == "my-model"


def test_missing_chat_template_falls_back_to_chatml(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", model_pairs(chat_template=None))
    spec = resolve_model(settings(model=path))
    assert spec.chat_template == CHATML_TEMPLATE
    assert not spec.has_chat_template


def test_empty_chat_template_falls_back_to_chatml(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", model_pairs(chat_template=""))
    spec = resolve_model(settings(model=path))
    assert spec.chat_template == CHATML_TEMPLATE
    assert not spec.has_chat_template


def test_missing_or_out_of_range_special_tokens_give_empty_text(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", model_pairs(bos=None, eos=5000, context_length=None))
    spec = resolve_model(settings(model=path))
    assert spec.bos_text == ""
    assert spec.eos_text == ""
    assert spec.n_ctx_train is None


def test_architecture_is_compared_case_insensitively(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", model_pairs(arch="Qwen2"))
    spec = resolve_model(settings(model=path, model_architecture=" QWEN2 "))
    assert spec.architecture == "qwen2"


def test_architecture_mismatch(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", model_pairs(arch="qwen2"))
    with pytest.raises(StartupError) as info:
        resolve_model(settings(model=path))  # default -a llama
    message = str(info.value)
    assert "'llama'" in message and "'qwen2'" in message
    assert "-a qwen2" in message


def test_model_without_architecture_is_a_mismatch(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", [])
    with pytest.raises(StartupError, match="general.architecture ''"):
        resolve_model(settings(model=path))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.gguf"
    with pytest.raises(StartupError, match="no such file") as info:
        resolve_model(settings(model=path))
    assert str(path) in str(info.value)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="not a file"):
        resolve_model(settings(model=tmp_path))


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"ggml" + bytes(100))
    with pytest.raises(StartupError, match="not a GGUF file"):
        resolve_model(settings(model=path))


def test_truncated_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_bytes(model_pairs())[:60])
    with pytest.raises(StartupError, match="cannot read GGUF metadata: truncated"):
        resolve_model(settings(model=path))


def test_bundled_model_is_found_through_package_metadata() -> None:
    path = bundled_model_path()
    assert path.name == BUNDLED_FILE
    assert path.is_file()
    assert is_gguf(path)


def test_no_model_option_resolves_the_bundled_model() -> None:
    spec = resolve_model(settings())
    assert spec.id == BUNDLED_ID
    assert spec.path == bundled_model_path()
    assert spec.architecture == "llama"
    assert spec.n_ctx_train == 8192
    assert spec.has_chat_template
    assert spec.bos_text == "<|im_start|>"
    assert spec.eos_text == "<|im_end|>"


def test_bundled_model_with_the_wrong_architecture() -> None:
    with pytest.raises(StartupError, match="pass -a llama"):
        resolve_model(settings(model_architecture="qwen2"))


def test_embedding_model_is_optional(tmp_path: Path) -> None:
    chat = resolve_model(settings(model=write_gguf(tmp_path / "chat.gguf", model_pairs())))
    assert resolve_embedding_model(settings(), chat) is None


def test_embedding_model_of_any_architecture(tmp_path: Path) -> None:
    chat = resolve_model(settings(model=write_gguf(tmp_path / "chat.gguf", model_pairs())))
    path = write_gguf(tmp_path / "my-embedder.gguf", model_pairs(arch="bert"))
    spec = resolve_embedding_model(settings(embedding_model=path), chat)
    assert spec is not None
    assert (spec.id, spec.path, spec.architecture) == ("my-embedder", path, "bert")


def test_embedding_model_problems_name_the_flag(tmp_path: Path) -> None:
    chat = resolve_model(settings(model=write_gguf(tmp_path / "chat.gguf", model_pairs())))
    not_gguf = tmp_path / "e.bin"
    not_gguf.write_bytes(b"ggml" + b"\0" * 64)
    for path in (tmp_path / "missing.gguf", tmp_path, not_gguf):
        with pytest.raises(StartupError, match="--embedding-model"):
            resolve_embedding_model(settings(embedding_model=path), chat)


def test_embedding_model_id_must_differ_from_the_chat_model(tmp_path: Path) -> None:
    chat = resolve_model(settings(model=write_gguf(tmp_path / "chat.gguf", model_pairs())))
    other = tmp_path / "other"
    other.mkdir()
    same_stem = write_gguf(other / "chat.gguf", model_pairs())
    with pytest.raises(StartupError, match="--embedding-model"):
        resolve_embedding_model(settings(embedding_model=same_stem), chat)
