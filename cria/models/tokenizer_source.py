"""Where an external tokenizer's files come from: `-v PATH` (a tokenizer.json or a Hugging Face
model folder) or `-r REPO_ID` (a Hugging Face repository, through huggingface_hub's cache).

Only the few small tokenizer files are fetched from a repository, never its weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cria.errors import StartupError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CONFIG_JSON = "config.json"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Recent transformers save the chat template beside tokenizer_config.json instead of inside it.
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
HUB_FILES = (
    TOKENIZER_JSON, TOKENIZER_CONFIG, CONFIG_JSON, SPECIAL_TOKENS_MAP, GENERATION_CONFIG,
    CHAT_TEMPLATE_JINJA, CHAT_TEMPLATE_JSON,
)

# huggingface_hub's truthy environment values (constants.ENV_VARS_TRUE_VALUES).
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True, slots=True)
class TokenizerSource:
    """The files of an external tokenizer. Only `tokenizer_json` is required; `origin` is the
    option that named them (`-v PATH` / `-r REPO`), for error messages."""

    tokenizer_json: Path
    tokenizer_config: Path | None
    config_json: Path | None
    origin: str
    generation_config: Path | None = None
    special_tokens_map: Path | None = None
    chat_template_file: Path | None = None  # chat_template.jinja or chat_template.json


def _from_folder(folder: Path, origin: str) -> TokenizerSource:
    def optional(name: str) -> Path | None:
        path = folder / name
        return path if path.is_file() else None

    tokenizer_json = folder / TOKENIZER_JSON
    if not tokenizer_json.is_file():
        slow = [n for n in ("tokenizer.model", "vocab.json") if (folder / n).is_file()]
        hint = f" (only {', '.join(slow)}: slow tokenizers are not supported)" if slow else ""
        raise StartupError(f"{origin}: no {TOKENIZER_JSON} in {folder}{hint}")
    return TokenizerSource(
        tokenizer_json=tokenizer_json,
        tokenizer_config=optional(TOKENIZER_CONFIG),
        config_json=optional(CONFIG_JSON),
        origin=origin,
        generation_config=optional(GENERATION_CONFIG),
        special_tokens_map=optional(SPECIAL_TOKENS_MAP),
        chat_template_file=optional(CHAT_TEMPLATE_JINJA) or optional(CHAT_TEMPLATE_JSON),
    )


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, by its own rules (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub), read now: its
    `constants` were read when it was first imported, maybe before the environment was set."""

    def expand(value: str) -> str:
        return os.path.expandvars(os.path.expanduser(value))

    home = expand(
        os.environ.get("HF_HOME")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    )
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(expand(cache) if cache else os.path.join(home, "hub"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _from_repo(repo: str) -> TokenizerSource:
    # Imported here: huggingface_hub is slow to import and only `-r` needs it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    origin = f"-r {repo}"
    cache = hub_cache_dir()
    not_cached = (
        f"{origin}: not in the Hugging Face cache at {cache}; run once online or pass -v FOLDER"
    )
    try:
        # Online, this fetches only the tokenizer files; offline (HF_HUB_OFFLINE) or when the
        # hub cannot be reached, huggingface_hub answers from the cache alone.
        folder = snapshot_download(
            repo, allow_patterns=list(HUB_FILES), cache_dir=cache, local_files_only=hub_offline()
        )
    except HFValidationError as exc:
        raise StartupError(f"{origin}: not a Hugging Face repository id ({exc})") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise StartupError(f"{origin}: the Hugging Face hub refused it: {_first_line(exc)}") from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        # Also IncompleteSnapshotError: a cached snapshot that lacks some of the files.
        raise StartupError(not_cached) from None
    except Exception as exc:  # HfHubHTTPError, OSError, httpx's errors mid-download...
        raise StartupError(
            f"{origin}: cannot fetch it from the Hugging Face hub: {_first_line(exc)}"
        ) from None
    path = Path(folder)
    if not (path / TOKENIZER_JSON).is_file():
        raise StartupError(
            f"{origin}: the repository has no {TOKENIZER_JSON} (only slow tokenizers?); "
            "pass -v with a folder that has one"
        )
    return _from_folder(path, origin)


def resolve_tokenizer(path: Path | None, repo: str | None) -> TokenizerSource | None:
    """The external tokenizer `-v PATH` or `-r REPO_ID` names, or None when neither is given.

    `-v` may name a tokenizer.json itself (then there is no tokenizer_config.json: no chat
    template or add_bos_token from it) or a folder holding one; `-r` goes through
    huggingface_hub's cache, honouring HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE."""
    if path is not None and repo is not None:
        raise StartupError(
            "-v/--tokenizer-path and -r/--tokenizer-repository both give a tokenizer: pass one"
        )
    if path is not None:
        origin = f"-v {path}"
        path = path.expanduser()
        if path.is_dir():
            return _from_folder(path, origin)
        if path.is_file():
            return TokenizerSource(
                tokenizer_json=path, tokenizer_config=None, config_json=None, origin=origin
            )
        raise StartupError(f"{origin}: no such file or folder")
    if repo is not None:
        if not repo.strip():
            raise StartupError("-r: empty Hugging Face repository id")
        return _from_repo(repo.strip())
    return None
