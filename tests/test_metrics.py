"""GET /metrics, the per-request JSON log line and the request id; one test runs a real
gunicorn with two workers to check that the counts are merged across them."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from gradiag.service.observability import MAX_REQUEST_ID, JsonFormatter

ROOT = Path(__file__).resolve().parent.parent

# one example of three relu units, two dead, feeding a matmul (hidden units, not a margin)
DEAD_RELU_GRAPH = {
    "nodes": [
        {"id": "x", "op": "input", "value": [[-2.0, -1.0, 3.0]]},
        {"id": "r", "op": "relu", "inputs": ["x"]},
        {"id": "W", "op": "param", "value": [[1.0], [1.0], [1.0]]},
        {"id": "h", "op": "matmul", "inputs": ["r", "W"]},
        {"id": "s", "op": "sum", "inputs": ["h"]},
    ],
    "output": "s",
}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def scrape(client: FlaskClient) -> str:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    return answer.get_data(as_text=True)


class Lines(logging.Handler):
    """Collects the JSON lines the service logs."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines(app: Flask) -> Iterator[list[dict[str, Any]]]:
    handler = Lines()
    logger = logging.getLogger("gradiag")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def test_metrics_are_prometheus_text(client: FlaskClient) -> None:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.mimetype == "text/plain"
    names = {f.name for f in text_string_to_metric_families(answer.get_data(as_text=True))}
    assert {
        "gradiag_http_requests",
        "gradiag_http_request_duration_seconds",
        "gradiag_http_request_body_bytes",
        "gradiag_graph_nodes",
        "gradiag_dead_relu_fraction",
        "gradiag_saturated_fraction",
        "gradiag_health_status",
        "gradiag_findings",
    } <= names


def test_request_count_and_latency_move_by_route_and_status(client: FlaskClient) -> None:
    before = scrape(client)
    for _ in range(3):
        assert client.post("/v1/graph", json=DEAD_RELU_GRAPH).status_code == 200
    assert client.post("/v1/graph", json={"nodes": [], "output": "x"}).status_code == 422
    after = scrape(client)

    ok = {"method": "POST", "endpoint": "/v1/graph", "status": "200"}
    bad = {**ok, "status": "422"}
    counted = "gradiag_http_requests_total"
    assert value(after, counted, **ok) - value(before, counted, **ok) == 3
    assert value(after, counted, **bad) - value(before, counted, **bad) == 1
    timed = "gradiag_http_request_duration_seconds_count"
    assert value(after, timed, **ok) - value(before, timed, **ok) == 3
    sized = "gradiag_http_request_body_bytes_count"
    assert (
        value(after, sized, endpoint="/v1/graph") - value(before, sized, endpoint="/v1/graph") == 4
    )


def test_diagnostics_metrics_move_with_reports(client: FlaskClient) -> None:
    before = scrape(client)
    client.post("/v1/graph", json=DEAD_RELU_GRAPH)
    client.post("/v1/graph", json={"nodes": [], "output": "x"})  # invalid: no report
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gradiag_graph_nodes_count", kind="graph") == 1
    assert delta("gradiag_graph_nodes_sum", kind="graph") == 5
    assert delta("gradiag_dead_relu_fraction_count", kind="graph") == 1
    assert delta("gradiag_dead_relu_fraction_sum", kind="graph") == pytest.approx(2 / 3)
    assert delta("gradiag_saturated_fraction_count", kind="graph") == 0  # no sigmoid or tanh
    assert delta("gradiag_health_status_total", kind="graph", status="fail") == 1
    assert delta("gradiag_findings_total", kind="graph", code="dead_relu") == 1


def test_unknown_paths_are_labelled_unmatched_never_by_raw_path(client: FlaskClient) -> None:
    path = f"/no/such/{uuid.uuid4().hex}"
    assert client.get(path).status_code == 404
    text = scrape(client)
    assert path not in text
    labels = {"method": "GET", "endpoint": "unmatched", "status": "404"}
    assert value(text, "gradiag_http_requests_total", **labels) >= 1


def test_a_given_request_id_is_echoed_and_logged(
    client: FlaskClient, log_lines: list[dict[str, Any]]
) -> None:
    answer = client.post("/v1/graph", json=DEAD_RELU_GRAPH, headers={"X-Request-ID": "abc-123"})
    assert answer.headers["X-Request-ID"] == "abc-123"
    (line,) = [x for x in log_lines if x.get("event") == "request"]
    assert line["request_id"] == "abc-123"
    assert line["method"] == "POST"
    assert line["path"] == line["route"] == "/v1/graph"
    assert line["status"] == 200
    assert line["duration_ms"] >= 0
    assert line["body_bytes"] == len(json.dumps(DEAD_RELU_GRAPH))
    assert line["nodes"] == 5
    assert line["health"] == "fail"


def test_a_chunked_body_is_measured_as_received(
    client: FlaskClient, log_lines: list[dict[str, Any]]
) -> None:
    body = json.dumps(DEAD_RELU_GRAPH).encode()
    environ = EnvironBuilder(
        path="/v1/graph", method="POST", content_type="application/json"
    ).get_environ()
    environ.pop("CONTENT_LENGTH", None)  # as gunicorn hands over a chunked upload
    environ["wsgi.input"] = io.BytesIO(body)
    environ["wsgi.input_terminated"] = True
    answer = client.open(Request(environ))
    assert answer.status_code == 200
    (line,) = [x for x in log_lines if x.get("event") == "request"]
    assert line["body_bytes"] == len(body)


def test_a_missing_request_id_is_generated(
    client: FlaskClient, log_lines: list[dict[str, Any]]
) -> None:
    answer = client.get("/healthz")
    rid = answer.headers["X-Request-ID"]
    assert uuid.UUID(rid).version == 4
    assert [x["request_id"] for x in log_lines if x.get("event") == "request"] == [rid]


@pytest.mark.parametrize("given", ["x" * (MAX_REQUEST_ID + 1), "tab\there", "caf\u00e9"])
def test_an_unusable_request_id_is_replaced(client: FlaskClient, given: str) -> None:
    headers = {"X-Request-ID": given.encode("utf-8").decode("latin-1")}
    rid = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    assert rid != given
    assert uuid.UUID(rid).version == 4


def test_a_request_id_of_the_maximum_length_is_kept(client: FlaskClient) -> None:
    given = "r" * MAX_REQUEST_ID
    assert client.get("/healthz", headers={"X-Request-ID": given}).headers["X-Request-ID"] == given


def test_request_bodies_never_reach_the_log(
    client: FlaskClient, log_lines: list[dict[str, Any]]
) -> None:
    secret = "do-not-log-this-node-id"
    body = {"nodes": [{"id": secret, "op": "input", "value": 1}], "output": secret}
    client.post("/v1/graph", json=body)
    client.post("/v1/graph", data=b"{not json " + secret.encode(), content_type="application/json")
    assert len(log_lines) == 2
    assert all(secret not in json.dumps(line) for line in log_lines)


def test_an_unhandled_error_is_logged_with_its_request_id(
    app: Flask, log_lines: list[dict[str, Any]]
) -> None:
    def boom() -> str:
        raise RuntimeError("kaboom")

    app.add_url_rule("/boom", "boom", boom)
    answer = app.test_client().get("/boom", headers={"X-Request-ID": "req-500"})
    assert answer.status_code == 500
    assert answer.get_json()["request_id"] == "req-500"
    (error,) = [x for x in log_lines if x["level"] == "error"]
    assert error["request_id"] == "req-500"
    assert "req-500" in error["message"]
    assert "RuntimeError: (message withheld)" in error["exception"]  # it may quote a body
    (access,) = [x for x in log_lines if x.get("event") == "request"]
    assert access["status"] == 500
    assert access["route"] == "/boom"


# --- a real gunicorn with two workers -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _worker_pids(metrics_dir: Path) -> set[str]:
    """Each worker writes its own counter file, counter_<pid>.db."""
    return {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}


@pytest.mark.live
def test_request_count_is_merged_across_two_gunicorn_workers(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over from an earlier run")
    port = _free_port()
    log = tmp_path / "gunicorn.log"
    errors = log.open("wb")
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "GRADIAG_HOST": "127.0.0.1",
        "GRADIAG_PORT": str(port),
        "GRADIAG_WORKERS": "2",
        "GRADIAG_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:gradiag.service.gunicorn_conf"]
    server = subprocess.Popen(
        [*argv, "gradiag.service:create_app()"],
        cwd=tmp_path,  # no ./gunicorn.conf.py of the project is picked up
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=errors,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"{url}/healthz", timeout=1)
                break
            except requests.RequestException:  # not up yet, or slow on a busy machine
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)

        def post(_: int) -> int:
            return requests.post(f"{url}/v1/graph", json=DEAD_RELU_GRAPH, timeout=10).status_code

        sent = 0
        with ThreadPoolExecutor(max_workers=4) as pool:
            # concurrent batches until both workers have answered some (nearly always at once)
            while sent < 40 or (len(_worker_pids(metrics_dir)) < 2 and sent < 400):
                assert set(pool.map(post, range(20))) == {200}
                sent += 20
        assert len(_worker_pids(metrics_dir)) == 2, "one worker answered every request"

        text = requests.get(f"{url}/metrics", timeout=10).text
        labels = {"method": "POST", "endpoint": "/v1/graph", "status": "200"}
        assert value(text, "gradiag_http_requests_total", **labels) == sent
        assert value(text, "gradiag_health_status_total", kind="graph", status="fail") == sent
        assert value(text, "gradiag_findings_total", kind="graph", code="dead_relu") == sent
    finally:
        server.terminate()
        server.wait(timeout=30)
        errors.close()
