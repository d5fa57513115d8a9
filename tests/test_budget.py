"""Answers and memory are bounded before any compute (service/budget.py), and
`"tensors": "summary"` answers shape, min, max, mean and norm (service/summary.py).

The estimates are checked against what a request really costs: the answer's length, and
tracemalloc's peak over the whole request (NumPy reports its arrays to tracemalloc)."""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from gradiag.service import budget, create_app
from gradiag.service.budget import LEDGER, Estimate
from gradiag.service.config import MIB, Settings, request_memory
from gradiag.service.summary import tensor_summary

PROBLEM = "application/problem+json"


def leaf(id: str, value: Any, op: str = "input") -> dict[str, Any]:
    return {"id": id, "op": op, "value": value}


def node(id: str, op: str, *inputs: str) -> dict[str, Any]:
    return {"id": id, "op": op, "inputs": list(inputs)}


def broadcast_bomb(n: int = 1999) -> dict[str, Any]:
    """The issue's 85 KB graph: (n, 1) + (1, n) broadcast through four elementwise nodes."""
    return {
        "nodes": [
            leaf("a", [[0.5]] * n),
            leaf("b", [[0.25] * n]),
            node("c", "add", "a", "b"),
            node("d", "mul", "c", "c"),
            node("e", "sigmoid", "d"),
            node("f", "tanh", "e"),
        ],
        "output": "f",
    }


def network_bomb(**more: Any) -> dict[str, Any]:
    """The issue's 190-byte network: 2000 -> 2000, a random batch of 1000, gradients."""
    body = {
        "input_dim": 2000,
        "layers": [{"units": 2000}],
        "loss": "sum",
        "batch": {"random": {"size": 1000}},
        "include": ["gradients"],
    }
    return {**body, **more}


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Estimate]]:
    """Every estimate the service makes, in order."""
    found: list[Estimate] = []
    original = budget.estimate

    def spy(*args: Any) -> Estimate:
        found.append(original(*args))
        return found[-1]

    monkeypatch.setattr(budget, "estimate", spy)
    yield found


# --- the two bombs, and their cheaper requests ------------------------------------------


def test_the_broadcast_bomb_is_refused_naming_the_limit_and_the_cheaper_request(
    client: FlaskClient,
) -> None:
    r = client.post("/v1/graph", json=broadcast_bomb())
    assert r.status_code == 422
    assert r.content_type == PROBLEM
    doc = r.get_json()
    assert doc["limit"] == "max_response_bytes"
    assert doc["limit_value"] == 64 * MIB
    assert "GRADIAG_MAX_RESPONSE_BYTES" in doc["detail"]
    assert '"tensors": "summary"' in doc["detail"]
    assert doc["errors"][0]["loc"] == ["tensors"]
    assert len(r.data) < 2000


def test_the_broadcast_bomb_as_a_summary_answers_its_statistics(client: FlaskClient) -> None:
    r = client.post("/v1/graph", json={**broadcast_bomb(), "tensors": "summary"})
    assert r.status_code == 200, r.data[:300]
    assert len(r.data) < 10_000
    nodes = r.get_json()["nodes"]
    c = nodes["c"]["value"]  # 0.5 + 0.25 everywhere
    assert c == {"shape": [1999, 1999], "min": 0.75, "max": 0.75, "mean": 0.75, "norm": c["norm"]}
    assert c["norm"] == pytest.approx(0.75 * 1999)
    assert nodes["a"]["grad"]["shape"] == [1999, 1]
    assert r.get_json()["output"]["value"]["shape"] == [1999, 1999]


def test_the_network_bomb_is_refused_naming_include(client: FlaskClient) -> None:
    r = client.post("/v1/network", json=network_bomb())
    assert r.status_code == 422
    doc = r.get_json()
    assert doc["limit"] == "max_response_bytes"
    assert doc["errors"][0]["loc"] == ["include"]
    assert '"gradients" out of "include"' in doc["detail"]
    assert client.post("/v1/network", json=network_bomb(include=[])).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/graph.svg", broadcast_bomb()), ("/v1/network.svg", network_bomb())],
)
def test_a_picture_of_a_bomb_summarises_its_tensors(
    client: FlaskClient, path: str, body: dict[str, Any]
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 200
    assert r.mimetype == "image/svg+xml"
    assert len(r.data) < 20_000


def test_over_the_memory_limit_is_a_422_naming_it() -> None:
    client = create_app(Settings(max_request_memory_bytes=64 * MIB), TESTING=True).test_client()
    r = client.post("/v1/graph", json={**broadcast_bomb(), "tensors": "summary"})
    assert r.status_code == 422
    doc = r.get_json()
    assert doc["limit"] == "max_request_memory_bytes"
    assert doc["limit_value"] == 64 * MIB
    assert "GRADIAG_MAX_REQUEST_MEMORY_BYTES" in doc["detail"]
    assert "smaller graph" in doc["detail"]  # even its summary does not fit


def test_the_limits_are_checked_before_the_engine_runs(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradiag.service import frontend

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the engine ran")

    monkeypatch.setattr(frontend, "run", must_not_run)
    assert client.post("/v1/graph", json=broadcast_bomb()).status_code == 422


TRAINED = {
    "input_dim": 16,
    "layers": [{"units": 64}, {"units": 64}, {"units": 4, "activation": "linear"}],
    "loss": "softmax_cross_entropy",
    "batch": {"random": {"size": 64, "seed": 0}},
    "include": ["histograms"],
}


def test_a_training_answer_over_the_limit_is_refused_before_the_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every run's recorded steps and histograms count: the network alone fits in 200 kB,
    200 recorded steps with histograms at four rates do not, and nothing is trained."""
    from gradiag.engine import training

    client = create_app(Settings(max_response_bytes=200_000), TESTING=True).test_client()
    assert client.post("/v1/network", json=TRAINED).status_code == 200
    monkeypatch.setattr(training, "leaf_values", lambda spec: pytest.fail("weights drawn"))
    sweep = {"lr": [0.01, 0.1, 1.0, 2.0], "steps": 200, "record_every": 1}
    r = client.post("/v1/network", json={**TRAINED, "train": sweep})
    assert r.status_code == 422, r.data[:300]
    doc = r.get_json()
    assert doc["limit"] == "max_response_bytes"
    assert doc["errors"][0]["loc"] == ["include"]


# --- the estimates against what requests really cost --------------------------------------

RNG = np.random.default_rng(0)


def _random(*shape: int) -> Any:
    return RNG.standard_normal(shape).tolist()


def _scalar_chain(n: int) -> dict[str, Any]:
    nodes = [leaf("x0", 0.5)]
    nodes += [node(f"x{i}", "add" if i % 2 else "mul", f"x{i - 1}", "x0") for i in range(1, n)]
    return {"nodes": nodes, "output": f"x{n - 1}"}


MEASURED = {
    "broadcast 400": ("/v1/graph", broadcast_bomb(400)),
    "broadcast 400 summary": ("/v1/graph", {**broadcast_bomb(400), "tensors": "summary"}),
    "matmul relu": (
        "/v1/graph",
        {
            "nodes": [
                leaf("A", _random(120, 80)),
                leaf("B", _random(80, 150)),
                node("C", "matmul", "A", "B"),
                node("r", "relu", "C"),
                node("s", "sum", "r"),
            ],
            "output": "s",
        },
    ),
    "scalar chain": ("/v1/graph", _scalar_chain(3000)),
    "scalar chain explained": ("/v1/graph", {**_scalar_chain(3000), "explain": True}),
    "scalar chain as columns": ("/v1/graph", {**_scalar_chain(3000), "report": "columns"}),
    "expression": (
        "/v1/graph",
        {
            "expression": "sum(tanh(x @ W + b))",
            "values": {"x": _random(32, 40), "W": _random(40, 60), "b": _random(60)},
        },
    ),
    "network with gradients": (
        "/v1/network",
        {
            "input_dim": 64,
            "layers": [{"units": 128}, {"units": 128, "activation": "tanh"}, {"units": 10}],
            "loss": "softmax_cross_entropy",
            "batch": {"random": {"size": 64}},
            "include": ["gradients"],
        },
    ),
    "conv network with gradients": (
        "/v1/network",
        {
            "input_shape": [3, 16, 16],
            "layers": [
                {"type": "conv2d", "filters": 8, "kernel": 3, "padding": 1},
                {"type": "maxpool2d"},
                {"type": "flatten"},
                {"units": 10, "activation": "linear"},
            ],
            "loss": "softmax_cross_entropy",
            "batch": {"random": {"size": 16}},
            "include": ["gradients"],
        },
    ),
}


@pytest.fixture(scope="module")
def open_client() -> FlaskClient:
    """No limit in the way: every request runs and answers in full."""
    settings = Settings(max_response_bytes=2**40, max_request_memory_bytes=2**40)
    return create_app(settings, TESTING=True).test_client()


@pytest.mark.parametrize("name", list(MEASURED))
def test_the_estimates_bound_the_answer_and_the_peak_memory(
    open_client: FlaskClient, captured: list[Estimate], name: str
) -> None:
    path, body = MEASURED[name]
    data = json.dumps(body).encode()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        r = open_client.post(path, data=data, content_type="application/json")
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.data[:300]
    (estimate,) = captured
    assert len(r.data) <= estimate.answer_bytes
    assert peak <= estimate.peak_bytes
    # useful bounds, not wild ones: the answer within 2.5x (the frame's 16 KiB aside) and
    # the memory within 4x of what was measured
    assert estimate.answer_bytes <= 2.5 * len(r.data) + budget.ANSWER_FRAME_BYTES
    assert estimate.peak_bytes <= 4 * peak + 8 * MIB


# --- summaries ----------------------------------------------------------------------------


def test_a_summary_holds_shape_min_max_mean_norm() -> None:
    x = np.array([[3.0, -4.0], [0.0, 1.0]])
    assert tensor_summary(x) == {
        "shape": [2, 2],
        "min": -4.0,
        "max": 3.0,
        "mean": 0.0,
        "norm": pytest.approx(math.sqrt(26.0)),
    }


def test_a_summary_of_huge_finite_values_stays_finite() -> None:
    x = np.full(1000, 1e200)
    s = tensor_summary(x)
    assert s["norm"] == pytest.approx(1e200 * math.sqrt(1000))
    y = np.full(10, 1e308)
    assert tensor_summary(y)["mean"] == pytest.approx(1e308)


def test_a_summary_writes_non_finite_values_as_strings() -> None:
    assert tensor_summary(np.array([1.0, np.nan]))["mean"] == "NaN"
    s = tensor_summary(np.array([1.0, np.inf, -np.inf]))
    assert (s["min"], s["max"], s["norm"]) == ("-Infinity", "Infinity", "Infinity")
    empty = tensor_summary(np.zeros((0, 3)))
    assert empty == {"shape": [0, 3], "min": "NaN", "max": "NaN", "mean": "NaN", "norm": 0.0}


def test_summary_mode_writes_every_value_and_grad_of_nodes(client: FlaskClient) -> None:
    body = {
        "nodes": [leaf("x", [1.0, -2.0, 2.0]), node("s", "square", "x"), node("t", "sum", "s")],
        "output": "t",
        "tensors": "summary",
    }
    r = client.post("/v1/graph", json=body)
    assert r.status_code == 200
    nodes = r.get_json()["nodes"]
    assert nodes["x"]["grad"] == {"shape": [3], "min": -4.0, "max": 4.0, "mean": 2 / 3, "norm": 6.0}
    assert nodes["t"]["value"] == {"shape": [], "min": 9.0, "max": 9.0, "mean": 9.0, "norm": 9.0}


def test_summary_mode_in_a_network_report(client: FlaskClient) -> None:
    body = {
        "input_dim": 3,
        "layers": [{"units": 4}, {"units": 2, "activation": "linear"}],
        "loss": "sum",
        "batch": {"random": {"size": 5}},
        "include": ["gradients"],
        "tensors": "summary",
    }
    nodes = client.post("/v1/network", json=body).get_json()["nodes"]
    assert nodes["layer1.W"]["value"]["shape"] == [3, 4]
    assert set(nodes["layer1.W"]["grad"]) == {"shape", "min", "max", "mean", "norm"}


def test_tensors_takes_only_full_or_summary(client: FlaskClient) -> None:
    r = client.post("/v1/graph", json={"expression": "x", "values": {"x": 1}, "tensors": "some"})
    assert r.status_code == 422
    assert r.get_json()["errors"][0]["loc"] == ["tensors"]


# --- the memory limit's default and the worker's ledger -------------------------------------


def test_the_request_memory_limit_is_sized_from_the_container_and_the_workers() -> None:
    assert request_memory(1024 * MIB, 2) == 416 * MIB  # (1 GiB - 64 MiB) / 2 - 64 MiB
    assert request_memory(1024 * MIB, 4) == 176 * MIB
    assert request_memory(256 * MIB, 8) == 64 * MIB  # never below 64 MiB
    settings = Settings(memory_limit_bytes=1024 * MIB, workers=2)
    assert settings.max_request_memory_bytes == 416 * MIB
    assert Settings(max_request_memory_bytes=100 * MIB).max_request_memory_bytes == 100 * MIB


def test_the_ledger_holds_an_answer_until_it_is_sent(client: FlaskClient) -> None:
    """Under gevent (`wsgi.multithread`) a sent answer is what a request holds at the end."""
    before = LEDGER.held
    r = client.post(
        "/v1/graph",
        json=broadcast_bomb(300),
        environ_overrides={"wsgi.multithread": True},
    )
    assert r.status_code == 200
    assert LEDGER.held == before + len(r.data)  # the answer, until it has been sent
    r.close()
    assert LEDGER.held == before
    client.post("/v1/graph", json=broadcast_bomb(300))  # a sync worker holds nothing after
    assert LEDGER.held == before


def test_a_worker_whose_memory_is_held_answers_503_with_retry_after(app: Flask) -> None:
    client = app.test_client()
    limit = app.config["GRADIAG"].max_request_memory_bytes
    LEDGER.take(limit)  # answers still being sent hold it all
    try:
        r = client.post("/v1/graph", json=broadcast_bomb(100))
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.content_type == PROBLEM
    finally:
        LEDGER.give_back(limit)
    assert client.post("/v1/graph", json=broadcast_bomb(100)).status_code == 200


def test_an_answer_over_the_limit_after_all_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Findings depend on the values: the encoded answer is measured once more."""
    client = create_app(Settings(max_response_bytes=20_000), TESTING=True).test_client()
    monkeypatch.setattr(budget, "ANSWER_FRAME_BYTES", 0)
    monkeypatch.setattr(budget, "NODE_BYTES", 0)
    body = {"nodes": [leaf(f"x{i}", -1.0) for i in range(200)], "output": "x0"}
    body["nodes"] += [node(f"r{i}", "relu", f"x{i}") for i in range(200)]
    r = client.post("/v1/graph", json=body)
    assert r.status_code == 422
    assert r.get_json()["limit"] == "max_response_bytes"
