"""Against a real `gradiag serve` (gunicorn) process, over a socket, with `requests`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import requests

from gradiag.engine import LEAF_OPS, OPS

pytestmark = pytest.mark.live

TIMEOUT = 30
CS231N_EXAMPLE: dict[str, Any] = {
    "nodes": [
        {"id": "x", "op": "input", "value": -2},
        {"id": "y", "op": "input", "value": 5},
        {"id": "z", "op": "input", "value": -4},
        {"id": "q", "op": "add", "inputs": ["x", "y"]},
        {"id": "f", "op": "mul", "inputs": ["q", "z"]},
    ],
    "output": "f",
}


@pytest.fixture(scope="module")
def small_live_server(
    tmp_path_factory: pytest.TempPathFactory,
    server_factory: Callable[..., AbstractContextManager[str]],
) -> Iterator[str]:
    """One worker with a 1000-byte body limit, for the 413 paths."""
    workdir = tmp_path_factory.mktemp("small_live_server")
    with server_factory(workdir, workers=1, env={"GRADIAG_MAX_BODY_BYTES": "1000"}) as url:
        yield url


def assert_problem(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


def test_cs231n_example_through_gunicorn(live_server: str) -> None:
    response = requests.post(f"{live_server}/v1/graph", json=CS231N_EXAMPLE, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    answer = response.json()
    assert answer["output"] == {"id": "f", "value": -12.0, "shape": []}
    grads = {node_id: node["grad"] for node_id, node in answer["nodes"].items()}
    assert grads == {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0, "f": 1.0}
    assert answer["health"]["status"] == "ok"


def test_probes_answer(live_server: str) -> None:
    healthz = requests.get(f"{live_server}/healthz", timeout=TIMEOUT)
    assert healthz.status_code == 200
    readyz = requests.get(f"{live_server}/readyz", timeout=TIMEOUT)
    assert readyz.status_code == 200
    assert readyz.json()["status"] == "ready"


def test_ops_catalogue_lists_every_op(live_server: str) -> None:
    response = requests.get(f"{live_server}/v1/ops", timeout=TIMEOUT)
    assert response.status_code == 200
    ops = {op["name"]: op for op in response.json()["ops"]}
    assert set(ops) == set(OPS) | set(LEAF_OPS)
    assert ops["matmul"]["arity"] == 2
    assert ops["input"]["arity"] == 0
    assert "alpha" in ops["leaky_relu"]["attrs"]


def test_openapi_document_is_served(live_server: str) -> None:
    response = requests.get(f"{live_server}/openapi.json", timeout=TIMEOUT)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert "post" in document["paths"]["/v1/graph"]


def test_chunked_request_is_read_whole(live_server: str) -> None:
    data = json.dumps(CS231N_EXAMPLE).encode()

    def pieces() -> Iterator[bytes]:  # a generator body: requests sends it chunked
        for i in range(0, len(data), 7):
            yield data[i : i + 7]

    response = requests.post(
        f"{live_server}/v1/graph",
        data=pieces(),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 200, response.text
    assert response.json()["output"]["value"] == -12.0


def test_errors_are_problem_json_through_gunicorn(live_server: str) -> None:
    malformed = requests.post(
        f"{live_server}/v1/graph",
        data=b'{"nodes": [',
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert_problem(malformed, 400)
    cycle: dict[str, Any] = {
        "nodes": [
            {"id": "x", "op": "input", "value": 1},
            {"id": "y", "op": "neg", "inputs": ["y"]},
        ],
        "output": "y",
    }
    error = assert_problem(
        requests.post(f"{live_server}/v1/graph", json=cycle, timeout=TIMEOUT), 422
    )["errors"][0]
    assert error["node"] == "y"
    wrong_method = requests.get(f"{live_server}/v1/graph", timeout=TIMEOUT)
    assert_problem(wrong_method, 405)
    assert "POST" in wrong_method.headers["Allow"]
    assert_problem(requests.get(f"{live_server}/nowhere", timeout=TIMEOUT), 404)
    deep = requests.post(
        f"{live_server}/v1/graph",
        data=b"[" * 100_000,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert 400 <= deep.status_code < 500
    # the workers survived all of that
    assert requests.get(f"{live_server}/healthz", timeout=TIMEOUT).status_code == 200


def oversized_body() -> bytes:
    node = {"id": "x", "op": "input", "value": [1.0] * 2000}
    return json.dumps({"nodes": [node], "output": "x"}).encode()


def test_body_over_the_limit_is_413_with_content_length(small_live_server: str) -> None:
    response = requests.post(
        f"{small_live_server}/v1/graph",
        data=oversized_body(),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.request.headers["Content-Length"] == str(len(oversized_body()))
    assert assert_problem(response, 413)["limit"] == "max_body_bytes"


def test_chunked_body_over_the_limit_is_413(small_live_server: str) -> None:
    data = oversized_body()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(data), 256):
            yield data[i : i + 256]

    response = requests.post(
        f"{small_live_server}/v1/graph",
        data=pieces(),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert "Content-Length" not in response.request.headers
    assert assert_problem(response, 413)["limit"] == "max_body_bytes"
    small = requests.post(f"{small_live_server}/v1/graph", json=CS231N_EXAMPLE, timeout=TIMEOUT)
    assert small.status_code == 200
