"""`cria`: command line + CRIA_* environment -> Settings; build the engine and app; run uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from cria.errors import StartupError
from cria.settings import Settings, env_name, flags_of

log = logging.getLogger("cria")

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit code 2, no usage dump
        raise StartupError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cria",
        description="Serve a local GGUF model behind the OpenAI API, with continuous batching.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        flags = flags_of(name)
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        help_text = f"{field.description} [env: {env_name(name)}] (default: {default})"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif name == "lora_adapters":
            parser.add_argument(
                *flags, dest=name, nargs="+", action="extend", metavar="[NAME=]PATH[:SCALE]", help=help_text
            )
        else:
            parser.add_argument(*flags, dest=name, metavar=name.upper(), help=help_text)
    parser.formatter_class = argparse.HelpFormatter
    return parser


def _explain(exc: ValidationError, cli_names: set[str]) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else "?"
        where = "/".join(flags_of(name)) if name in cli_names else env_name(name)
        value = err.get("input")
        parts.append(f"{where}={value!r}: {err['msg']}")
    return "invalid option " + "; ".join(parts)


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Command line over CRIA_* environment over defaults. Raises StartupError naming the
    flag or the variable at fault."""
    args = vars(build_parser().parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        raise StartupError(_explain(exc, set(args))) from None


def _configure_logging(level: str, log_format: str = "text") -> None:
    from cria.telemetry.logs import configure_logging

    configure_logging(level, log_format)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        _configure_logging(settings.log_level, settings.log_format)
        from cria.models.spec import resolve_embedding_model, resolve_model

        spec = resolve_model(settings)
        embedding_spec = resolve_embedding_model(settings, spec)
    except StartupError as exc:
        print(f"cria: error: {exc}", file=sys.stderr)
        return 2
    return serve(settings, spec, embedding_spec)


# How long a Python thread may hold the GIL while another waits for it (Python's default: 5 ms).
# The engine thread wants the GIL back after every llama_decode; with the default it can wait up
# to 5 ms behind the event loop writing chunks, which caps short steps (small models, GPUs): 64
# streams of a tiny model on 2 cores ran 3x faster at 0.5 ms (bench/switch_interval.sh,
# bench/RESULTS.md); the bundled model at 8 and 16 streams was unchanged.
GIL_SWITCH_INTERVAL_S = 0.0005


def serve(settings: Settings, spec: Any, embedding_spec: Any = None) -> int:
    import uvicorn

    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))

    from cria.api.app import create_app
    from cria.engine.base import EngineBase, EngineConfig
    from cria.engine.engine import Engine
    from cria.engine.llama import library_version, supports_gpu_offload
    from cria.engine.remote import RemoteEngine
    from cria.engine.worker import WorkerSpec

    gpu_offload = settings.wants_gpu and supports_gpu_offload()
    if settings.wants_gpu and not gpu_offload:
        log.warning(
            "--use-gpu: this llama-cpp-python build has no GPU offload; running on the CPU. "
            "Install a CUDA build with CMAKE_ARGS=\"-DGGML_CUDA=on\" (or Metal on macOS: "
            "CMAKE_ARGS=\"-DGGML_METAL=on\") pip install --force-reinstall --no-cache-dir "
            "llama-cpp-python==%s",
            library_version(),
        )
    on_gpu = gpu_offload and settings.n_gpu_layers > 0
    config = EngineConfig(
        n_ctx_per_seq=settings.context_size,
        n_slots=settings.parallel,
        n_batch=max(settings.batch_size, settings.parallel),
        n_threads=settings.threads,
        max_queue=settings.max_queue,
        prompt_cache_bytes=settings.prompt_cache_mib * 1024 * 1024,
        overlap_text=settings.overlap_output == "on" or (settings.overlap_output == "auto" and on_gpu),
        adapters=tuple(spec.adapter_ids),
    )
    worker_spec = WorkerSpec(
        model=spec.path,
        n_gpu_layers=settings.n_gpu_layers,
        use_mmap=settings.prefer_mmap,
        config=config,
        embedding_model=None if embedding_spec is None else embedding_spec.path,
        log_level=settings.log_level,
        log_format=settings.log_format,
        switch_interval=sys.getswitchinterval(),
        tokenizer=spec.tokenizer,
        adapters=spec.adapters,
    )
    engine: EngineBase
    if settings.engine_process == "on" or (settings.engine_process == "auto" and on_gpu):
        engine = RemoteEngine(worker_spec, max_restarts=settings.engine_restarts)
    else:
        engine = Engine(
            worker_spec.load_model,
            config,
            load_embedding_model=None if embedding_spec is None else worker_spec.load_embedding_model,
        )
    app = create_app(settings, spec, engine, embedding_spec=embedding_spec)
    log.info("serving %s (%s) on http://%s:%d", spec.id, spec.path, settings.host, settings.port)
    for adapter in spec.adapters:
        log.info("serving LoRA adapter %s of %s (%s)", adapter.name, spec.id, adapter.path)
    if embedding_spec is not None:
        log.info("serving embeddings with %s (%s)", embedding_spec.id, embedding_spec.path)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's records go to the root handler, in --log-format
        access_log=False,  # the AccessLog middleware writes the one access line per request
        timeout_graceful_shutdown=5,
    )
    return 0
