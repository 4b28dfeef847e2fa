"""What the original options bring besides a GGUF: a legacy GGML `.bin` (converted once to GGUF
in --cache-dir), an external tokenizer (-v/-r) and LoRA adapters (-l). Everything here runs at
start-up, before llama.cpp sees a file, and fails with one StartupError naming the option.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cria.engine.types import AdapterFile
from cria.errors import StartupError
from cria.settings import Settings

log = logging.getLogger("cria.models")


def _read_json(path: Path | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StartupError(f"{what} {path}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StartupError(f"{what} {path}: not a JSON object")
    return data


def tokenizer_source(settings: Settings) -> Any:
    """The -v/-r tokenizer (a TokenizerSource), or None."""
    if settings.tokenizer_path is None and settings.tokenizer_repository is None:
        return None
    from cria.models.tokenizer import resolve_tokenizer

    path = settings.tokenizer_path.expanduser() if settings.tokenizer_path else None
    return resolve_tokenizer(path, settings.tokenizer_repository)


def convert_legacy(settings: Settings, path: Path, fmt: str) -> tuple[Path, Any]:
    """Convert a GGML `.bin` to GGUF in the cache (once); returns (GGUF path, None): the
    tokenizer, if any, is written into the GGUF, so nothing stands in for it at run time."""
    from cria.models.ggml import convert_ggml
    from cria.models.ggml_vocab import read_hf_vocab
    from cria.models.lora_base import missing_data

    if settings.model_architecture != "llama":
        raise StartupError(
            f"--model {path}: a GGML file ({fmt}) carries no architecture and only llama ones "
            f"can be converted; --model-architecture {settings.model_architecture!r} is not llama"
        )
    source = tokenizer_source(settings)
    vocab = hf_config = template = None
    if source is not None:
        vocab = read_hf_vocab(source.tokenizer_json)
        hf_config = _read_json(source.config_json, "config.json")
        tok_config = _read_json(source.tokenizer_config, "tokenizer_config.json") or {}
        template = _template_of(tok_config)
    log.info("--model %s is a GGML file (%s): served as GGUF from %s", path, fmt, settings.cache_dir)
    for attempt in range(2):
        gguf = convert_ggml(
            path,
            settings.cache_dir,
            n_gqa=settings.n_gqa,
            hf_config=hf_config,
            vocab=vocab,
            chat_template=template,
            architecture="llama",
        )
        problem = missing_data(gguf)
        if problem is None:
            break
        # A converted file damaged since (a full disk, a truncating copy): convert again.
        log.warning("%s: %s; converting %s again", gguf, problem, path.name)
        if attempt == 0:
            gguf.unlink(missing_ok=True)
    return gguf, None


def _template_of(tok_config: dict[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def lora_adapters(settings: Settings, base: Path, reserved: set[str]) -> tuple[AdapterFile, ...]:
    """Check (and convert PEFT folders of) the -l adapters; their names must not be a served
    model's id."""
    if not settings.lora_adapters:
        return ()
    from cria.models.lora import parse_adapter_list, prepare_adapters

    entries = parse_adapter_list(settings.lora_adapters)
    for entry in entries:
        if entry.name in reserved:
            raise StartupError(
                f"--lora-adapters {entry.path}: its name '{entry.name}' is a served model's id; "
                f"name it with NAME={entry.path}"
            )
    infos = prepare_adapters(entries, base, settings.cache_dir.expanduser())
    for info in infos:
        log.info(
            "LoRA adapter '%s': %s (rank %s, alpha %s, scale %s, %s tensors)",
            info.name, info.path, info.rank, info.alpha, info.scale, info.n_tensors,
        )
    return tuple(AdapterFile(name=i.name, path=i.path, scale=i.scale) for i in infos)
