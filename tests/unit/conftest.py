"""Shared fixtures for the unit tests: pure logic, no llama.cpp, no server."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_cria_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read CRIA_* variables: a developer's own environment must not leak into tests."""
    for name in list(os.environ):
        if name.upper().startswith("CRIA_"):
            monkeypatch.delenv(name)
