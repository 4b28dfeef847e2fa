"""Every option of Cria, spelled once: flag, CRIA_ variable, default, bounds and help.

The command line is generated from these fields (see `cli.py`); the environment is read by
pydantic-settings with the `CRIA_` prefix. The command line wins over the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CRIA_"


def _opt(*flags: str, help: str, **kwargs: Any) -> Any:
    """A settings field with its command-line flags kept beside it."""
    return Field(json_schema_extra={"flags": list(flags)}, description=help, **kwargs)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cria, else ~/.cache/cria."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "cria"


def default_threads() -> int:
    """One compute thread per core this process may run on.

    llama.cpp's workers spin while they wait, so more threads than cores is 10-100x slower.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # --- the original options (a contract) ---
    model_architecture: str = _opt(
        "-a",
        "--model-architecture",
        default="llama",
        help="Expected model architecture; checked against the GGUF's general.architecture.",
    )
    model: Path | None = _opt(
        "--model",
        default=None,
        help="Path to a GGUF model, or a legacy GGML .bin (ggjt/ggmf/ggml, llama only), converted "
        "once to GGUF in --cache-dir. Default: the bundled SmolLM2-135M-Instruct.",
    )
    tokenizer_path: Path | None = _opt(
        "-v",
        "--tokenizer-path",
        default=None,
        help="A tokenizer.json, or a Hugging Face model folder (tokenizer.json, "
        "tokenizer_config.json with its chat template, config.json). It replaces the GGUF's own "
        "tokenizer and chat template; for a GGML .bin it gives the vocabulary and, with a "
        "config.json, the hyperparameters the file lacks.",
    )
    tokenizer_repository: str | None = _opt(
        "-r",
        "--tokenizer-repository",
        default=None,
        help="A Hugging Face repository id whose tokenizer is used as with -v, from the Hugging "
        "Face cache (downloaded into it when online; HF_HUB_OFFLINE is honoured).",
    )
    host: str = _opt("-H", "--host", default="0.0.0.0", help="Address to listen on.")
    port: int = _opt("-p", "--port", default=3000, ge=0, le=65535, help="Port to listen on.")
    prefer_mmap: bool = _opt(
        "-m", "--prefer-mmap", default=True, help="Memory-map the model file instead of reading it."
    )
    context_size: int = _opt(
        "-c",
        "--context-size",
        default=2048,
        ge=16,
        le=1 << 20,
        help="Context size of each slot, in tokens (prompt + completion).",
    )
    lora_adapters: Annotated[list[str] | None, NoDecode] = _opt(
        "-l",
        "--lora-adapters",
        default=None,
        help="LoRA adapters, each served as its own model id: [NAME=]PATH[:SCALE], PATH a GGUF "
        "LoRA or a PEFT folder (adapter_config.json + adapter_model.safetensors, converted once "
        "in --cache-dir). NAME defaults to the file's stem or the folder's name, SCALE to 1. "
        "Several after one -l; in CRIA_LORA_ADAPTERS comma-separated or a JSON list.",
    )
    use_gpu: bool = _opt(
        "-u", "--use-gpu", default=False, help="Offload layers to the GPU (CUDA or Metal build)."
    )
    gpu_layers: int | None = _opt(
        "-g",
        "--gpu-layers",
        default=None,
        ge=0,
        help="Layers to offload to the GPU (implies --use-gpu). Default with --use-gpu: all.",
    )
    n_gqa: int | None = _opt(
        "--n-gqa",
        default=None,
        ge=1,
        help="For a GGML .bin: the grouped-query attention factor, n_head / n_head_kv (8 for "
        "Llama-2 70B), which GGML headers lack. Ignored with a warning for a GGUF (it carries it).",
    )
    zipkin_endpoint: str | None = _opt(
        "-z", "--zipkin-endpoint", default=None, help="Zipkin v2 JSON endpoint to export traces to, e.g. http://127.0.0.1:9411/api/v2/spans. Default: no tracing."
    )

    # --- Cria's own options ---
    cache_dir: Path = _opt(
        "--cache-dir",
        default_factory=lambda: default_cache_dir(),
        help="Where converted files go (GGML models, PEFT adapters), each converted once and "
        "converted again when its source changes.",
    )
    service_name: str = _opt(
        "--service-name",
        default="cria",
        help="The OpenTelemetry service.name of exported spans (with --zipkin-endpoint).",
    )
    parallel: int = _opt(
        "--parallel", default=4, ge=1, le=256, help="Number of slots: sequences decoded together."
    )
    threads: int = _opt(
        "--threads",
        default_factory=default_threads,
        ge=1,
        le=1024,
        help="Compute threads for llama.cpp. Default: the number of usable cores.",
    )
    batch_size: int = _opt(
        "--batch-size",
        default=512,
        ge=16,
        le=1 << 16,
        help="Most tokens decoded in one step (running sequences + prompt chunks).",
    )
    max_queue: int = _opt(
        "--max-queue",
        default=256,
        ge=0,
        help="Requests allowed to wait for a slot; past this the server answers 429.",
    )
    embedding_model: Path | None = _opt(
        "--embedding-model",
        default=None,
        help="Path to a GGUF served for /v1/embeddings beside the chat model (its id is the "
        "file's stem). Default: the chat model makes the embeddings (mean pooling).",
    )
    model_alias: str | None = _opt(
        "--model-alias", default=None, help="Model id shown in /v1/models and accepted in requests."
    )
    prompt_cache_mib: int = _opt(
        "--prompt-cache-mib",
        default=256,
        ge=0,
        help="Host memory for the KV state of prompts evicted from slots, reused when they come "
        "back (0: off).",
    )
    max_body_bytes: int = _opt(
        "--max-body-bytes",
        default=8 * 1024 * 1024,
        ge=1024,
        help="Largest request body accepted; larger bodies get 413.",
    )
    log_level: str = _opt("--log-level", default="info", help="Log level: debug, info, warning, error.")
    log_format: str = _opt(
        "--log-format",
        default="text",
        help="Log format: text (one line per record) or json (one JSON object per line).",
    )
    overlap_output: str = _opt(
        "--overlap-output",
        default="auto",
        help="Work out each step's output (detokenizing, stop strings, the hand-off to the HTTP "
        "side) while the next step decodes: auto, on or off. auto: on when layers are offloaded "
        "to a GPU, where llama_decode returns before the GPU has finished; off on the CPU, where "
        "it would delay every token by one step.",
    )
    engine_process: str = _opt(
        "--engine-process",
        default="auto",
        help="Run the engine in a process of its own, so that it never waits for the GIL while "
        "the HTTP side writes responses: auto, on or off. auto: on when layers are offloaded to "
        "a GPU.",
    )
    engine_restarts: int = _opt(
        "--engine-restarts",
        default=3,
        ge=0,
        help="With the engine in its own process: when that process dies (a crash in llama.cpp or "
        "the GPU driver), start it again, at most this many times in 10 minutes (0: never). "
        "Requests in flight get an error event or a 503; new ones get 503 until it is ready.",
    )
    lenient: bool = _opt(
        "--lenient",
        default=False,
        help="Accept request fields this server does not honour (unknown ones, or OpenAI ones "
        "such as audio output) instead of refusing them with 400; each response lists them "
        "in its x-cria-ignored-params header.",
    )

    @field_validator(
        "model",
        "embedding_model",
        "tokenizer_path",
        "tokenizer_repository",
        "zipkin_endpoint",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def _split_adapters(cls, value: object) -> object:
        """The environment gives one string: a JSON list, or entries separated by commas."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except ValueError:
                    raise ValueError("not a valid JSON list") from None
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, list) and not value:
            return None
        return value

    @field_validator("service_name")
    @classmethod
    def _check_service_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("must be one of debug, info, warning, error, critical")
        return value

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in {"text", "json"}:
            raise ValueError("must be text or json")
        return value

    @field_validator("overlap_output", "engine_process")
    @classmethod
    def _check_auto_on_off(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in {"auto", "on", "off"}:
            raise ValueError("must be auto, on or off")
        return value

    @field_validator("model_architecture")
    @classmethod
    def _check_arch(cls, value: str) -> str:
        value = value.strip().lower()
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("zipkin_endpoint")
    @classmethod
    def _check_zipkin(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @property
    def n_gpu_layers(self) -> int:
        """Layers to offload: --gpu-layers if given, else all with --use-gpu, else none."""
        if self.gpu_layers is not None:
            return self.gpu_layers
        return 999 if self.use_gpu else 0

    @property
    def wants_gpu(self) -> bool:
        return self.use_gpu or bool(self.gpu_layers)


def flags_of(name: str) -> list[str]:
    extra = Settings.model_fields[name].json_schema_extra
    assert isinstance(extra, dict)
    flags = extra["flags"]
    assert isinstance(flags, list)
    return [str(f) for f in flags]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()
