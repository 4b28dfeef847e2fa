"""Shared fixtures for the unit tests: pure logic, no llama.cpp, no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cria.models.spec import bundled_model_path
from tests.lora_fixtures import make_tiny_base


@pytest.fixture(autouse=True)
def _clean_cria_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read CRIA_* variables: a developer's own environment must not leak into tests."""
    for name in list(os.environ):
        if name.upper().startswith("CRIA_"):
            monkeypatch.delenv(name)


# ---- LoRA file tests (test_lora_files.py, test_lora_peft.py): base models to check against ----


@pytest.fixture(scope="module")
def base() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untied llama (the bundled model ties output to token_embd): for embed_tokens and
    lm_head adapters, and other head counts (4 and 2, not 9 and 3)."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
