"""client.Client: typed reports, retries with backoff, bearer token, problem details."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gradiag.client import Client, GradiagError, GradiagUnavailable, encode
from gradiag.schemas.graph import GraphResponse
from gradiag.schemas.network import NetworkResponse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CS231N = json.loads((EXAMPLES / "cs231n.graph.json").read_text())
# an answer the fake server can give: a GraphResponse of the CS231n graph (abridged to x, f)
GRAPH_ANSWER: dict[str, Any] = {
    "output": {"id": "f", "value": -12.0, "shape": []},
    "nodes": {
        "x": {"op": "input", "shape": [], "value": -2.0, "grad": -4.0, "role": "leaf"},
        "f": {"op": "mul", "shape": [], "value": -12.0, "grad": 1.0, "role": "mul gate"},
    },
    "parameters": {"tensors": 0, "total": 0},
    "diagnostics": {
        "relu": {"nodes": 0, "elements": 0, "dead_elements": 0, "dead_fraction": 0.0},
        "sigmoid": {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0},
        "tanh": {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0},
        "nonfinite_nodes": [],
    },
    "health": {"status": "ok", "findings": []},
}
UNAVAILABLE = {"type": "about:blank", "title": "Service Unavailable", "status": 503,
               "detail": "draining"}  # fmt: skip


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeServer:
    """A scripted HTTP server on 127.0.0.1: answers `replies` in order (the last repeats)
    and records every request."""

    url: str
    replies: list[Reply]
    seen: list[Seen] = field(default_factory=list)


def problem(status: int, title: str, detail: str) -> bytes:
    return json.dumps({"title": title, "status": status, "detail": detail}).encode()


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    state = FakeServer("", [Reply(200, json.dumps(GRAPH_ANSWER).encode())])

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            state.seen.append(Seen(self.command, self.path, dict(self.headers), body))
            k = min(len(state.seen), len(state.replies)) - 1
            reply = state.replies[k]
            time.sleep(reply.delay)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_post_is_retried_on_503_until_the_service_answers(fake_server: FakeServer) -> None:
    unavailable = Reply(503, json.dumps(UNAVAILABLE).encode(), "application/problem+json")
    fake_server.replies = [unavailable, unavailable, Reply(200, json.dumps(GRAPH_ANSWER).encode())]
    with Client(fake_server.url, retries=3, backoff_factor=0.01) as c:
        report = c.graph(CS231N)
    assert isinstance(report, GraphResponse)
    assert report.output.value == -12.0
    assert [s.method for s in fake_server.seen] == ["POST"] * 3
    assert {s.path for s in fake_server.seen} == {"/v1/graph"}
    assert all(json.loads(s.body) == CS231N for s in fake_server.seen)


def test_the_last_5xx_is_raised_with_its_problem_when_retries_run_out(
    fake_server: FakeServer,
) -> None:
    fake_server.replies = [Reply(503, json.dumps(UNAVAILABLE).encode(), "application/problem+json")]
    with (
        Client(fake_server.url, retries=2, backoff_factor=0.01) as c,
        pytest.raises(GradiagError) as caught,
    ):
        c.graph(CS231N)
    assert caught.value.status == 503
    assert caught.value.detail == "draining"
    assert not caught.value.is_client_error
    assert len(fake_server.seen) == 3  # the first try and two retries


def test_a_gateway_page_becomes_a_short_detail(fake_server: FakeServer) -> None:
    fake_server.replies = [Reply(502, b"<html><h1>Bad gateway</h1></html>", "text/html")]
    with Client(fake_server.url, retries=0) as c, pytest.raises(GradiagError) as caught:
        c.health()
    assert caught.value.status == 502
    assert caught.value.title == "Bad Gateway"
    assert "Bad gateway" in caught.value.detail


def test_a_read_timeout_is_not_retried(fake_server: FakeServer) -> None:
    fake_server.replies = [Reply(200, json.dumps(GRAPH_ANSWER).encode(), delay=0.5)]
    with (
        Client(fake_server.url, retries=3, timeout=0.2) as c,
        pytest.raises(GradiagUnavailable, match="timed out"),
    ):
        c.graph(CS231N)
    assert len(fake_server.seen) == 1


def test_bearer_token_is_sent_when_configured(fake_server: FakeServer) -> None:
    with Client(fake_server.url, token="s3cret") as c:
        c.graph(CS231N)
    with Client(fake_server.url) as c:
        c.graph(CS231N)
    first, second = fake_server.seen
    assert first.headers["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in second.headers
    assert first.headers["Content-Type"] == "application/json"


def test_unreachable_service_raises_unavailable() -> None:
    with (
        Client("http://127.0.0.1:9", retries=0, timeout=2) as c,
        pytest.raises(GradiagUnavailable) as caught,
    ):
        c.health()
    assert caught.value.status is None
    assert "cannot reach http://127.0.0.1:9/healthz" in str(caught.value)


def test_retry_policy_covers_post_and_gateway_statuses() -> None:
    with Client("http://127.0.0.1:9", retries=4, backoff_factor=0.25) as c:
        retry = c.session.get_adapter("http://127.0.0.1:9").max_retries  # type: ignore[attr-defined]
    assert "POST" in retry.allowed_methods
    assert set(retry.status_forcelist) == {502, 503, 504}
    assert (retry.connect, retry.status, retry.read) == (4, 4, 0)
    assert retry.backoff_factor == 0.25


def test_encode_writes_nonfinite_numbers_as_wire_strings() -> None:
    body = {"expression": "x", "values": {"x": float("inf"), "y": [float("nan"), -float("inf")]}}
    assert json.loads(encode(body))["values"] == {"x": "Infinity", "y": ["NaN", "-Infinity"]}


# --- against a real gunicorn -----------------------------------------------------------------


@pytest.mark.live
def test_problem_detail_is_carried_on_a_422(live_server: str) -> None:
    bad = {"nodes": [{"id": "x", "op": "input", "value": 1}, {"id": "y", "op": "bogus"}],
           "output": "y"}  # fmt: skip
    with Client(live_server) as c, pytest.raises(GradiagError) as caught:
        c.graph(bad)
    err = caught.value
    assert err.status == 422
    assert err.is_client_error
    assert err.title == "Invalid request body"
    assert "bogus" in err.detail
    assert err.errors[0]["loc"] == [
        "nodes",
        1,
        "op",
    ]  # an unknown op: the path ends in the field at fault
    assert err.errors[0]["node"] == "y"
    assert err.problem["instance"] == "/v1/graph"


@pytest.mark.live
def test_typed_reports_from_a_live_service(live_server: str) -> None:
    spec = json.loads((EXAMPLES / "healthy.network.json").read_text())
    with Client(live_server, timeout=30) as c:
        assert c.health().status == "alive"
        assert {"matmul", "relu", "input"} <= {op.name for op in c.ops()}
        graph = c.expression("(x + y) * z", {"x": -2, "y": 5, "z": -4})
        network = c.network(spec)
    assert isinstance(graph, GraphResponse)
    assert graph.output.value == -12.0
    assert graph.nodes["x"].grad == -4.0
    assert isinstance(network, NetworkResponse)
    assert network.name == "3-layer neural network"
    assert [layer.units for layer in network.layers] == [16, 16, 3]
    assert network.health.status == "ok"
