"""Shutdown loses nothing: the whole request (body, parse, engine, report, picture) runs
against one deadline, and gunicorn's graceful timeout outlasts it (Settings.check), so a
SIGTERM during the longest request the time budget allows still gets that request answered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from gradiag.service.config import ConfigError, Settings

HANG = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_graceful_timeout_shorter_than_the_budget_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="GRADIAG_GRACEFUL_TIMEOUT=20 must be at least"):
        Settings.from_env({"GRADIAG_GRACEFUL_TIMEOUT": "20"})  # the old default, budget 20
    with pytest.raises(ConfigError, match="GRADIAG_TIMEOUT=29 must be at least"):
        Settings.from_env({"GRADIAG_TIME_BUDGET_SECONDS": "25", "GRADIAG_TIMEOUT": "29"})
    assert Settings.from_env({}).graceful_timeout >= Settings().time_budget_seconds + 5


def _gradient_check_of_a_matmul_tower() -> dict[str, Any]:
    """300 x 300 by broadcasting, 40 matmuls, and a gradient check of every element: each
    perturbed forward pass is ~2 GFLOP, so the check runs into the time budget, where the
    engine stops it between passes."""
    chain = " @ ".join(["(a + b)"] * 40)
    return {
        "expression": f"sum({chain})",
        "values": {"a": [[0.001]] * 300, "b": [[0.001] * 300]},
        "gradcheck": {"max_evaluations": 100_000, "max_elements_per_node": 100_000},
        "tensors": "summary",
    }


@pytest.mark.live
def test_sigterm_during_the_longest_allowed_request_loses_nothing(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIAG_")}
    env.update(
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        GRADIAG_HOST="127.0.0.1",
        GRADIAG_PORT=str(port),
        GRADIAG_WORKERS="1",
        GRADIAG_TIME_BUDGET_SECONDS="2",
        GRADIAG_GRACEFUL_TIMEOUT="7",  # budget + 5
        GRADIAG_TIMEOUT="7",
        GRADIAG_MAX_FLOPS="10000000000000",  # the gradient check's passes are not cut short
        GRADIAG_LOG_LEVEL="warning",
    )
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:gradiag.service.gunicorn_conf"]
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            [*argv, "gradiag.service:create_app()"], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            assert server.poll() is None and time.monotonic() - started < HANG
            time.sleep(0.1)
        outcome: dict[str, Any] = {}

        def longest_request() -> None:
            began = time.monotonic()
            r = requests.post(
                f"{url}/v1/graph", json=_gradient_check_of_a_matmul_tower(), timeout=HANG
            )
            outcome.update(status=r.status_code, doc=r.json(), seconds=time.monotonic() - began)

        client = threading.Thread(target=longest_request)
        client.start()
        time.sleep(0.5)  # the body is in, the engine is running
        server.send_signal(signal.SIGTERM)
        client.join(HANG)
        assert server.wait(HANG) == 0
    finally:
        if server.poll() is None:
            server.kill()
    # the request ran to its budget and was answered, not dropped
    assert outcome["status"] == 422, outcome
    assert outcome["doc"]["limit"] == "time_budget_seconds"
    assert outcome["seconds"] < 7
