"""The health rules of contract revision 2 on real models: units along the batch axis, margins,
saturated activations, the same verdict for a network and its lowered graph, the micrograd
demo three ways against micrograd and PyTorch (tests/fixtures/oracle/micrograd_demo), the
pinned verdict of every example, and advice that fits the network."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from oracle_models import OracleModel, micrograd_graph_body, micrograd_moons, network_body

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
ORACLE = REPO / "tests" / "fixtures" / "oracle" / "micrograd_demo"

# Every example's verdict, as `gradiag check` and dashboards read it.
VERDICTS = {
    "cs231n-neuron.expression.json": "ok",
    "cs231n-sigmoid.expression.json": "ok",
    "cs231n.graph.json": "ok",
    "dead-relu.network.json": "fail",
    "exploding.graph.json": "fail",
    "healthy.network.json": "ok",
    "saturated-sigmoid.network.json": "fail",
    "three-layer.network.json": "ok",
}


def post(client: FlaskClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    answer: dict[str, Any] = response.get_json()
    return answer


def endpoint(name: str) -> str:
    return "/v1/network" if name.endswith(".network.json") else "/v1/graph"


def test_every_example_has_a_pinned_verdict() -> None:
    assert sorted(path.name for path in EXAMPLES.glob("*.json")) == sorted(VERDICTS)


@pytest.mark.parametrize(("name", "status"), VERDICTS.items())
def test_each_example_gets_its_verdict(client: FlaskClient, name: str, status: str) -> None:
    body = json.loads((EXAMPLES / name).read_text())
    assert post(client, endpoint(name), body)["health"]["status"] == status


def lowered_graph(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    """The graph a network lowers to, as a /v1/graph nodes body: its nodes (explained, for
    their inputs) with every leaf's value."""
    report = post(client, "/v1/network", {**body, "include": ["gradients"], "explain": True})
    nodes = []
    for node_id, node in report["nodes"].items():
        if "inputs" in node:
            nodes.append({"id": node_id, "op": node["op"], "inputs": node["inputs"]})
        else:
            nodes.append({"id": node_id, "op": node["op"], "value": node["value"]})
    return {"nodes": nodes, "output": "loss"}


@pytest.mark.parametrize("name", ["healthy.network.json", "dead-relu.network.json"])
def test_a_network_and_its_lowered_graph_get_the_same_verdict(
    client: FlaskClient, name: str
) -> None:
    body = json.loads((EXAMPLES / name).read_text())
    network = post(client, "/v1/network", body)
    graph = post(client, "/v1/graph", lowered_graph(client, body))
    assert graph["health"]["status"] == network["health"]["status"] == VERDICTS[name]
    dead = sum(layer["dead_units"] for layer in network["layers"] if layer["activation"] == "relu")
    units = sum(layer["units"] for layer in network["layers"] if layer["activation"] == "relu")
    assert (graph["diagnostics"]["relu"]["dead_units"], graph["diagnostics"]["relu"]["units"]) == (
        dead,
        units,
    )
    codes = {(f["code"], f["location"].split(".")[0]) for f in graph["health"]["findings"]}
    assert codes == {(f["code"], f["location"]) for f in network["health"]["findings"]}


# --- the micrograd demo, three ways -----------------------------------------------------------


@pytest.fixture(scope="module")
def moons() -> OracleModel:
    return micrograd_moons()


@pytest.fixture(scope="module")
def oracle() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(ORACLE / "moons.npz") as arrays:
        return json.loads((ORACLE / "moons.json").read_text()), dict(arrays)


def micrograd_columns(model: OracleModel) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The demo as micrograd builds it, one number per node, as a columns body: each neuron
    is b + w0*x0 + w1*x1 + ... (micrograd's `sum(..., self.b)`), relu on the hidden layers;
    the loss mean(relu(1 - y * score)) + alpha * sum(p * p). Returns the body and, per
    parameter, the rows of its scalars (W row-major, then b)."""
    ops: list[str] = []
    first: list[int] = []
    second: list[int] = []
    values: list[float | None] = []

    def row(op: str, a: int = -1, b: int = -1, value: float | None = None) -> int:
        ops.append(op)
        first.append(a)
        second.append(b)
        values.append(value)
        return len(ops) - 1

    params: dict[str, list[int]] = {}
    for i, w in enumerate(model.weights, 1):
        params[f"layer{i}.W"] = [row("param", value=float(v)) for v in w["W"].ravel()]
        params[f"layer{i}.b"] = [row("param", value=float(v)) for v in w["b"]]
    one = row("const", value=1.0)
    alpha = row("const", value=model.l2 / 2)
    losses = []
    for x, y in zip(model.x, model.y, strict=True):
        acts = [row("input", value=float(v)) for v in x]
        for i, w in enumerate(model.weights, 1):
            fan_in, units = w["W"].shape
            out = []
            for j in range(units):
                total = params[f"layer{i}.b"][j]
                for k in range(fan_in):
                    weight = params[f"layer{i}.W"][k * units + j]
                    total = row("add", total, row("mul", weight, acts[k]))
                out.append(row("relu", total) if i < len(model.weights) else total)
            acts = out
        ys = row("mul", row("const", value=-float(y)), acts[0])
        losses.append(row("relu", row("add", one, ys)))
    data = losses[0]
    for loss in losses[1:]:
        data = row("add", data, loss)
    data = row("mul", data, row("const", value=1.0 / len(losses)))
    squares = [row("mul", p, p) for rows in params.values() for p in rows]
    reg = squares[0]
    for square in squares[1:]:
        reg = row("add", reg, square)
    row("add", data, row("mul", alpha, reg))
    body = {"columns": {"op": ops, "inputs": [first, second], "value": values}}
    return body, params


def assert_gradients(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, grad in want.items():
        np.testing.assert_allclose(got[name], grad, rtol=1e-12, atol=1e-14, err_msg=name)


def micrograd_grads(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = "micrograd."
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix + "layer")}


def test_the_micrograd_demo_as_scalar_columns(
    client: FlaskClient, moons: OracleModel, oracle: tuple[dict[str, Any], Any]
) -> None:
    body, params = micrograd_columns(moons)
    assert len(body["columns"]["op"]) > 60_000  # micrograd's own graph: a node per number
    answer = post(client, "/v1/graph", {**body, "encoding": "lists"})
    grads = np.array([np.nan if g is None else g for g in answer["columns"]["grad"]])
    shapes = {f"layer{i}.{p}": w[p].shape for i, w in enumerate(moons.weights, 1) for p in w}
    got = {name: grads[rows].reshape(shapes[name]) for name, rows in params.items()}
    facts, arrays = oracle
    assert_gradients(got, micrograd_grads(arrays))
    assert answer["output"]["value"] == pytest.approx(facts["micrograd"]["loss"], rel=1e-12)
    # a scalar graph has no batch axis: its relus are counted, never graded as dead units
    assert answer["diagnostics"]["relu"]["nodes"] > 3000
    assert not [f for f in answer["health"]["findings"] if f["code"] == "dead_relu"]


def test_the_micrograd_demo_as_a_tensor_graph(
    client: FlaskClient, moons: OracleModel, oracle: tuple[dict[str, Any], Any]
) -> None:
    answer = post(client, "/v1/graph", micrograd_graph_body(moons))
    nodes = answer["nodes"]
    got = {}
    for i in range(1, 4):
        got[f"layer{i}.W"] = np.array(nodes[f"W{i}"]["grad"])
        got[f"layer{i}.b"] = np.array(nodes[f"b{i}"]["grad"])
    facts, arrays = oracle
    assert_gradients(got, micrograd_grads(arrays))
    relu = answer["diagnostics"]["relu"]
    torch_dead = facts["torch"]["dead_units"]
    assert relu["dead_units"] == sum(len(units) for units in torch_dead.values())
    # 32 hidden units and the hinge's relu (one unit, a margin: counted, never graded)
    assert relu["units"] == 33 and relu["margin_nodes"] == 1
    locations = {f["location"] for f in answer["health"]["findings"]}
    assert "hinge" not in locations  # a margin met is not a dead layer


def test_the_micrograd_demo_as_a_network(
    client: FlaskClient, moons: OracleModel, oracle: tuple[dict[str, Any], Any]
) -> None:
    report = post(client, "/v1/network", network_body(moons))
    got = {name: np.array(node["grad"]) for name, node in report["nodes"].items() if "grad" in node}
    facts, arrays = oracle
    assert_gradients(got, micrograd_grads(arrays))
    assert report["loss"] == pytest.approx(facts["micrograd"]["loss"], rel=1e-12)
    torch_dead = facts["torch"]["dead_units"]
    for layer in report["layers"][:2]:
        assert layer["dead_unit_indices"] == torch_dead[str(layer["index"])]
    assert report["parameters"]["total"] == facts["torch"]["parameters_torch"]


# --- saturation grows with the weights' scale -------------------------------------------------


def iris_like(scale: float) -> dict[str, Any]:
    """4 -> 16 tanh -> 16 sigmoid -> 3 linear, softmax cross-entropy, W ~ N(0, scale^2)."""
    rng = np.random.default_rng(7)
    sizes = [4, 16, 16, 3]
    weights = [
        {"W": (rng.standard_normal((a, b)) * scale).tolist(), "b": [0.0] * b}
        for a, b in itertools.pairwise(sizes)
    ]
    x = rng.standard_normal((30, 4))
    return {
        "input_dim": 4,
        "layers": [
            {"units": 16, "activation": "tanh"},
            {"units": 16, "activation": "sigmoid"},
            {"units": 3, "activation": "linear"},
        ],
        "loss": "softmax_cross_entropy",
        "weights": weights,
        "batch": {"x": x.tolist(), "y": rng.integers(0, 3, 30).tolist()},
        "include": ["gradients"],
    }


def numpy_saturated_fractions(body: dict[str, Any], eps: float = 0.01) -> list[float]:
    """Each hidden layer's fraction of saturated activations, by a forward pass of its own."""
    a = np.array(body["batch"]["x"])
    fractions = []
    for layer, w in zip(body["layers"][:2], body["weights"], strict=False):
        z = a @ np.array(w["W"]) + np.array(w["b"])
        if layer["activation"] == "tanh":
            a = np.tanh(z)
            fractions.append(float(np.mean((a < -1 + eps) | (a > 1 - eps))))
        else:
            a = 1 / (1 + np.exp(-z))
            fractions.append(float(np.mean((a < eps) | (a > 1 - eps))))
    return fractions


def test_saturation_moves_the_verdict_from_ok_to_warn_to_fail(client: FlaskClient) -> None:
    statuses = []
    for scale in (0.05, 2.0, 20.0):
        body = iris_like(scale)
        report = post(client, "/v1/network", body)
        got = [layer["saturated_activation_fraction"] for layer in report["layers"][:2]]
        assert got == pytest.approx(numpy_saturated_fractions(body), abs=1e-15)
        statuses.append(report["health"]["status"])
        codes = {f["code"] for f in report["health"]["findings"]}
        if scale == 20.0:
            assert "saturated_activations" in codes
            assert min(got) >= 0.75
    assert statuses == ["ok", "warn", "fail"]


def test_a_layer_saturated_without_a_unit_saturated_on_every_example_is_graded(
    client: FlaskClient,
) -> None:
    """Each tanh unit saturated on most examples but not all: no saturated unit, yet most
    activations saturated: saturated_activations grades it."""
    x = [[3.0 if (i + j) % 4 else 0.01 for j in range(4)] for i in range(8)]
    body = {
        "input_dim": 4,
        "layers": [{"units": 4, "activation": "tanh"}, {"units": 1, "activation": "linear"}],
        "loss": "sum",
        "weights": [
            {"W": np.eye(4).tolist(), "b": [0.0] * 4},
            {"W": [[1.0]] * 4, "b": [0.0]},
        ],
        "batch": {"x": x},
    }
    report = post(client, "/v1/network", body)
    layer = report["layers"][0]
    assert layer["saturated_units"] == 0
    assert layer["saturated_activation_fraction"] == 0.75
    assert {(f["code"], f["severity"]) for f in report["health"]["findings"]} == {
        ("saturated_activations", "fail")
    }


# --- advice that fits ---------------------------------------------------------------------------


def test_vanishing_advice_names_only_what_the_network_has(client: FlaskClient) -> None:
    body: dict[str, Any] = {
        "input_dim": 8,
        "layers": [{"units": 8, "activation": "relu"} for _ in range(6)]
        + [{"units": 2, "activation": "linear"}],
        "loss": "mse",
        "init": {"scheme": "small", "seed": 0},
        "batch": {"random": {"size": 16, "seed": 0}},
    }
    report = post(client, "/v1/network", body)
    (vanishing,) = [f for f in report["health"]["findings"] if f["code"] == "vanishing_gradient"]
    assert "sigmoid" not in vanishing["message"] and "He/Xavier" in vanishing["message"]
    body["layers"][0]["activation"] = "sigmoid"
    report = post(client, "/v1/network", body)
    (vanishing,) = [f for f in report["health"]["findings"] if f["code"] == "vanishing_gradient"]
    assert "saturating sigmoid" in vanishing["message"]


# --- units and margins in graph mode ------------------------------------------------------------


def test_units_along_the_batch_axis(client: FlaskClient) -> None:
    """A unit is dead when its input is <= 0 for every example: (3 examples, 4 units) with one
    unit <= 0 everywhere and half the elements <= 0 is 1 dead unit (25%), not 50% dead."""
    z = [[-1.0, 2.0, -3.0, 1.0], [-2.0, -1.0, 4.0, -1.0], [-0.5, 3.0, -1.0, 2.0]]
    body = {
        "nodes": [
            {"id": "z", "op": "input", "value": z},
            {"id": "h", "op": "relu", "inputs": ["z"]},
            {"id": "W", "op": "param", "value": [[1.0]] * 4},
            {"id": "s", "op": "matmul", "inputs": ["h", "W"]},
            {"id": "f", "op": "sum", "inputs": ["s"]},
        ],
        "output": "f",
    }
    relu = post(client, "/v1/graph", body)["diagnostics"]["relu"]
    assert (relu["dead_elements"], relu["elements"]) == (7, 12)
    assert (relu["dead_units"], relu["units"], relu["dead_unit_fraction"]) == (1, 4, 0.25)
    # the examples along axis 1 instead: 3 units, each positive somewhere
    body["batch_axis"] = 1
    relu = post(client, "/v1/graph", body)["diagnostics"]["relu"]
    assert (relu["dead_units"], relu["units"]) == (0, 3)


def test_a_channel_is_the_unit_of_an_image(client: FlaskClient) -> None:
    """(N, C, H, W): a channel is dead when its input is <= 0 at every (n, h, w)."""
    z = -np.ones((2, 3, 2, 2))
    z[1, 1, 0, 1] = 0.5  # channel 1 alive at one position
    z[:, 2] = 1.0  # channel 2 alive everywhere
    body = {
        "nodes": [
            {"id": "z", "op": "input", "value": z.tolist()},
            {"id": "h", "op": "relu", "inputs": ["z"]},
            {"id": "F", "op": "flatten", "inputs": ["h"]},
            {"id": "W", "op": "param", "value": [[1.0]] * 12},
            {"id": "s", "op": "matmul", "inputs": ["F", "W"]},
            {"id": "f", "op": "sum", "inputs": ["s"]},
        ],
        "output": "f",
    }
    answer = post(client, "/v1/graph", body)
    relu = answer["diagnostics"]["relu"]
    assert (relu["dead_units"], relu["units"]) == (1, 3)
    (finding,) = answer["health"]["findings"]
    assert (finding["code"], finding["severity"], finding["location"]) == ("dead_relu", "warn", "h")


def test_more_than_a_hundred_findings_are_summarised(client: FlaskClient) -> None:
    """130 exploding leaves: the first 100 listed, then one summary with the count."""
    nodes: list[dict[str, Any]] = [{"id": "k", "op": "const", "value": 5000.0}]
    total = ""
    for i in range(130):
        nodes += [
            {"id": f"x{i}", "op": "input", "value": 1.0},
            {"id": f"p{i}", "op": "mul", "inputs": [f"x{i}", "k"]},
        ]
        if total:
            nodes.append({"id": f"t{i}", "op": "add", "inputs": [total, f"p{i}"]})
            total = f"t{i}"
        else:
            total = "p0"
    findings = post(client, "/v1/graph", {"nodes": nodes, "output": total})["health"]["findings"]
    assert len(findings) == 101
    assert all(f["code"] == "exploding_gradient" and "count" not in f for f in findings[:100])
    assert findings[100]["count"] == 30
    assert findings[100]["location"] == "x100"
