"""Settings from GRADIAG_* variables: parsed by type, refused at start-up with a clear message."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradiag.service.cli import main
from gradiag.service.config import ConfigError, Settings, available_cpus

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_any_variable() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.workers == available_cpus() == len(os.sched_getaffinity(0))
    assert settings.log_level == "info"
    assert settings.api_token is None
    assert settings.cors_origins == ()


def test_each_kind_of_setting_is_parsed() -> None:
    settings = Settings.from_env(
        {
            "GRADIAG_MAX_NODES": "1_000",
            "GRADIAG_HOST": "0.0.0.0",
            "GRADIAG_WORKERS": "3",
            "GRADIAG_LOG_LEVEL": "WARNING",
            "GRADIAG_API_TOKEN": "s3cret-token",
            "GRADIAG_CORS_ORIGINS": "https://a.example, http://localhost:5173 ,",
        }
    )
    assert settings.max_nodes == 1000
    assert settings.host == "0.0.0.0"
    assert settings.workers == 3
    assert settings.log_level == "warning"
    assert settings.api_token == "s3cret-token"
    assert settings.cors_origins == ("https://a.example", "http://localhost:5173")


def test_an_empty_variable_keeps_the_default() -> None:
    assert Settings.from_env({"GRADIAG_MAX_NODES": "", "GRADIAG_LOG_LEVEL": ""}) == Settings()


def test_port_falls_back_to_PORT_and_GRADIAG_PORT_wins() -> None:
    assert Settings.from_env({"PORT": "9000"}).port == 9000
    assert Settings.from_env({"PORT": "9000", "GRADIAG_PORT": "9001"}).port == 9001


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GRADIAG_MAX_NODES": "abc"}, "GRADIAG_MAX_NODES='abc' is not a whole number"),
        ({"GRADIAG_MAX_BODY_BYTES": "0"}, "GRADIAG_MAX_BODY_BYTES='0' must be positive"),
        ({"GRADIAG_WORKERS": "-2"}, "GRADIAG_WORKERS='-2' must be positive"),
        ({"GRADIAG_PORT": "70000"}, "GRADIAG_PORT='70000' must be at most 65535"),
        ({"PORT": "http"}, "PORT='http' is not a whole number"),
        ({"GRADIAG_LOG_LEVEL": "loud"}, "GRADIAG_LOG_LEVEL='loud' must be one of debug, info"),
        ({"GRADIAG_HOST": "0.0.0.0 x"}, "GRADIAG_HOST='0.0.0.0 x' must be printable text"),
        (
            {"GRADIAG_CORS_ORIGINS": "https://ok.example,evil.example/path"},
            "has 'evil.example/path', which is not an origin",
        ),
    ],
)
def test_a_bad_value_is_refused_with_its_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_a_bad_token_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"GRADIAG_API_TOKEN": "my secret"})
    assert "GRADIAG_API_TOKEN" in str(err.value)
    assert "secret" not in str(err.value)


def test_the_token_is_not_in_the_settings_repr() -> None:
    assert "hunter2-token" not in repr(Settings.from_env({"GRADIAG_API_TOKEN": "hunter2-token"}))


def test_every_setting_is_in_the_configuration_table() -> None:
    table = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        f"GRADIAG_{f.name.upper()}"
        for f in dataclasses.fields(Settings)
        if f"`GRADIAG_{f.name.upper()}`" not in table
    ]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_serve_exits_2_on_a_bad_value_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRADIAG_MAX_NODES", "abc")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gradiag: GRADIAG_MAX_NODES='abc' is not a whole number"
    )


def test_the_gradiag_command_exits_2_on_a_bad_value() -> None:
    env = {**os.environ, "GRADIAG_MAX_NODES": "abc"}
    done = subprocess.run(
        [sys.executable, "-m", "gradiag.service.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "GRADIAG_MAX_NODES='abc' is not a whole number" in done.stderr
    assert "Traceback" not in done.stderr


def test_gunicorn_with_the_project_config_exits_2_on_a_bad_value(tmp_path: Path) -> None:
    """The container runs gunicorn directly: its config refuses bad settings the same way."""
    env = {**os.environ, "GRADIAG_WORKERS": "many"}
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:gradiag.service.gunicorn_conf", "x:y"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "gradiag: GRADIAG_WORKERS='many' is not a whole number" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_slow_client_and_answer_settings_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "GRADIAG_WORKER_CLASS": "SYNC",
            "GRADIAG_HEADER_TIMEOUT": "3",
            "GRADIAG_BODY_TIMEOUT": "9",
            "GRADIAG_SEND_TIMEOUT": "11",
            "GRADIAG_MAX_RESPONSE_BYTES": "1_000_000",
            "GRADIAG_MEMORY_LIMIT_BYTES": str(2 * 1024**3),
            "GRADIAG_WORKERS": "4",
        }
    )
    assert settings.worker_class == "sync"
    assert (settings.header_timeout, settings.body_timeout, settings.send_timeout) == (3, 9, 11)
    assert settings.max_response_bytes == 1_000_000
    # (2 GiB - 64 MiB) / 4 workers - 64 MiB
    assert settings.max_request_memory_bytes == (2048 - 64) // 4 * 2**20 - 64 * 2**20
    with pytest.raises(ConfigError, match="GRADIAG_WORKER_CLASS='eventlet' must be one of"):
        Settings.from_env({"GRADIAG_WORKER_CLASS": "eventlet"})


def test_the_default_memory_limit_is_the_containers_or_the_machines() -> None:
    from gradiag.service.config import memory_limit

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < memory_limit() <= ram
    assert Settings().memory_limit_bytes == memory_limit()


def test_gunicorn_runs_the_gevent_worker_with_the_header_timeout(tmp_path: Path) -> None:
    env = {**os.environ, "GRADIAG_HEADER_TIMEOUT": "7", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    code = (
        "import gradiag.service.gunicorn_conf as c; "
        "print(c.worker_class, c.keepalive, c.graceful_timeout, c.worker_connections)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["gradiag.service.worker.GeventWorker", "7", "30", "1000"]
