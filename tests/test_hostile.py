"""Hostile input over HTTP: every case gets its exact status, problem+json for errors, a
quick answer, and the service stays healthy. Most run against the Flask test client; a
representative subset (deep nesting, 60 MiB bodies chunked and plain, ...) against gunicorn.

A case's `expect` is the status; for a 200 it is a report whose health must be `fail` with a
`nonfinite` finding (overflow and non-finite inputs are data, not errors)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from gradiag.service import create_app
from gradiag.service.config import Settings

PROBLEM = "application/problem+json"
FAST = 5.0  # seconds: generous, on a loaded 2-core machine
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    body: Any = None  # JSON-encoded unless `raw` is given
    expect: int = 422
    path: str = "/v1/graph"
    raw: bytes | None = None
    content_type: str | None = "application/json"
    limit: str | None = None  # the `limit` field a 422/413 must name
    loc_end: Any = None  # the last element of the first error's loc
    extra: dict[str, Any] = field(default_factory=dict)

    def data(self) -> bytes:
        return self.raw if self.raw is not None else json.dumps(self.body).encode()


def leaf(id: str, value: Any = 1.0, op: str = "input") -> dict[str, Any]:
    return {"id": id, "op": op, "value": value}


def node(id: str, op: str, *inputs: str, **attrs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": id, "op": op, "inputs": list(inputs)}
    if attrs:
        out["attrs"] = attrs
    return out


def graph(*nodes: dict[str, Any], output: str | None = None, **more: Any) -> dict[str, Any]:
    return {"nodes": list(nodes), "output": output or nodes[-1]["id"], **more}


def network(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_dim": 2,
        "layers": [{"units": 3, "activation": "relu"}, {"units": 2, "activation": "linear"}],
        "loss": "softmax_cross_entropy",
        "batch": {"x": [[1.0, 2.0], [0.5, -1.0]], "y": [0, 1]},
    }
    body.update(over)
    return body


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


NET = "/v1/network"
CASES = [
    # structure
    Case("cycle", graph(leaf("x"), node("a", "add", "x", "b"), node("b", "neg", "a"))),
    Case("self-loop", graph(leaf("x"), node("a", "add", "x", "a"))),
    Case("unknown input id", graph(leaf("x"), node("a", "neg", "nope")), loc_end=0),
    Case("duplicate id", graph(leaf("x"), leaf("x")), loc_end="id"),
    Case("unknown op", graph(leaf("x"), node("a", "frobnicate", "x")), loc_end="op"),
    Case("missing op", graph({"id": "x", "value": 1.0}), loc_end="op"),
    Case("op is a number", graph({"id": "x", "op": 3, "value": 1.0}), loc_end="op"),
    Case("unary op with two inputs", graph(leaf("x"), node("a", "neg", "x", "x"))),
    Case("binary op with one input", graph(leaf("x"), node("a", "add", "x"))),
    Case("binary op with no inputs", graph(leaf("x"), node("a", "mul"))),
    Case("unknown output", graph(leaf("x"), output="y"), loc_end="output"),
    Case("no nodes", {"nodes": [], "output": "x"}),
    Case("extra field", graph(leaf("x"), colour="red")),
    Case("unknown attribute", graph(leaf("x", [1.0]), node("s", "sum", "x", colour="red"))),
    Case(
        "axis is a string", graph(leaf("x", [1.0]), node("s", "sum", "x", axis="a")), loc_end="axis"
    ),
    Case(
        "axis is a bool", graph(leaf("x", [1.0]), node("s", "sum", "x", axis=True)), loc_end="axis"
    ),
    Case("axis out of range", graph(leaf("x", [1.0]), node("s", "sum", "x", axis=5))),
    Case(
        "matmul shape mismatch",
        graph(leaf("a", [[1.0, 2.0]]), leaf("b", [[1.0, 2.0]]), node("m", "matmul", "a", "b")),
    ),
    Case(
        "broadcast mismatch",
        graph(leaf("a", [1.0, 2.0]), leaf("b", [1.0, 2.0, 3.0]), node("s", "add", "a", "b")),
    ),
    Case("output_grad of the wrong shape", graph(leaf("x", [1.0, 2.0]), output_grad=[1.0])),
    # types
    Case("ragged list", graph(leaf("x", [[1.0, 2.0], [3.0]]))),
    Case("string number", graph(leaf("x", "1e3")), loc_end="value"),
    Case("bool number", graph(leaf("x", True)), loc_end="value"),
    Case("null number", graph(leaf("x", None)), loc_end="value"),
    Case("bool deep in a tensor", graph(leaf("x", [[1.0, 2.0], [3.0, False]])), loc_end=1),
    Case("string in a tensor", graph(leaf("x", [1.0, "a", 2.0])), loc_end=1),
    Case("id is a number", graph({"id": 7, "op": "input", "value": 1.0}, output="7")),
    Case("inputs not a list", graph(leaf("x"), {"id": "a", "op": "neg", "inputs": "x"})),
    Case("100k-character id", graph(leaf("x" * 100_000))),
    Case("100k-character output", graph(leaf("x"), output="y" * 100_000)),
    Case("gradcheck is a string", graph(leaf("x"), gradcheck="yes"), loc_end="gradcheck"),
    Case("gradcheck step is a string", graph(leaf("x"), gradcheck={"step": "a"}), loc_end="step"),
    Case(
        "gradcheck options over their bounds",
        graph(leaf("x"), gradcheck={"max_evaluations": 10**9}),
    ),
    # bodies
    Case("empty body", raw=b"", expect=400),
    Case("null body", raw=b"null"),
    Case("array body", raw=b"[1, 2]"),
    Case("number body", raw=b"3"),
    Case("string body", raw=b'"graph"'),
    Case("empty object", raw=b"{}"),
    Case("malformed JSON", raw=b'{"nodes": [', expect=400),
    Case("trailing garbage", raw=b'{"nodes": []} x', expect=400),
    Case("invalid UTF-8", raw=b'{"nodes": [{"id": "\xff"}]}', expect=400),
    Case(
        "deeply nested list",
        raw=b'{"nodes": [{"id": "x", "op": "input", "value": ' + nested(100_000) + b"}]}",
        expect=400,
    ),
    Case("deeply nested objects", raw=b'{"a":' * 100_000 + b"1" + b"}" * 100_000, expect=400),
    Case("text/plain", graph(leaf("x")), content_type="text/plain", expect=415),
    Case(
        "form content type",
        graph(leaf("x")),
        content_type="application/x-www-form-urlencoded",
        expect=415,
    ),
    Case("no content type", graph(leaf("x")), content_type=None, expect=415),
    Case("network text/plain", network(), path=NET, content_type="text/plain", expect=415),
    # expressions
    Case(
        "expression over the length limit",
        {"expression": "x+" * 6000 + "x", "values": {"x": 1.0}},
        limit="max_expression_chars",
    ),
    Case("expression with an import", {"expression": "__import__('os').getpid()", "values": {}}),
    Case("expression with an attribute", {"expression": "x.__class__", "values": {"x": 1.0}}),
    Case("expression with a lambda", {"expression": "(lambda: 1)()", "values": {}}),
    Case(
        "expression with a huge power",
        {"expression": "x ** 10 ** 10 ** 10", "values": {"x": 2.0}},
        expect=200,
    ),
    Case(
        "expression of 5000 nested parentheses",
        {"expression": "(" * 5000 + "x" + ")" * 5000, "values": {"x": 1.0}},
    ),
    Case("expression with an unknown name", {"expression": "x + y", "values": {"x": 1.0}}),
    Case("expression values not numbers", {"expression": "x", "values": {"x": "one"}}, loc_end="x"),
    # sizes
    Case(
        "tensor over max_tensor_elements by broadcasting",
        graph(leaf("a", [[1.0]] * 3000), leaf("b", [[1.0] * 3000]), node("s", "add", "a", "b")),
        limit="max_tensor_elements",
    ),
    # networks
    Case(
        "giant layer",
        network(layers=[{"units": 10**9, "activation": "relu"}]),
        path=NET,
        limit="max_units",
    ),
    Case(
        "giant input_dim",
        network(input_dim=10**9, batch={"random": {"size": 4}}),
        path=NET,
        limit="max_units",
    ),
    Case(
        "too many layers",
        network(layers=[{"units": 2, "activation": "relu"}] * 1000),
        path=NET,
        limit="max_layers",
    ),
    Case(
        "giant random batch",
        network(batch={"random": {"size": 10**9}}),
        path=NET,
        limit="max_batch",
    ),
    Case("layer of zero units", network(layers=[{"units": 0, "activation": "relu"}]), path=NET),
    Case("unknown activation", network(layers=[{"units": 2, "activation": "swish"}]), path=NET),
    Case("unknown loss", network(loss="hinge2"), path=NET),
    Case("label out of range", network(batch={"x": [[1.0, 2.0]], "y": [5]}), path=NET),
    Case("negative label", network(batch={"x": [[1.0, 2.0]], "y": [-1]}), path=NET),
    Case("fractional label", network(batch={"x": [[1.0, 2.0]], "y": [0.5]}), path=NET),
    Case("ragged batch", network(batch={"x": [[1.0, 2.0], [1.0]], "y": [0, 1]}), path=NET),
    Case("batch of the wrong width", network(batch={"x": [[1.0, 2.0, 3.0]], "y": [0]}), path=NET),
    Case("weights of the wrong shape", network(weights=[{"W": [[1.0]], "b": [0.0]}] * 2), path=NET),
    Case("network body is a list", raw=b"[]", path=NET),
    # numbers as data: 200 with a `nonfinite` finding and status `fail`
    Case("overflow to Infinity", {"expression": "exp(x)", "values": {"x": 1000.0}}, expect=200),
    Case("NaN input", graph(leaf("x", "NaN"), node("y", "square", "x")), expect=200),
    Case("Infinity input", graph(leaf("x", ["Infinity", 1.0]), node("s", "sum", "x")), expect=200),
    Case(
        "1e999 reads as Infinity",
        raw=b'{"expression": "x * 2", "values": {"x": 1e999}}',
        expect=200,
    ),
    Case(
        "400-digit integer",
        raw=b'{"expression": "x", "values": {"x": ' + b"9" * 400 + b"}}",
        expect=200,
    ),
    Case("log of zero", {"expression": "log(x)", "values": {"x": 0.0}}, expect=200),
    Case(
        "NaN in a network batch",
        network(batch={"x": [["NaN", 1.0]], "y": [0]}),
        path=NET,
        expect=200,
    ),
]

# Run against the real gunicorn too (with the bodies below).
LIVE = {
    "cycle",
    "unknown op",
    "100k-character id",
    "malformed JSON",
    "deeply nested list",
    "deeply nested objects",
    "text/plain",
    "giant layer",
    "NaN input",
    "expression with an import",
}


def check_answer(case: Case, status: int, content_type: str, body: bytes, elapsed: float) -> None:
    assert status == case.expect, body[:500]
    assert elapsed < FAST, f"{case.name} took {elapsed:.1f} s"
    doc = json.loads(body)
    if case.expect == 200:
        assert content_type.startswith("application/json")
        assert doc["health"]["status"] == "fail"
        assert "nonfinite" in {f["code"] for f in doc["health"]["findings"]}
        return
    assert content_type.startswith(PROBLEM)
    assert doc["status"] == case.expect
    assert {"type", "title", "detail"} <= doc.keys()
    assert "Traceback" not in body.decode(errors="replace")
    if case.limit is not None:
        assert doc["limit"] == case.limit
        assert isinstance(doc["limit_value"], int)
    if case.loc_end is not None:
        assert doc["errors"][0]["loc"][-1] == case.loc_end, doc["errors"]
    if case.expect == 422:
        assert doc["errors"] and all("loc" in e and "msg" in e for e in doc["errors"])
        for e in doc["errors"]:  # no union branch names, no tags in a path
            assert not {"int", "bool", "float", "GradcheckOptions", "list[int]"} & {
                p for p in e["loc"] if isinstance(p, str)
            }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gets_a_clean_answer(client: FlaskClient, case: Case) -> None:
    headers = {} if case.content_type is None else {"Content-Type": case.content_type}
    started = time.monotonic()
    r = client.post(case.path, data=case.data(), headers=headers)
    elapsed = time.monotonic() - started
    check_answer(case, r.status_code, r.content_type or "", r.data, elapsed)
    assert client.get("/healthz").status_code == 200


def test_there_are_at_least_forty_hostile_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


# --- bodies over the size limit ------------------------------------------------------------


def sixty_mib() -> bytes:
    return b'{"expression": "x", "values": {"x": [' + b"1.0, " * (12 * MIB) + b"1.0]}}"


def chunks(data: bytes, size: int = MIB) -> Iterator[bytes]:
    for k in range(0, len(data), size):
        yield data[k : k + size]


def test_sixty_mib_body_with_content_length_is_413(client: FlaskClient) -> None:
    r = client.post("/v1/graph", data=sixty_mib(), content_type="application/json")
    assert r.status_code == 413
    assert r.content_type == PROBLEM
    assert r.get_json()["limit"] == "max_body_bytes"


def test_sixty_mib_chunked_body_is_413(client: FlaskClient) -> None:
    """No Content-Length: the service reads one byte past the limit and refuses."""
    r = client.post(
        "/v1/graph",
        input_stream=io.BytesIO(sixty_mib()),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert r.status_code == 413
    assert r.get_json()["limit_value"] == Settings().max_body_bytes


# --- a long chain: allowed by default ------------------------------------------------------


def test_a_200k_node_chain_is_answered(client: FlaskClient) -> None:
    nodes = [leaf("n0", 0.5)]
    nodes += [node(f"n{k}", "tanh", f"n{k - 1}") for k in range(1, 200_000)]
    started = time.monotonic()
    r = client.post("/v1/graph", json=graph(*nodes))
    assert r.status_code == 200, r.data[:300]
    assert time.monotonic() - started < 30
    assert len(r.get_json()["nodes"]) == 200_000
    assert client.get("/healthz").status_code == 200


# --- the time budget -----------------------------------------------------------------------


@pytest.fixture
def slow_app() -> Flask:
    """Size limits wide open (the answer and memory ones too), a one-second time budget."""
    return create_app(
        Settings(
            max_total_elements=10**9,
            max_flops=10**15,
            max_response_bytes=2**40,
            max_request_memory_bytes=2**40,
            time_budget_seconds=1,
        )
    )


def matmul_tower(n: int, size: int) -> dict[str, Any]:
    """`size` x `size` from two small leaves by broadcasting, then `n` matmuls in a row."""
    nodes = [leaf("a", [[0.001]] * size), leaf("b", [[0.001] * size]), node("m0", "add", "a", "b")]
    nodes += [node(f"m{k}", "matmul", f"m{k - 1}", "m0") for k in range(1, n)]
    return graph(*nodes)


def test_over_the_time_budget_is_a_422_naming_it(slow_app: Flask) -> None:
    client = slow_app.test_client()
    started = time.monotonic()
    r = client.post("/v1/graph", json=matmul_tower(400, 600))
    elapsed = time.monotonic() - started
    assert r.status_code == 422, r.data[:300]
    assert r.content_type == PROBLEM
    doc = r.get_json()
    assert doc["limit"] == "time_budget_seconds"
    assert doc["limit_value"] == 1
    assert elapsed < 1 + FAST
    assert client.get("/healthz").status_code == 200


def test_gradcheck_stops_at_the_time_budget(slow_app: Flask) -> None:
    client = slow_app.test_client()
    body = matmul_tower(40, 300)
    body["nodes"][0]["op"] = "input"
    body["gradcheck"] = {"max_evaluations": 100_000, "max_elements_per_node": 100_000}
    r = client.post("/v1/graph", json=body)
    assert r.status_code == 422, r.data[:300]
    assert r.get_json()["limit"] == "time_budget_seconds"


# --- the same over a real gunicorn ---------------------------------------------------------

LIVE_CASES = [c for c in CASES if c.name in LIVE]


@pytest.mark.live
@pytest.mark.parametrize("case", LIVE_CASES, ids=[c.name for c in LIVE_CASES])
def test_hostile_input_over_gunicorn(live_server: str, case: Case) -> None:
    headers = {} if case.content_type is None else {"Content-Type": case.content_type}
    started = time.monotonic()
    r = requests.post(live_server + case.path, data=case.data(), headers=headers, timeout=30)
    elapsed = time.monotonic() - started
    check_answer(case, r.status_code, r.headers["Content-Type"], r.content, elapsed)
    assert requests.get(live_server + "/healthz", timeout=5).status_code == 200


@pytest.mark.live
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_sixty_mib_body_over_gunicorn_is_413(live_server: str, chunked: bool) -> None:
    data = sixty_mib()
    body: Any = chunks(data) if chunked else data  # a generator: requests sends it chunked
    try:
        r = requests.post(
            live_server + "/v1/graph",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
    except requests.ConnectionError:  # pragma: no cover - the server closed while we sent
        pytest.fail("the connection was closed before a 413 answer arrived")
    assert r.status_code == 413
    assert r.headers["Content-Type"] == PROBLEM
    assert r.json()["limit"] == "max_body_bytes"
    assert requests.get(live_server + "/healthz", timeout=5).status_code == 200
