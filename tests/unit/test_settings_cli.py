"""load_settings: command line over CRIA_* environment over defaults; errors name the culprit."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cria.cli import build_parser, load_settings, main
from cria.errors import StartupError
from cria.settings import Settings, default_threads, env_name, flags_of

# One valid value per field: (raw text for the env var / flag, expected parsed value).
# Bools are set with their flag alone (--x / --no-x); lists take several words on the command line.
VALID: dict[str, tuple[str, Any]] = {
    "model_architecture": ("Mistral", "mistral"),
    "model": ("/models/x.gguf", Path("/models/x.gguf")),
    "tokenizer_path": ("tok.json", Path("tok.json")),
    "tokenizer_repository": ("org/repo", "org/repo"),
    "host": ("127.0.0.1", "127.0.0.1"),
    "port": ("8080", 8080),
    "prefer_mmap": ("false", False),
    "context_size": ("4096", 4096),
    "lora_adapters": ('["a.gguf", "b=./b:0.5"]', ["a.gguf", "b=./b:0.5"]),
    "use_gpu": ("true", True),
    "gpu_layers": ("12", 12),
    "n_gqa": ("8", 8),
    "zipkin_endpoint": ("http://zipkin:9411", "http://zipkin:9411"),
    "parallel": ("8", 8),
    "threads": ("3", 3),
    "batch_size": ("1024", 1024),
    "max_queue": ("0", 0),
    "model_alias": ("gpt-x", "gpt-x"),
    "embedding_model": ("/models/e.gguf", Path("/models/e.gguf")),
    "max_body_bytes": ("2048", 2048),
    "prompt_cache_mib": ("64", 64),
    "log_level": ("WARNING", "warning"),
    "log_format": ("JSON", "json"),
    "lenient": ("true", True),
    "overlap_output": ("ON", "on"),
    "engine_process": ("Off", "off"),
    "engine_restarts": ("0", 0),
    "cache_dir": ("/var/cache/cria", Path("/var/cache/cria")),
    "service_name": ("cria-prod", "cria-prod"),
}

# The original options are a contract: their flags must not change.
CONTRACT_FLAGS = {
    "model_architecture": ["-a", "--model-architecture"],
    "model": ["--model"],
    "tokenizer_path": ["-v", "--tokenizer-path"],
    "tokenizer_repository": ["-r", "--tokenizer-repository"],
    "host": ["-H", "--host"],
    "port": ["-p", "--port"],
    "prefer_mmap": ["-m", "--prefer-mmap"],
    "context_size": ["-c", "--context-size"],
    "lora_adapters": ["-l", "--lora-adapters"],
    "use_gpu": ["-u", "--use-gpu"],
    "gpu_layers": ["-g", "--gpu-layers"],
    "n_gqa": ["--n-gqa"],
    "zipkin_endpoint": ["-z", "--zipkin-endpoint"],
}

BAD: list[tuple[str, str]] = [
    ("port", "abc"),
    ("port", "70000"),
    ("port", "-1"),
    ("context_size", "8"),
    ("parallel", "0"),
    ("threads", "0"),
    ("batch_size", "lots"),
    ("max_queue", "-1"),
    ("max_body_bytes", "10"),
    ("gpu_layers", "-1"),
    ("n_gqa", "0"),
    ("log_level", "loud"),
    ("log_format", "xml"),
    ("overlap_output", "sometimes"),
    ("engine_process", "yes"),
    ("engine_restarts", "-1"),
    ("zipkin_endpoint", "ftp://zipkin"),
    ("model_architecture", "   "),
]


def cli_args(name: str, raw: str, expected: Any) -> list[str]:
    flag = flags_of(name)[-1]
    if isinstance(expected, bool):
        return [flag if expected else "--no-" + flag[2:]]
    if isinstance(expected, list):
        return [flag, *(str(p) for p in expected)]
    return [flag, raw]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_value_table_covers_every_setting() -> None:
    assert set(VALID) == set(Settings.model_fields)


def test_defaults_without_flags_or_environment() -> None:
    s = load_settings([])
    assert s.model_architecture == "llama"
    assert s.model is None
    assert s.embedding_model is None
    assert s.host == "0.0.0.0"
    assert s.port == 3000
    assert s.prefer_mmap is True
    assert s.context_size == 2048
    assert s.use_gpu is False
    assert s.gpu_layers is None
    assert s.parallel == 4
    assert s.batch_size == 512
    assert s.max_queue == 256
    assert s.max_body_bytes == 8 * 1024 * 1024
    assert s.log_level == "info"
    assert s.log_format == "text"
    assert s.threads == default_threads()
    for name in ("tokenizer_path", "tokenizer_repository", "lora_adapters", "n_gqa"):
        assert getattr(s, name) is None
    assert s.service_name == "cria"
    assert s.cache_dir == Path.home() / ".cache" / "cria" or "XDG_CACHE_HOME" in os.environ


def test_default_threads_is_the_usable_core_count() -> None:
    assert default_threads() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_long_flag_and_an_env_var(name: str) -> None:
    flags = flags_of(name)
    assert "--" + name.replace("_", "-") in flags
    assert all(f.startswith("-") for f in flags)
    assert env_name(name) == "CRIA_" + name.upper()


def test_flags_are_unique_across_settings() -> None:
    every = [f for name in Settings.model_fields for f in flags_of(name)]
    assert len(every) == len(set(every))


@pytest.mark.parametrize(("name", "flags"), list(CONTRACT_FLAGS.items()))
def test_original_flags_are_kept(name: str, flags: list[str]) -> None:
    assert flags_of(name) == flags


@pytest.mark.parametrize("name", list(VALID))
def test_every_setting_is_read_from_its_env_var(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, expected = VALID[name]
    monkeypatch.setenv(env_name(name), raw)
    assert getattr(load_settings([]), name) == expected


@pytest.mark.parametrize("name", list(VALID))
def test_every_setting_is_read_from_its_flag(name: str) -> None:
    raw, expected = VALID[name]
    assert getattr(load_settings(cli_args(name, raw, expected)), name) == expected


@pytest.mark.parametrize(
    ("name", "env", "argv", "expected"),
    [
        ("port", "9000", ["--port", "8080"], 8080),
        ("port", "9000", ["-p", "8081"], 8081),
        ("host", "10.0.0.1", ["-H", "127.0.0.1"], "127.0.0.1"),
        ("use_gpu", "true", ["--no-use-gpu"], False),
        ("prefer_mmap", "false", ["-m"], True),
        ("log_level", "debug", ["--log-level", "error"], "error"),
        ("model", "/env/model.gguf", ["--model", "/cli/model.gguf"], Path("/cli/model.gguf")),
        ("lora_adapters", '["env.gguf"]', ["-l", "cli.gguf"], ["cli.gguf"]),
        ("lora_adapters", "a.gguf,b.gguf", ["-l", "c.gguf", "d=e.gguf:2"], ["c.gguf", "d=e.gguf:2"]),
        ("context_size", "1024", ["-c", "512"], 512),
    ],
)
def test_command_line_wins_over_environment(
    name: str, env: str, argv: list[str], expected: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env_name(name), env)
    assert getattr(load_settings(argv), name) == expected


def test_environment_wins_over_defaults_and_other_fields_keep_theirs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CRIA_PORT", "4000")
    s = load_settings(["--host", "localhost"])
    assert (s.port, s.host, s.parallel) == (4000, "localhost", 4)


def test_a_bad_env_value_is_ignored_when_its_flag_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRIA_PORT", "abc")
    assert load_settings(["--port", "8080"]).port == 8080


@pytest.mark.parametrize(("name", "raw"), [*BAD, ("use_gpu", "maybe"), ("prefer_mmap", "perhaps")])
def test_bad_env_value_names_the_variable(
    name: str, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env_name(name), raw)
    with pytest.raises(StartupError) as info:
        load_settings([])
    message = str(info.value)
    assert f"{env_name(name)}={raw!r}" in message
    assert flags_of(name)[-1] not in message


@pytest.mark.parametrize(("name", "raw"), BAD)
def test_bad_flag_value_names_the_flag(name: str, raw: str) -> None:
    with pytest.raises(StartupError) as info:
        load_settings([flags_of(name)[-1], raw])
    message = str(info.value)
    assert f"{'/'.join(flags_of(name))}={raw!r}" in message
    assert env_name(name) not in message


def test_bad_flag_and_bad_env_are_both_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRIA_PARALLEL", "zero")
    with pytest.raises(StartupError) as info:
        load_settings(["-p", "abc"])
    message = str(info.value)
    assert "-p/--port='abc'" in message
    assert "CRIA_PARALLEL='zero'" in message


def test_env_list_may_be_one_plain_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRIA_LORA_ADAPTERS", "a.bin")
    assert load_settings([]).lora_adapters == ["a.bin"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--port"], "expected one argument"),
        (["--prefer-mmap=false"], "ignored explicit argument"),
        (["extra"], "unrecognized arguments: extra"),
    ],
)
def test_argparse_errors_are_startup_errors_not_exits(argv: list[str], fragment: str) -> None:
    with pytest.raises(StartupError, match=fragment):
        load_settings(argv)


def test_help_lists_every_option_with_its_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    assert text.startswith("usage: cria")
    for name in Settings.model_fields:
        assert f"[env: {env_name(name)}]" in text, name
        for flag in flags_of(name):
            assert flag in text, flag
    assert "--no-use-gpu" in text and "--no-prefer-mmap" in text
    assert "(default: 3000)" in text
    assert text.count("(default:") == len(Settings.model_fields)  # shown once, not twice


def test_parser_suppresses_defaults_so_env_can_apply() -> None:
    assert vars(build_parser().parse_args([])) == {}
    assert vars(build_parser().parse_args(["-u", "-p", "1"])) == {"use_gpu": True, "port": "1"}


@pytest.mark.parametrize(
    ("argv", "layers", "wants_gpu"),
    [
        ([], 0, False),
        (["-u"], 999, True),
        (["-g", "5"], 5, True),
        (["-u", "-g", "3"], 3, True),
        (["-u", "-g", "0"], 0, True),
        (["-g", "0"], 0, False),
    ],
)
def test_gpu_layers(argv: list[str], layers: int, wants_gpu: bool) -> None:
    s = load_settings(argv)
    assert s.n_gpu_layers == layers
    assert s.wants_gpu is wants_gpu


def test_settings_are_frozen() -> None:
    s = load_settings([])
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_main_reports_a_bad_option_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cria: error: invalid option -p/--port='abc'")
    assert err.count("\n") == 1  # one line, no usage dump


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("a.gguf, b=./x/b.gguf:0.5 ,", ["a.gguf", "b=./x/b.gguf:0.5"]),
        ('["a,b.gguf", "c.gguf"]', ["a,b.gguf", "c.gguf"]),  # JSON: commas inside a path
        ("", None),
        ("[]", None),
    ],
)
def test_lora_adapters_from_the_environment(
    env: str, expected: list[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRIA_LORA_ADAPTERS", env)
    assert load_settings([]).lora_adapters == expected


def test_lora_adapters_flag_takes_several_and_repeats() -> None:
    assert load_settings(["-l", "a.gguf", "b.gguf", "-l", "c=d:0.5"]).lora_adapters == [
        "a.gguf", "b.gguf", "c=d:0.5",
    ]


def test_a_bad_lora_json_list_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRIA_LORA_ADAPTERS", '["a.gguf"')
    with pytest.raises(StartupError, match="CRIA_LORA_ADAPTERS"):
        load_settings([])


def test_an_empty_service_name_is_refused() -> None:
    with pytest.raises(StartupError, match="--service-name"):
        load_settings(["--service-name", " "])


@pytest.mark.usefixtures("restore_logging")
def test_main_reports_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.gguf"
    assert main(["--model", str(missing)]) == 2
    assert capsys.readouterr().err == f"cria: error: --model {missing}: no such file\n"
