"""Shared by the LoRA file tests (their fixtures `base` and `tiny` are in conftest.py): the
modules the converter maps and readers of what a conversion wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader

from cria.errors import StartupError
from tests.lora_fixtures import HF_MODULES

ALL_HF = tuple(HF_MODULES)  # every module the converter maps
LAYER_HF = tuple(m for m in HF_MODULES if m not in ("embed_tokens", "lm_head"))
LAYERS = (0, 13, 29)


def _tensors(path: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    return {
        t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.array(t.data))
        for t in GGUFReader(path).tensors
    }


def _kv(path: Path) -> dict[str, Any]:
    fields = GGUFReader(path).fields
    return {k: fields[k].contents() for k in fields if not k.startswith("GGUF.")}


def _error(excinfo: pytest.ExceptionInfo[StartupError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


