"""Shared fixtures: the Flask app, its test client, and a live gunicorn server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

# One BLAS thread, as every gunicorn worker has (service/gunicorn_conf.py), set before NumPy
# loads OpenBLAS: its threads make the small matmuls of a training step several times slower.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from gradiag.service import create_app  # noqa: E402  (after the variables above)
from gradiag.service.config import Settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(settings, TESTING=True)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    workdir: Path, workers: int = 2, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """`gradiag serve` (gunicorn) on a free port until the block ends; yields its base URL.

    The server gets a clean environment (no GRADIAG_* settings from the caller's shell; add
    them with `env`), its own metrics directory, and its log in `workdir`, shown when it
    fails to start."""
    port = _free_port()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIAG_")}
    server_env.update(
        GRADIAG_HOST="127.0.0.1",
        PROMETHEUS_MULTIPROC_DIR=str(workdir / "metrics"),
    )
    server_env.update(env or {})
    log_path = workdir / "server.log"
    command = [sys.executable, "-m", "gradiag.service.cli", "serve"]
    command += ["--port", str(port), "--workers", str(workers)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=server_env, stdout=log, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"gradiag serve exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                if requests.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or a busy machine's slow start
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gradiag serve did not answer /healthz in 30 s:\n{_tail(log_path)}")
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="session")
def server_factory() -> Callable[..., AbstractContextManager[str]]:
    """`running_server`, for a test module that needs a server with its own settings:
    `with server_factory(tmp_dir, workers=1, env={"GRADIAG_MAX_BODY_BYTES": "1000"}) as url`."""
    return running_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real gunicorn with 2 workers and default settings: "http://127.0.0.1:PORT"."""
    with running_server(tmp_path_factory.mktemp("live_server"), workers=2) as base_url:
        yield base_url


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
