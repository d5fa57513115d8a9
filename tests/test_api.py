"""POST /v1/graph and the error answers, through the Flask test client."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from gradiag.service import create_app
from gradiag.service.config import Settings

PROBLEM = "application/problem+json"


def post(client: FlaskClient, body: Any) -> TestResponse:
    return client.post("/v1/graph", json=body)


def ok(response: TestResponse) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def problem(response: TestResponse, status: int) -> dict[str, Any]:
    """An RFC 9457 answer: the status, the media type and the required members."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == PROBLEM
    body: dict[str, Any] = json.loads(response.get_data())
    assert body["status"] == status
    for member in ("type", "title", "detail"):
        assert isinstance(body[member], str) and body[member]
    return body


def first_error(response: TestResponse) -> dict[str, Any]:
    body = problem(response, 422)
    assert body["errors"], body
    error: dict[str, Any] = body["errors"][0]
    assert isinstance(error["msg"], str) and error["msg"]
    return error


def subset(actual: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Every expected member, with its value (the service may add members)."""
    return {k: actual.get(k) for k in expected} == expected


def grads(answer: dict[str, Any]) -> dict[str, Any]:
    return {node_id: node.get("grad") for node_id, node in answer["nodes"].items()}


def inp(node_id: str, value: Any, op: str = "input") -> dict[str, Any]:
    return {"id": node_id, "op": op, "value": value}


def gate(node_id: str, op: str, *inputs: str, **attrs: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"id": node_id, "op": op, "inputs": list(inputs)}
    if attrs:
        node["attrs"] = attrs
    return node


CS231N_EXAMPLE = {
    "nodes": [
        inp("x", -2),
        inp("y", 5),
        inp("z", -4),
        gate("q", "add", "x", "y"),
        gate("f", "mul", "q", "z"),
    ],
    "output": "f",
}


# --- the CS231n circuits ----------------------------------------------------------------


def test_cs231n_add_multiply_circuit(client: FlaskClient) -> None:
    answer = ok(post(client, CS231N_EXAMPLE))
    assert answer["output"] == {"id": "f", "value": -12.0, "shape": []}
    assert grads(answer) == {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0, "f": 1.0}
    assert subset(answer["nodes"]["q"], {"op": "add", "shape": [], "value": 3.0, "grad": -4.0})
    assert answer["parameters"] == {"tensors": 0, "total": 0}
    diagnostics = answer["diagnostics"]
    assert subset(
        diagnostics["relu"], {"nodes": 0, "elements": 0, "dead_elements": 0, "dead_fraction": 0.0}
    )
    assert subset(
        diagnostics["sigmoid"],
        {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0},
    )
    assert diagnostics["nonfinite_nodes"] == []
    assert answer["health"] == {"status": "ok", "findings": []}


NEURON_INPUTS = [inp("w0", 2), inp("x0", -1), inp("w1", -3), inp("x1", -2), inp("w2", -3)]
NEURON_GRADS = {"w0": -0.1966, "x0": 0.3932, "w1": -0.3932, "x1": -0.5898, "w2": 0.1966}


def test_cs231n_sigmoid_neuron_gate_by_gate(client: FlaskClient) -> None:
    # f = 1 / (1 + exp(-(w0*x0 + w1*x1 + w2)))
    body = {
        "nodes": [
            *NEURON_INPUTS,
            gate("m0", "mul", "w0", "x0"),
            gate("m1", "mul", "w1", "x1"),
            gate("s0", "add", "m0", "m1"),
            gate("s", "add", "s0", "w2"),
            gate("n", "neg", "s"),
            gate("e", "exp", "n"),
            inp("one", 1, "const"),
            gate("d", "add", "e", "one"),
            gate("f", "reciprocal", "d"),
        ],
        "output": "f",
    }
    answer = ok(post(client, body))
    assert answer["output"]["value"] == pytest.approx(0.7311, abs=1e-4)
    g = grads(answer)
    for node_id, expected in NEURON_GRADS.items():
        assert g[node_id] == pytest.approx(expected, abs=1e-4), node_id
    # The steps of the CS231n walk-through: 1/d -> -1/d^2 = -0.5344, * e = -0.1966 ...
    assert g["d"] == pytest.approx(-0.5344, abs=1e-4)
    assert g["n"] == pytest.approx(-0.1966, abs=1e-4)
    assert g["s"] == pytest.approx(0.1966, abs=1e-4)
    assert "grad" not in answer["nodes"]["one"]


def test_cs231n_sigmoid_neuron_as_one_sigmoid_gate(client: FlaskClient) -> None:
    body = {
        "nodes": [
            *NEURON_INPUTS,
            gate("m0", "mul", "w0", "x0"),
            gate("m1", "mul", "w1", "x1"),
            gate("s0", "add", "m0", "m1"),
            gate("s", "add", "s0", "w2"),
            gate("f", "sigmoid", "s"),
        ],
        "output": "f",
    }
    answer = ok(post(client, body))
    assert answer["output"]["value"] == pytest.approx(0.7311, abs=1e-4)
    g = grads(answer)
    for node_id, expected in NEURON_GRADS.items():
        assert g[node_id] == pytest.approx(expected, abs=1e-4), node_id
    # s = 1 is far from saturation
    assert subset(
        answer["diagnostics"]["sigmoid"],
        {"nodes": 1, "elements": 1, "saturated_elements": 0, "saturated_fraction": 0.0},
    )


def test_squared_norm_of_matrix_vector_product(client: FlaskClient) -> None:
    # f = ||W x||^2; q = W x = [0.22, 0.26]; f = 0.0484 + 0.0676 = 0.116
    # df/dW = 2 q x^T = [[0.088, 0.176], [0.104, 0.208]]; df/dx = 2 W^T q = [-0.112, 0.636]
    body = {
        "nodes": [
            inp("W", [[0.1, 0.5], [-0.3, 0.8]]),
            inp("x", [0.2, 0.4]),
            gate("q", "matmul", "W", "x"),
            gate("q2", "square", "q"),
            gate("f", "sum", "q2"),
        ],
        "output": "f",
    }
    answer = ok(post(client, body))
    assert answer["output"]["value"] == pytest.approx(0.116, abs=1e-12)
    nodes = answer["nodes"]
    assert nodes["q"]["value"] == pytest.approx([0.22, 0.26], abs=1e-12)
    assert nodes["q"]["grad"] == pytest.approx([0.44, 0.52], abs=1e-12)
    assert nodes["W"]["shape"] == [2, 2]
    for row, expected in zip(nodes["W"]["grad"], [[0.088, 0.176], [0.104, 0.208]], strict=True):
        assert row == pytest.approx(expected, abs=1e-12)
    assert nodes["x"]["grad"] == pytest.approx([-0.112, 0.636], abs=1e-12)


# --- semantics: kinks, fan-out, unconnected inputs, consts, params, order ---------------


def test_kinks_and_ties_follow_pytorch_over_http(client: FlaskClient) -> None:
    body = {
        "nodes": [
            inp("r_in", 0.0),
            inp("a_in", 0.0),
            inp("l_in", 0.0),
            inp("p", 2.0),
            inp("q", 2.0),
            gate("r", "relu", "r_in"),
            gate("a", "abs", "a_in"),
            gate("l", "leaky_relu", "l_in", alpha=0.25),
            gate("m", "max", "p", "q"),
            gate("n", "min", "p", "q"),
            gate("t1", "add", "r", "a"),
            gate("t2", "add", "t1", "l"),
            gate("t3", "add", "t2", "m"),
            gate("f", "add", "t3", "n"),
        ],
        "output": "f",
    }
    g = grads(ok(post(client, body)))
    assert g["r_in"] == 0.0
    assert g["a_in"] == 0.0
    assert g["l_in"] == 0.25
    assert g["p"] == g["q"] == 1.0  # 0.5 from max plus 0.5 from min


def test_leaky_relu_default_alpha_at_zero(client: FlaskClient) -> None:
    body = {"nodes": [inp("x", [0.0, -2.0, 3.0]), gate("f", "leaky_relu", "x")], "output": "f"}
    answer = ok(post(client, body))
    assert answer["nodes"]["f"]["value"] == [0.0, -0.02, 3.0]
    assert grads(answer)["x"] == [0.01, 0.01, 1.0]


def test_fan_out_accumulates(client: FlaskClient) -> None:
    # b = a + a = 6; c = b * b = 36; dc/db = 2b = 12; dc/da = 2 * 12 = 24 = 4b
    body = {"nodes": [inp("a", 3), gate("b", "add", "a", "a"), gate("c", "mul", "b", "b")]}
    answer = ok(post(client, {**body, "output": "c"}))
    assert answer["output"]["value"] == 36.0
    assert grads(answer) == {"a": 24.0, "b": 12.0, "c": 1.0}


def test_input_not_connected_to_output_gets_zero_gradient(client: FlaskClient) -> None:
    body = {
        "nodes": [inp("x", 2.0), inp("spare", [[1.0, 2.0], [3.0, 4.0]]), gate("f", "exp", "x")],
        "output": "f",
    }
    g = grads(ok(post(client, body)))
    assert g["spare"] == [[0.0, 0.0], [0.0, 0.0]]


def test_const_nodes_have_no_grad_key(client: FlaskClient) -> None:
    body = {
        "nodes": [inp("x", 3.0), inp("c", 2.0, "const"), gate("f", "pow", "x", "c")],
        "output": "f",
    }
    answer = ok(post(client, body))
    assert answer["output"]["value"] == 9.0
    assert "grad" not in answer["nodes"]["c"]
    assert subset(answer["nodes"]["c"], {"op": "const", "shape": [], "value": 2.0})
    assert answer["nodes"]["x"]["grad"] == 6.0

    const_output = ok(post(client, {"nodes": [inp("c", [1.0, 2.0], "const")], "output": "c"}))
    assert "grad" not in const_output["nodes"]["c"]


def test_parameters_count_param_tensors_and_elements_once_each(client: FlaskClient) -> None:
    body = {
        "nodes": [
            inp("W", [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], "param"),  # 6 elements
            inp("b", [0.5, -0.5], "param"),  # 2 elements
            inp("x", [1.0, 2.0, 3.0]),  # an input, not a parameter
            inp("k", 2.0, "const"),
            gate("h", "matmul", "W", "x"),
            gate("z", "add", "h", "b"),
            gate("hW", "mul", "W", "k"),  # W used a second time
            gate("sW", "sum", "hW"),
            gate("sz", "sum", "z"),
            gate("f", "add", "sz", "sW"),
        ],
        "output": "f",
    }
    answer = ok(post(client, body))
    assert answer["parameters"] == {"tensors": 2, "total": 8}
    # dW accumulates both uses: x^T from the matmul row sums, plus 2 from mul by k
    assert answer["nodes"]["W"]["grad"] == [[3.0, 4.0, 5.0], [3.0, 4.0, 5.0]]
    assert answer["nodes"]["b"]["grad"] == [1.0, 1.0]


def test_response_lists_nodes_in_topological_order(client: FlaskClient) -> None:
    body = {
        "nodes": [
            gate("f", "mul", "q", "z"),
            gate("q", "add", "x", "y"),
            inp("z", -4),
            inp("x", -2),
            inp("y", 5),
        ],
        "output": "f",
    }
    response = post(client, body)
    answer = ok(response)
    order = list(orjson.loads(response.get_data())["nodes"])  # as serialised
    assert order == list(answer["nodes"]) == ["z", "x", "y", "q", "f"]
    assert answer["output"]["value"] == -12.0
    assert grads(answer) == {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0, "f": 1.0}


def test_output_grad_scales_every_gradient(client: FlaskClient) -> None:
    answer = ok(post(client, {**CS231N_EXAMPLE, "output_grad": 2.0}))
    assert grads(answer) == {"x": -8.0, "y": -8.0, "z": 6.0, "q": -8.0, "f": 2.0}


def test_reduction_and_transpose_attrs_over_http(client: FlaskClient) -> None:
    body = {
        "nodes": [
            inp("a", [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
            gate("t", "transpose", "a"),
            gate("m", "mean", "t", axis=1, keepdims=True),
            gate("s", "sum", "m", axis=[0, 1]),
        ],
        "output": "s",
    }
    answer = ok(post(client, body))
    assert answer["nodes"]["t"]["shape"] == [3, 2]
    assert answer["nodes"]["m"]["value"] == [[2.5], [3.5], [4.5]]
    assert answer["output"]["value"] == 10.5
    assert grads(answer)["a"] == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]


def test_losses_over_http(client: FlaskClient) -> None:
    body = {
        "nodes": [
            inp("s", [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]),
            inp("y", [1.0, 0.0], "const"),
            inp("t", [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], "const"),
            gate("hinge", "svm_hinge", "s", "y"),
            gate("mse", "mse", "s", "t"),
        ],
        "output": "hinge",
    }
    answer = ok(post(client, body))
    # row 0: label 1 (2.0): max(0, 1-2+1) + max(0, 0-2+1) = 0; row 1: label 0 (0.0):
    # max(0, 0-0+1) + max(0, 3-0+1) = 5; mean = 2.5
    assert answer["output"]["value"] == 2.5
    assert grads(answer)["s"] == [[0.0, 0.0, 0.0], [-1.0, 0.5, 0.5]]
    # mse: diffs [0, 2, 0, 0, 0, 2] -> (4 + 4) / 6
    assert answer["nodes"]["mse"]["value"] == pytest.approx(8.0 / 6.0)


# --- numerical stability and non-finite values ------------------------------------------


def test_sigmoid_at_plus_minus_1000_is_finite(client: FlaskClient) -> None:
    body = {
        "nodes": [inp("x", [-1000.0, 1000.0]), gate("s", "sigmoid", "x"), gate("f", "sum", "s")],
        "output": "f",
    }
    answer = ok(post(client, body))
    assert answer["nodes"]["s"]["value"] == [0.0, 1.0]
    assert grads(answer)["x"] == [0.0, 0.0]
    assert answer["diagnostics"]["nonfinite_nodes"] == []
    assert answer["diagnostics"]["sigmoid"]["saturated_elements"] == 2
    assert answer["health"]["status"] == "ok"  # a vector has no batch axis: counted, not graded
    body["nodes"][0] = inp("x", [[-1000.0, 1000.0]])  # one example of two units
    answer = ok(post(client, body))
    assert answer["diagnostics"]["sigmoid"]["saturated_units"] == 2
    assert answer["health"]["status"] == "fail"  # 100% saturated
    codes = [f["code"] for f in answer["health"]["findings"]]
    assert codes == ["saturated_sigmoid", "saturated_activations"]


def test_softmax_cross_entropy_with_scores_of_1000_is_finite(client: FlaskClient) -> None:
    body = {
        "nodes": [
            inp("s", [[1000.0, -1000.0], [-1000.0, 1000.0]]),
            inp("y", [0, 0], "const"),
            gate("loss", "softmax_cross_entropy", "s", "y"),
        ],
        "output": "loss",
    }
    answer = ok(post(client, body))
    assert answer["output"]["value"] == pytest.approx(1000.0)
    ds = grads(answer)["s"]
    assert ds[0] == pytest.approx([0.0, 0.0])
    assert ds[1] == pytest.approx([-0.5, 0.5])
    assert answer["diagnostics"]["nonfinite_nodes"] == []


def test_log_of_zero_is_minus_infinity_and_fails_health(client: FlaskClient) -> None:
    body = {"nodes": [inp("x", 0.0), gate("y", "log", "x")], "output": "y"}
    response = post(client, body)
    assert b"-Infinity" in response.get_data()
    assert b"NaN," not in response.get_data()  # strings, never bare JSON-breaking tokens
    answer = ok(response)
    assert answer["output"]["value"] == "-Infinity"
    assert answer["nodes"]["y"]["value"] == "-Infinity"
    assert answer["nodes"]["x"]["grad"] == "Infinity"
    assert "y" in answer["diagnostics"]["nonfinite_nodes"]
    assert answer["health"]["status"] == "fail"
    (finding,) = answer["health"]["findings"]
    assert finding["code"] == "nonfinite"
    assert finding["severity"] == "fail"


def test_nonfinite_strings_are_accepted_as_inputs(client: FlaskClient) -> None:
    body = {
        "nodes": [
            inp("x", ["NaN", "Infinity", "-Infinity", 1.0]),
            gate("e", "exp", "x"),
        ],
        "output": "e",
    }
    answer = ok(post(client, body))
    assert answer["nodes"]["x"]["value"] == ["NaN", "Infinity", "-Infinity", 1.0]
    assert answer["nodes"]["e"]["value"][:3] == ["NaN", "Infinity", 0.0]
    assert answer["nodes"]["e"]["value"][3] == pytest.approx(2.718281828459045)
    assert answer["diagnostics"]["nonfinite_nodes"] == ["x", "e"]
    assert answer["health"]["status"] == "fail"


def test_nonfinite_output_grad_string_is_accepted(client: FlaskClient) -> None:
    answer = ok(post(client, {**CS231N_EXAMPLE, "output_grad": "NaN"}))
    assert grads(answer)["x"] == "NaN"


# --- a long chain over HTTP -------------------------------------------------------------


def test_200k_node_chain_over_http(client: FlaskClient) -> None:
    nodes: list[dict[str, Any]] = [inp("x", 0.5), inp("c", 1.0, "const")]
    previous = "x"
    for k in range(200_000 - 2):
        node_id = f"n{k}"
        nodes.append(
            gate(node_id, "add", previous, "c") if k % 2 == 0 else gate(node_id, "neg", previous)
        )
        previous = node_id
    data = orjson.dumps({"nodes": nodes, "output": previous})
    assert len(data) < Settings().max_body_bytes
    started = time.perf_counter()
    response = client.post("/v1/graph", data=data, content_type="application/json")
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    answer = orjson.loads(response.get_data())
    assert answer["output"] == {"id": previous, "value": -1.5, "shape": []}
    assert len(answer["nodes"]) == 200_000
    assert answer["nodes"]["x"]["grad"] == -1.0
    assert "grad" not in answer["nodes"]["c"]
    assert elapsed < 60  # a bound against a hang, not a benchmark (CPUs here are shared)


# --- errors -----------------------------------------------------------------------------


@pytest.fixture
def small_client() -> FlaskClient:
    app: Flask = create_app(Settings(max_body_bytes=1000), TESTING=True)
    return app.test_client()


def test_malformed_json_is_400(client: FlaskClient) -> None:
    response = client.post("/v1/graph", data='{"nodes": [', content_type="application/json")
    assert "JSON" in problem(response, 400)["detail"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_wrong_content_type_is_415(client: FlaskClient, content_type: str) -> None:
    body = json.dumps(CS231N_EXAMPLE)
    problem(client.post("/v1/graph", data=body, content_type=content_type), 415)


def test_missing_content_type_is_415(client: FlaskClient) -> None:
    problem(client.post("/v1/graph", data=json.dumps(CS231N_EXAMPLE)), 415)


def test_body_over_the_limit_with_content_length_is_413(small_client: FlaskClient) -> None:
    data = json.dumps({"nodes": [inp("x", [1.0] * 500)], "output": "x"})
    assert len(data) > 1000
    response = small_client.post("/v1/graph", data=data, content_type="application/json")
    body = problem(response, 413)
    assert body["limit"] == "max_body_bytes"
    assert body["limit_value"] == 1000


def chunked(client: FlaskClient, data: bytes) -> TestResponse:
    """No Content-Length at all: the body ends where the server says, as gunicorn does for
    `Transfer-Encoding: chunked` (it sets `wsgi.input_terminated`)."""
    environ = EnvironBuilder(
        path="/v1/graph",
        method="POST",
        content_type="application/json",
        headers=[("Transfer-Encoding", "chunked")],
    ).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = _Unsized(data)
    environ["wsgi.input_terminated"] = True
    return client.open(Request(environ))


class _Unsized(io.RawIOBase):
    """A stream whose length cannot be known in advance, read in small pieces."""

    def __init__(self, data: bytes) -> None:
        self._pieces: Iterator[bytes] = (data[i : i + 100] for i in range(0, len(data), 100))
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = next(self._pieces, b"")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def test_chunked_body_over_the_limit_is_413_not_truncated(small_client: FlaskClient) -> None:
    data = json.dumps({"nodes": [inp("x", [1.0] * 500)], "output": "x"}).encode()
    response = chunked(small_client, data)
    assert "CONTENT_LENGTH" not in response.request.environ
    assert problem(response, 413)["limit"] == "max_body_bytes"


def test_chunked_body_under_the_limit_is_read_whole(small_client: FlaskClient) -> None:
    data = json.dumps(CS231N_EXAMPLE).encode()
    assert len(data) < 1000
    answer = ok(chunked(small_client, data))
    assert answer["output"]["value"] == -12.0


def test_a_declared_body_arriving_in_pieces_is_read_whole(client: FlaskClient) -> None:
    """With a Content-Length the body is asked for in one read; a raw stream (any server
    but gunicorn) hands it over 100 bytes at a time, and the rest is asked for until all
    that was declared has come."""
    data = json.dumps({**CS231N_EXAMPLE, "gradcheck": True}).encode()
    assert len(data) > 200  # three pieces at least
    environ = EnvironBuilder(path="/v1/graph", method="POST", content_type="application/json")
    environ = environ.get_environ()
    environ["CONTENT_LENGTH"] = str(len(data))
    environ["wsgi.input"] = _Unsized(data)
    answer = ok(client.open(Request(environ)))
    assert answer["output"]["value"] == -12.0
    assert answer["gradcheck"]["passed"] is True


def test_unknown_op_is_422_naming_the_node(client: FlaskClient) -> None:
    body = {"nodes": [inp("x", 1.0), gate("y", "frobnicate", "x")], "output": "y"}
    error = first_error(post(client, body))
    assert error["loc"][:2] == ["nodes", 1]
    assert error["node"] == "y"
    assert "frobnicate" in error["msg"]


def test_unknown_input_id_is_422_at_the_reference(client: FlaskClient) -> None:
    body = {"nodes": [inp("x", 1.0), gate("y", "add", "x", "ghost")], "output": "y"}
    error = first_error(post(client, body))
    assert error["loc"] == ["nodes", 1, "inputs", 1]
    assert error["node"] == "y"
    assert "'ghost'" in error["msg"]


def test_duplicate_id_is_422(client: FlaskClient) -> None:
    body = {"nodes": [inp("x", 1.0), inp("y", 2.0), inp("x", 3.0)], "output": "y"}
    error = first_error(post(client, body))
    assert error["loc"] == ["nodes", 2, "id"]
    assert error["node"] == "x"
    assert "duplicate" in error["msg"]


@pytest.mark.parametrize(("op", "inputs"), [("add", ["x"]), ("neg", ["x", "x"]), ("exp", [])])
def test_wrong_arity_is_422(client: FlaskClient, op: str, inputs: list[str]) -> None:
    body = {"nodes": [inp("x", 1.0), {"id": "y", "op": op, "inputs": inputs}], "output": "y"}
    error = first_error(post(client, body))
    assert error["loc"] == ["nodes", 1, "inputs"]
    assert error["node"] == "y"


def test_cycle_is_422_and_named(client: FlaskClient) -> None:
    body = {
        "nodes": [
            inp("x", 1.0),
            gate("a", "add", "x", "c"),
            gate("b", "tanh", "a"),
            gate("c", "neg", "b"),
        ],
        "output": "c",
    }
    response = post(client, body)
    error = first_error(response)
    assert error["node"] in {"a", "b", "c"}
    assert error["loc"] == ["nodes", ["a", "b", "c"].index(error["node"]) + 1]
    for node_id in ("'a'", "'b'", "'c'"):
        assert node_id in error["msg"]
    assert "cycle" in problem(response, 422)["detail"]


def test_self_loop_is_422(client: FlaskClient) -> None:
    body = {"nodes": [inp("x", 1.0), gate("y", "mul", "x", "y")], "output": "y"}
    error = first_error(post(client, body))
    assert error == {
        "loc": ["nodes", 1],
        "msg": "the graph has a cycle: 'y' -> 'y'",
        "node": "y",
    }


def test_unknown_output_is_422(client: FlaskClient) -> None:
    error = first_error(post(client, {"nodes": [inp("x", 1.0)], "output": "nowhere"}))
    assert error["loc"] == ["output"]
    assert "'nowhere'" in error["msg"]


@pytest.mark.parametrize(
    ("a", "b", "op", "words"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], "add", "[2] and [3]"),
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0]], "matmul", "inner sizes 3 != 1"),
    ],
)
def test_shape_mismatch_is_422_naming_the_node(
    client: FlaskClient, a: Any, b: Any, op: str, words: str
) -> None:
    body = {"nodes": [inp("a", a), inp("b", b), gate("bad", op, "a", "b")], "output": "bad"}
    error = first_error(post(client, body))
    assert error["loc"][:2] == ["nodes", 2]
    assert error["node"] == "bad"
    assert words in error["msg"]


def test_output_grad_of_wrong_shape_is_422(client: FlaskClient) -> None:
    error = first_error(post(client, {**CS231N_EXAMPLE, "output_grad": [1.0, 2.0]}))
    assert error["loc"] == ["output_grad"]


@pytest.mark.parametrize("value", [[[1.0, 2.0], [3.0]], [[1.0], 2.0], [[[1.0]], [[1.0, 2.0]]]])
def test_ragged_list_is_422(client: FlaskClient, value: Any) -> None:
    body = {"nodes": [inp("a", 1.0), inp("x", value)], "output": "x"}
    error = first_error(post(client, body))
    assert error["loc"][:3] == ["nodes", 1, "value"]
    assert error["node"] == "x"


@pytest.mark.parametrize("bad", [True, False, "1e3", "inf", "nan", None, {"v": 1}])
def test_non_number_where_a_number_belongs_is_422(client: FlaskClient, bad: Any) -> None:
    body = {"nodes": [inp("a", 1.0), inp("x", bad)], "output": "x"}
    error = first_error(post(client, body))
    assert error["loc"] == ["nodes", 1, "value"]
    assert error["node"] == "x"


@pytest.mark.parametrize("bad", [True, "1e3"])
def test_non_number_inside_a_list_is_422(client: FlaskClient, bad: Any) -> None:
    body = {"nodes": [inp("x", [1.0, bad])], "output": "x"}
    body_answer = problem(post(client, body), 422)
    locs = [error["loc"] for error in body_answer["errors"]]
    assert ["nodes", 0, "value", 1] in locs
    assert all(loc[:3] == ["nodes", 0, "value"] for loc in locs)
    assert {error["node"] for error in body_answer["errors"]} == {"x"}


def test_boolean_attr_where_a_number_belongs_is_422(client: FlaskClient) -> None:
    body = {"nodes": [{**inp("x", 1.0)}, gate("y", "leaky_relu", "x", alpha=True)], "output": "y"}
    error = first_error(post(client, body))
    assert error["loc"][:4] == ["nodes", 1, "attrs", "alpha"]
    assert error["node"] == "y"


@pytest.mark.parametrize("labels", [[2, 0], [0, -1], [0.5, 0]])
def test_labels_out_of_range_are_422(client: FlaskClient, labels: list[float]) -> None:
    body = {
        "nodes": [
            inp("s", [[1.0, 2.0], [3.0, 4.0]]),
            inp("y", labels, "const"),
            gate("loss", "softmax_cross_entropy", "s", "y"),
        ],
        "output": "loss",
    }
    error = first_error(post(client, body))
    assert error["loc"][:2] == ["nodes", 2]
    assert error["node"] == "loss"
    assert "not an integer class in [0, 2)" in error["msg"]


def test_unknown_field_is_422(client: FlaskClient) -> None:
    body = {"nodes": [{**inp("x", 1.0), "grad": 1.0}], "output": "x"}
    error = first_error(post(client, body))
    assert error["loc"] == ["nodes", 0, "grad"]
    assert error["node"] == "x"


def test_unknown_route_is_json_404(client: FlaskClient) -> None:
    problem(client.get("/v1/nothing-here"), 404)


def test_wrong_method_is_json_405_with_allow_header(client: FlaskClient) -> None:
    response = client.get("/v1/graph")
    problem(response, 405)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("data", ["[]", "null", "3", '"graph"', "{}"])
def test_body_that_is_not_a_graph_object_is_422(client: FlaskClient, data: str) -> None:
    response = client.post("/v1/graph", data=data, content_type="application/json")
    assert problem(response, 422)["errors"]


@pytest.mark.parametrize("data", ["[" * 100_000, '{"nodes": ' + "[" * 100_000])
def test_deep_nesting_is_a_client_error_not_a_crash(client: FlaskClient, data: str) -> None:
    response = client.post("/v1/graph", data=data, content_type="application/json")
    assert 400 <= response.status_code < 500
    assert response.headers["Content-Type"] == PROBLEM


def test_deep_but_closed_nesting_in_a_value_is_a_client_error(client: FlaskClient) -> None:
    value = "[" * 5000 + "1.0" + "]" * 5000
    data = '{"nodes": [{"id": "x", "op": "input", "value": ' + value + '}], "output": "x"}'
    response = client.post("/v1/graph", data=data, content_type="application/json")
    assert 400 <= response.status_code < 500
    assert response.headers["Content-Type"] == PROBLEM
