"""POST /v1/network: a network lowered to the engine's ops, its report, health and errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from gradiag.engine import Program, Result, Thresholds, compile_graph, forward, run
from gradiag.engine.network import (
    ACTIVATION_OPS,
    INIT_SCALES,
    LOSS_OPS,
    Batch,
    Dense,
    Init,
    NetworkLimits,
    NetworkSpec,
    RandomBatch,
    check_network,
    init_weights,
    lower,
    network_diagnostics,
    parameter_counts,
    placeholder_leaves,
)
from gradiag.engine.network import build_graph as build_network_graph
from gradiag.engine.ops import OPS
from gradiag.service import create_app
from gradiag.service.config import Settings

# The contract's example requests, copied into the repository's examples/.
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

X3 = [[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]]  # three examples of two features


def post(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/network", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    report: dict[str, Any] = response.get_json()
    return report


def problem(response: TestResponse, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json()
    return body


def codes(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {f["code"]: (f["severity"], f["location"]) for f in report["health"]["findings"]}


def two_unit_network(activation: str, bias: float) -> dict[str, Any]:
    """2 -> 2 `activation` -> 1 linear, mse. Unit 0 computes x1 + x2 (varies over X3); unit 1
    has a zero W column and `bias`, so its z is `bias` on every example."""
    return {
        "input_dim": 2,
        "layers": [{"units": 2, "activation": activation}, {"units": 1, "activation": "linear"}],
        "loss": "mse",
        "weights": [
            {"W": [[1.0, 0.0], [1.0, 0.0]], "b": [0.0, bias]},
            {"W": [[1.0], [2.0]], "b": [0.5]},
        ],
        "batch": {"x": copy.deepcopy(X3), "y": [1.0, 0.0, 2.0]},
        "include": ["gradients"],
    }


# --- parameter counts and names (CS231n's examples) --------------------------------------


@pytest.mark.parametrize(
    ("sizes", "counts", "name"),
    [
        ([3, 4, 2], (6, 20, 6, 26), "2-layer neural network"),
        ([3, 4, 4, 1], (9, 32, 9, 41), "3-layer neural network"),
    ],
)
def test_parameter_counts_of_the_cs231n_examples(
    client: FlaskClient, sizes: list[int], counts: tuple[int, ...], name: str
) -> None:
    layers = [{"units": u, "activation": "relu"} for u in sizes[1:-1]]
    layers.append({"units": sizes[-1], "activation": "linear"})
    body = {"input_dim": sizes[0], "layers": layers, "loss": "sum"}
    report = post(client, body)
    neurons, weights, biases, total = counts
    assert report["parameters"] == {
        "neurons": neurons,
        "weights": weights,
        "biases": biases,
        "total": total,
    }
    assert report["name"] == name
    per_layer = [layer["parameters"] for layer in report["layers"]]
    fan_ins = sizes[:-1]
    assert per_layer == [
        {"weights": f * u, "biases": u} for f, u in zip(fan_ins, sizes[1:], strict=True)
    ]


def test_shared_three_layer_example(client: FlaskClient) -> None:
    body = json.loads((EXAMPLES / "three-layer.network.json").read_text())
    report = post(client, body)
    assert report["name"] == "3-layer neural network"
    assert report["parameters"] == {"neurons": 9, "weights": 32, "biases": 9, "total": 41}
    assert [layer["units"] for layer in report["layers"]] == [4, 4, 1]
    assert report["batch_size"] == 32
    nodes = report["nodes"]
    for i in (1, 2, 3):
        for part in ("W", "b", "z", "a"):
            node = nodes[f"layer{i}.{part}"]
            assert "value" in node and "grad" in node
    assert nodes["X"]["op"] == "input" and np.shape(nodes["X"]["grad"]) == (32, 3)
    assert nodes["layer1.W"]["op"] == "param" and nodes["layer1.W"]["shape"] == [3, 4]
    assert nodes["y"]["op"] == "const" and "grad" not in nodes["y"]
    assert nodes["loss"]["value"] == report["loss"] and nodes["loss"]["grad"] == 1.0
    # The per-layer norms are the norms of the gradients the report returns.
    for part in ("W", "b", "z"):
        grad = np.array(nodes[f"layer2.{part}"]["grad"])
        assert report["layers"][1]["grad_norm"][part] == pytest.approx(np.linalg.norm(grad))


def test_gradients_only_when_included(client: FlaskClient) -> None:
    body = {"input_dim": 3, "layers": [{"units": 2}], "loss": "sum"}
    assert "nodes" not in post(client, body)


# --- dead and saturated units ------------------------------------------------------------


def test_dead_relu_unit_has_zero_weight_gradient(client: FlaskClient) -> None:
    report = post(client, two_unit_network("relu", bias=-10.0))
    layer1 = report["layers"][0]
    assert layer1["dead_units"] == 1
    assert layer1["dead_unit_indices"] == [1]
    assert layer1["dead_fraction"] == 0.5
    # z of unit 0 is x1 + x2 = 3, 2, -1.5: one of its three activations is <= 0 too.
    assert layer1["dead_activation_fraction"] == pytest.approx(4 / 6)
    dW1 = np.array(report["nodes"]["layer1.W"]["grad"])
    db1 = np.array(report["nodes"]["layer1.b"]["grad"])
    assert np.all(dW1[:, 1] == 0.0) and db1[1] == 0.0
    assert np.all(dW1[:, 0] != 0.0)
    # scores 3.5, 2.5, 0.5 against 1, 0, 2: mean of 2.5^2, 2.5^2, 1.5^2
    assert report["loss"] == pytest.approx(59 / 12)
    assert report["nodes"]["layer2.b"]["grad"] == [pytest.approx(2 / 3 * 3.5)]
    assert codes(report) == {"dead_relu": ("fail", "layer1")}  # 50% of the units
    assert layer1["status"] == "fail" and report["layers"][1]["status"] == "ok"
    assert report["health"]["status"] == "fail"
    message = report["health"]["findings"][0]["message"]
    assert "1 of 2" in message and "leaky_relu" in message


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_saturated_unit_is_found(client: FlaskClient, activation: str) -> None:
    report = post(client, two_unit_network(activation, bias=20.0))
    layer1 = report["layers"][0]
    assert layer1["saturated_units"] == 1
    assert layer1["saturated_unit_indices"] == [1]
    assert layer1["saturated_fraction"] == 0.5
    assert layer1["dead_units"] == 0
    # >= 25% of the layer's activations saturated warns (saturated_activations)
    a = np.array(report["nodes"]["layer1.a"]["value"])
    low = 0.0 if activation == "sigmoid" else -1.0
    saturated = np.mean((a < low + 0.01) | (a > 1 - 0.01))
    assert layer1["saturated_activation_fraction"] == saturated >= 0.5
    assert codes(report) == {
        f"saturated_{activation}": ("fail", "layer1"),
        "saturated_activations": ("warn", "layer1"),
    }
    # The saturated unit passes (almost) no gradient back to its weights.
    dW1 = np.array(report["nodes"]["layer1.W"]["grad"])
    assert np.max(np.abs(dW1[:, 1])) < 1e-7 < np.min(np.abs(dW1[:, 0]))


def test_leaky_relu_units_count_as_dead_without_a_finding(client: FlaskClient) -> None:
    report = post(client, two_unit_network("leaky_relu", bias=-10.0))
    assert report["layers"][0]["dead_units"] == 1
    assert codes(report) == {}  # alpha * gradient still flows
    assert np.all(np.array(report["nodes"]["layer1.W"]["grad"])[:, 1] != 0.0)


def test_zeros_init_kills_every_relu_unit(client: FlaskClient) -> None:
    body = {
        "input_dim": 3,
        "layers": [{"units": 4}, {"units": 2, "activation": "linear"}],
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "zeros"},
    }
    report = post(client, body)
    assert report["layers"][0]["dead_units"] == 4
    assert report["layers"][0]["update_ratio"] is None  # ||W|| is 0
    assert report["loss"] == pytest.approx(np.log(2))
    assert codes(report)["dead_relu"] == ("fail", "layer1")


def test_thresholds_override_changes_the_verdict(client: FlaskClient) -> None:
    dead = two_unit_network("relu", bias=-10.0)
    dead["thresholds"] = {"dead_fail": 0.6}
    assert codes(post(client, dead)) == {"dead_relu": ("warn", "layer1")}
    dead["thresholds"] = {"dead_warn": 0.6, "dead_fail": 0.9}
    assert post(client, dead)["health"] == {"status": "ok", "findings": []}

    # sigmoid(3) = 0.9526: not within 0.01 of 1, but within 0.05.
    nearly = two_unit_network("sigmoid", bias=3.0)
    assert codes(post(client, nearly)) == {}
    nearly["thresholds"] = {"saturation_eps": 0.05}
    report = post(client, nearly)
    assert report["layers"][0]["saturated_unit_indices"] == [1]
    assert codes(report) == {
        "saturated_sigmoid": ("fail", "layer1"),
        "saturated_activations": ("warn", "layer1"),
    }
    nearly["thresholds"] = {"saturation_eps": 0.05, "saturated_activations_warn": 0.9}
    assert codes(post(client, nearly)) == {"saturated_sigmoid": ("fail", "layer1")}


# --- gradient flow: vanishing, exploding, non-finite -------------------------------------


def test_deep_sigmoid_stack_with_small_weights_has_a_vanishing_gradient(
    client: FlaskClient,
) -> None:
    layers = [{"units": 16, "activation": "sigmoid"} for _ in range(6)]
    body = {
        "input_dim": 8,
        "layers": [*layers, {"units": 1, "activation": "linear"}],
        "loss": "mse",
        "init": {"scheme": "small", "seed": 0},
    }
    report = post(client, body)
    ratio = report["gradient_ratio"]
    first, last = (report["layers"][k]["grad_norm"]["W"] for k in (0, -1))
    assert ratio == pytest.approx(first / last) and ratio < 1e-3
    assert codes(report)["vanishing_gradient"] == ("warn", "layer1")
    assert "He/Xavier" in report["health"]["findings"][0]["message"]
    body["init"] = {"scheme": "xavier", "seed": 0}
    body["layers"] = [{"units": 16, "activation": "relu"}] * 6 + [body["layers"][-1]]
    assert "vanishing_gradient" not in codes(post(client, body))


def test_small_weight_tanh_stack_vanishes_in_dz_though_dw_stays_level(
    client: FlaskClient,
) -> None:
    # Near-linear tanh layers with 0.01-scale weights: activations shrink forward as fast as
    # gradients shrink backward, so ||dW|| is level across layers but ||dz|| collapses.
    body = {
        "input_dim": 8,
        "layers": [{"units": 16, "activation": "tanh"}] * 5
        + [{"units": 1, "activation": "linear"}],
        "loss": "mse",
        "init": {"scheme": "small", "seed": 0},
    }
    report = post(client, body)
    assert report["gradient_ratio"] > 1e-3
    dz = [layer["grad_norm"]["z"] for layer in report["layers"]]
    assert report["signal_ratio"] == pytest.approx(dz[0] / dz[-1]) and report["signal_ratio"] < 1e-3
    assert codes(report)["vanishing_gradient"] == ("warn", "layer1")
    finding = next(f for f in report["health"]["findings"] if f["code"] == "vanishing_gradient")
    assert "||dz||" in finding["message"]


def test_exploding_gradient_norm_is_a_threshold(client: FlaskClient) -> None:
    body = two_unit_network("relu", bias=1.0)
    assert "exploding_gradient" not in codes(post(client, body))
    body["thresholds"] = {"exploding_norm": 1.0}
    report = post(client, body)
    norms = [layer["grad_norm"]["W"] for layer in report["layers"]]
    expected = {f"layer{i}" for i, norm in enumerate(norms, start=1) if norm > 1.0}
    assert expected  # the hand-made weights give ||dW|| of 5 and 10
    found = {f["location"] for f in report["health"]["findings"]}
    assert found == expected
    assert report["health"]["status"] == "warn"


@pytest.mark.parametrize(
    ("where", "location"), [("x", "X"), ("W", "layer1")], ids=["input", "weight"]
)
def test_nonfinite_value_fails_and_names_its_place(
    client: FlaskClient, where: str, location: str
) -> None:
    body = two_unit_network("relu", bias=0.0)
    if where == "x":
        body["batch"]["x"][1][0] = "NaN"
    else:
        body["weights"][0]["W"][0][0] = "Infinity"
    report = post(client, body)
    nonfinite = [f for f in report["health"]["findings"] if f["code"] == "nonfinite"]
    assert [(f["severity"], f["location"]) for f in nonfinite] == [("fail", location)]
    assert report["health"]["status"] == "fail"
    assert where in nonfinite[0]["message"] or "'X'" in nonfinite[0]["message"]


# --- the lowered graph against numerical gradients ----------------------------------------


def numerical_gradient(program: Program, leaf: int, h: float = 1e-6) -> np.ndarray:
    """d loss / d leaf by centred differences, one element at a time."""
    base = program.tensors[leaf]
    grad = np.zeros(base.shape)
    for idx in np.ndindex(base.shape):
        outs = []
        for step in (h, -h):
            moved = base.copy()
            moved[idx] += step
            values, _ = forward(program, tensors={**program.tensors, leaf: moved})
            outs.append(float(values[program.output]))
        grad[idx] = (outs[0] - outs[1]) / (2 * h)
    return grad


def small_spec(activation: str, loss: str, l2: float = 0.0) -> NetworkSpec:
    """3 -> 4 `activation` -> 3 linear on a random batch of 5."""
    return NetworkSpec(
        input_shape=(3,),
        layers=(Dense(4, activation), Dense(3, "linear")),
        loss=loss,
        init=Init("xavier", seed=3),
        batch=RandomBatch(5, seed=4),
        l2=l2,
    )


CASES = [(act, "mse") for act in ACTIVATION_OPS] + [
    ("tanh", loss) for loss in LOSS_OPS if loss != "mse"
]


@pytest.mark.parametrize(("activation", "loss"), CASES)
@pytest.mark.parametrize("l2", [0.0, 0.3], ids=["no_l2", "l2"])
def test_gradients_match_centred_differences(activation: str, loss: str, l2: float) -> None:
    spec = small_spec(activation, loss, l2)
    check_network(spec)
    program = compile_graph(*lower(spec))
    result = run(program)
    leaves = program.rows_of("param", "input").tolist()
    assert program.node_ids(leaves) == [
        "X",
        "layer1.W",
        "layer1.b",
        "layer2.W",
        "layer2.b",
    ]
    for i in leaves:
        np.testing.assert_allclose(
            result.grad(i), numerical_gradient(program, i), rtol=1e-5, atol=1e-9
        )


def test_losses_have_their_definitions() -> None:
    """Each loss's value recomputed from the scores and labels the graph holds."""
    for loss in LOSS_OPS:
        spec = small_spec("relu", loss)
        program = compile_graph(*lower(spec))
        result = run(program)
        values = {node: result.value(i) for i, node in enumerate(program.node_ids())}
        s = values["layer2.a"]
        if loss == "sum":
            expected = s.sum()
        elif loss == "mse":
            expected = np.mean((s - values["y"]) ** 2)
        else:
            y = values["y"].astype(int)
            rows = np.arange(len(y))
            if loss == "bce_with_logits":
                t = values["y"]
                expected = np.mean(np.maximum(s, 0) - s * t + np.log1p(np.exp(-np.abs(s))))
            elif loss == "softmax_cross_entropy":
                p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
                expected = -np.mean(np.log(p[rows, y]))
            else:
                margins = np.maximum(0, s - s[rows, y][:, None] + 1)
                margins[rows, y] = 0
                expected = margins.sum() / len(y)
        assert float(values["loss"]) == pytest.approx(expected, rel=1e-12), loss


def test_l2_term_value_and_gradient(client: FlaskClient) -> None:
    body = two_unit_network("tanh", bias=0.5)
    plain = post(client, body)
    body["l2"] = 0.1
    with_l2 = post(client, body)
    W = [np.array(w["W"]) for w in body["weights"]]
    penalty = 0.5 * 0.1 * sum(float(np.sum(w * w)) for w in W)  # (2 + 5) * 0.05
    assert with_l2["l2_loss"] == pytest.approx(penalty) == pytest.approx(0.35)
    assert with_l2["data_loss"] == pytest.approx(plain["loss"])
    assert with_l2["loss"] == pytest.approx(plain["loss"] + penalty)
    for i, w in enumerate(W, start=1):
        dW = np.array(with_l2["nodes"][f"layer{i}.W"]["grad"])
        dW_plain = np.array(plain["nodes"][f"layer{i}.W"]["grad"])
        np.testing.assert_allclose(dW - dW_plain, 0.1 * w, atol=1e-12)
        # biases are not penalised
        assert with_l2["nodes"][f"layer{i}.b"]["grad"] == plain["nodes"][f"layer{i}.b"]["grad"]
    assert {"data_loss", "l2", "loss"} <= set(with_l2["nodes"])


def test_network_equals_the_same_graph_lowered_by_hand(client: FlaskClient) -> None:
    rng = np.random.default_rng(7)
    W1, b1 = rng.standard_normal((2, 3)), rng.standard_normal(3)
    W2, b2 = rng.standard_normal((3, 3)), rng.standard_normal(3)
    labels = [0.0, 2.0, 1.0]
    network = {
        "input_dim": 2,
        "layers": [{"units": 3, "activation": "relu"}, {"units": 3, "activation": "linear"}],
        "loss": "softmax_cross_entropy",
        "weights": [
            {"W": W1.tolist(), "b": b1.tolist()},
            {"W": W2.tolist(), "b": b2.tolist()},
        ],
        "batch": {"x": X3, "y": labels},
        "include": ["gradients"],
    }

    def leaf(node_id: str, op: str, value: Any) -> dict[str, Any]:
        return {"id": node_id, "op": op, "value": value}

    def gate(node_id: str, op: str, *inputs: str) -> dict[str, Any]:
        return {"id": node_id, "op": op, "inputs": list(inputs)}

    graph = {
        "nodes": [
            leaf("x", "input", X3),
            leaf("W1", "param", W1.tolist()),
            leaf("b1", "param", b1.tolist()),
            leaf("W2", "param", W2.tolist()),
            leaf("b2", "param", b2.tolist()),
            leaf("labels", "const", labels),
            gate("h", "relu", "z1"),
            gate("z1", "affine", "x", "W1", "b1"),  # as the network lowers a layer
            gate("hW2", "matmul", "h", "W2"),  # the same layer as two ops: the same numbers
            gate("scores", "add", "hW2", "b2"),
            gate("L", "softmax_cross_entropy", "scores", "labels"),
        ],
        "output": "L",
    }
    by_network = post(client, network)
    response = client.post("/v1/graph", json=graph)
    assert response.status_code == 200, response.get_data(as_text=True)
    by_hand = response.get_json()
    assert by_network["loss"] == by_hand["output"]["value"]
    pairs = {"X": "x", "layer1.W": "W1", "layer1.b": "b1", "layer2.W": "W2", "layer2.b": "b2"}
    for ours, theirs in pairs.items():
        assert by_network["nodes"][ours]["grad"] == by_hand["nodes"][theirs]["grad"], ours
    assert by_network["nodes"]["layer2.a"]["value"] == by_hand["nodes"]["scores"]["value"]


# --- dtype, init, random batches ---------------------------------------------------------


def test_float32_runs_end_to_end() -> None:
    spec = small_spec("sigmoid", "softmax_cross_entropy", l2=0.01)
    wide = run(compile_graph(*lower(spec)))
    narrow_spec = NetworkSpec(**{**spec.__dict__, "dtype": "float32"})
    narrow = run(compile_graph(*lower(narrow_spec), dtype=np.float32))
    assert all(v.dtype == np.float32 for v in narrow.values)
    assert all(g is None or g.dtype == np.float32 for g in narrow.grads)
    last = len(wide.program) - 1
    assert float(narrow.values[last]) == pytest.approx(float(wide.values[last]), rel=1e-5)
    for g32, g64 in zip(narrow.grads, wide.grads, strict=True):
        if g32 is not None:
            np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-5)


def test_float32_over_http(client: FlaskClient) -> None:
    body = json.loads((EXAMPLES / "three-layer.network.json").read_text())
    wide = post(client, body)
    body["dtype"] = "float32"
    narrow = post(client, body)
    assert narrow["dtype"] == "float32"
    assert narrow["loss"] == pytest.approx(wide["loss"], rel=1e-5)
    dW = narrow["nodes"]["layer1.W"]["grad"]
    assert np.array_equal(np.array(dW, np.float32), np.array(dW))  # float32 numbers
    np.testing.assert_allclose(  # the same drawn weights, rounded to float32
        narrow["nodes"]["layer1.W"]["value"], wide["nodes"]["layer1.W"]["value"], rtol=1e-7
    )


def test_init_is_reproducible_from_its_seed(client: FlaskClient) -> None:
    body = {"input_dim": 3, "layers": [{"units": 4}], "loss": "sum", "include": ["gradients"]}
    runs = []
    for seed in (5, 5, 6):
        body["init"] = {"scheme": "he", "seed": seed}
        runs.append(post(client, body)["nodes"])
    assert runs[0]["layer1.W"]["value"] == runs[1]["layer1.W"]["value"]
    assert runs[0]["layer1.W"]["value"] != runs[2]["layer1.W"]["value"]
    assert runs[0]["X"]["value"] == runs[2]["X"]["value"]  # the batch has its own seed
    assert runs[0]["layer1.b"]["value"] == [0.0] * 4
    W = init_weights(NetworkSpec((3,), (Dense(4),), "sum", init=Init("he", 5)))[0]["W"]
    assert W.tolist() == runs[0]["layer1.W"]["value"]
    assert np.array_equal(W, np.random.default_rng(5).standard_normal((3, 4)) * np.sqrt(2 / 3))


@pytest.mark.parametrize(
    ("scheme", "std"),
    [("he", np.sqrt(2 / 400)), ("xavier", np.sqrt(1 / 400)), ("small", 0.01), ("zeros", 0.0)],
)
def test_init_schemes_have_their_scale(scheme: str, std: float) -> None:
    spec = NetworkSpec((400,), (Dense(200), Dense(10)), "sum", init=Init(scheme, 0))
    first, second = init_weights(spec)
    assert first["W"].shape == (400, 200) and second["W"].shape == (200, 10)
    assert float(np.std(first["W"])) == pytest.approx(std, rel=0.02)
    assert abs(float(np.mean(first["W"]))) <= 0.01 * std + 1e-12
    assert float(np.std(second["W"])) == pytest.approx(INIT_SCALES[scheme](200), rel=0.1)
    assert not first["b"].any() and not second["b"].any()
    if scheme == "zeros":
        assert not np.signbit(first["W"]).any()  # no -0.0


def test_random_batch_draws_labels_in_range_and_targets(client: FlaskClient) -> None:
    body: dict[str, Any] = {
        "input_dim": 2,
        "layers": [{"units": 5, "activation": "linear"}],
        "loss": "svm_hinge",
        "batch": {"random": {"size": 200, "seed": 1}},
        "include": ["gradients"],
    }
    labels = post(client, body)["nodes"]["y"]["value"]
    assert set(labels) == {0.0, 1.0, 2.0, 3.0, 4.0}
    body["loss"] = "mse"
    nodes = post(client, body)["nodes"]
    assert np.shape(nodes["y"]["value"]) == (200, 5)
    assert abs(float(np.mean(nodes["X"]["value"]))) < 0.15
    assert float(np.std(nodes["X"]["value"])) == pytest.approx(1.0, abs=0.1)


def test_mse_targets_of_one_unit_may_be_flat() -> None:
    spec = NetworkSpec(
        (2,),
        (Dense(1, "linear"),),
        "mse",
        weights=({"W": np.array([[1.0], [1.0]]), "b": np.array([0.0])},),
        batch=Batch(np.array(X3), np.array([3.0, 2.0, 0.0])),
    )
    check_network(spec)
    program = compile_graph(*lower(spec))
    assert program.shapes[program.node_ids().index("y")] == (3, 1)  # not broadcast to (3, 3)
    assert float(run(program).values[program.output]) == pytest.approx(2.25 / 3)


# --- limits, checked before anything is drawn --------------------------------------------


def test_placeholder_graph_has_the_real_graphs_sizes() -> None:
    spec = small_spec("relu", "svm_hinge", l2=0.5)
    real = compile_graph(*lower(spec))
    planned = compile_graph(*build_network_graph(spec, placeholder_leaves(spec)))
    assert planned.shapes == real.shapes and planned.flops == real.flops
    assert all(v.strides == (0,) * v.ndim for v in placeholder_leaves(spec).values())


def test_huge_network_is_refused_before_anything_is_allocated(client: FlaskClient) -> None:
    body = {
        "input_dim": 16_384,
        "layers": [{"units": 16_384}] * 64,
        "loss": "sum",
        "batch": {"random": {"size": 65_536}},
    }
    start = time.perf_counter()
    body_out = problem(client.post("/v1/network", json=body))
    assert time.perf_counter() - start < 2.0
    assert body_out["limit"] == "max_tensor_elements"
    assert body_out["limit_value"] == 4_000_000
    assert body_out["errors"][0]["loc"] == ["batch", "random"]  # X is 65536 x 16384


@pytest.mark.parametrize(
    ("settings_kw", "change", "limit", "loc"),
    [
        ({}, {"layers": [{"units": 2}] * 65}, "max_layers", ["layers"]),
        ({}, {"layers": [{"units": 2}, {"units": 16_385}]}, "max_units", ["layers", 1, "units"]),
        ({}, {"input_dim": 20_000}, "max_units", ["input_dim"]),
        ({}, {"batch": {"random": {"size": 65_537}}}, "max_batch", ["batch", "random", "size"]),
        ({"max_layers": 2}, {}, "max_layers", ["layers"]),
        ({"max_flops": 1_000}, {}, "max_flops", ["layers", 0]),
        # X 48 + W 24 + b 8 + z 128 + a 128 = 336 elements by the end of layer 1
        ({"max_total_elements": 300}, {}, "max_total_elements", ["layers", 0]),
    ],
)
def test_limits_are_422_with_the_limit(
    settings_kw: dict[str, int], change: dict[str, Any], limit: str, loc: list[Any]
) -> None:
    client = create_app(Settings(**settings_kw), TESTING=True).test_client()
    body = {
        "input_dim": 3,
        "layers": [{"units": 8}, {"units": 8}, {"units": 2, "activation": "linear"}],
        "loss": "sum",
        "batch": {"random": {"size": 16}},
        **change,
    }
    out = problem(client.post("/v1/network", json=body))
    assert out["title"] == "Over a limit"
    assert out["limit"] == limit
    assert out["limit_value"] == getattr(Settings(**settings_kw), limit)
    assert out["errors"][0]["loc"] == loc


# --- validation: every bad network is a 422 at its field ---------------------------------


def valid_body() -> dict[str, Any]:
    return {
        "input_dim": 2,
        "layers": [{"units": 2, "activation": "relu"}, {"units": 3, "activation": "linear"}],
        "loss": "softmax_cross_entropy",
        "weights": [
            {"W": [[1.0, 0.5], [0.0, -1.0]], "b": [0.0, 0.1]},
            {"W": [[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]], "b": [0.0, 0.0, 0.0]},
        ],
        "batch": {"x": X3, "y": [0, 2, 1]},
    }


def test_valid_body_is_valid(client: FlaskClient) -> None:
    assert post(client, valid_body())["health"]["status"] in ("ok", "warn", "fail")


def at(path: list[Any], value: Any) -> Any:
    """A change to valid_body: set the field at `path` (None removes it)."""

    def change(body: dict[str, Any]) -> None:
        *parents, last = path
        target = body
        for part in parents:
            target = target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value

    return change


BAD = [
    ("zero_units", at(["layers", 0, "units"], 0), ["layers", 0, "units"]),
    ("negative_units", at(["layers", 1, "units"], -3), ["layers", 1, "units"]),
    ("string_units", at(["layers", 0, "units"], "2"), ["layers", 0, "units"]),
    ("no_layers", at(["layers"], []), ["layers"]),
    ("unknown_activation", at(["layers", 0, "activation"], "softplus"),
     ["layers", 0, "activation"]),
    ("unknown_loss", at(["loss"], "hinge"), ["loss"]),
    ("weights_count", at(["weights"], valid_body()["weights"][:1]), ["weights"]),
    ("W_shape", at(["weights", 0, "W"], [[1.0, 0.5]]), ["weights", 0, "W"]),
    ("W_transposed", at(["weights", 1, "W"], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
     ["weights", 1, "W"]),
    ("b_shape", at(["weights", 1, "b"], [0.0, 0.0]), ["weights", 1, "b"]),
    ("ragged_W", at(["weights", 0, "W"], [[1.0, 0.5], [0.0]]), ["weights", 0, "W"]),
    ("batch_width", at(["batch", "x"], [[1.0, 2.0, 3.0]] * 3), ["batch", "x"]),
    ("ragged_x", at(["batch", "x"], [[1.0, 2.0], [3.0], [4.0, 5.0]]), ["batch", "x"]),
    ("y_length", at(["batch", "y"], [0, 1]), ["batch", "y"]),
    ("no_y", at(["batch", "y"], None), ["batch", "y"]),
    ("label_out_of_range", at(["batch", "y"], [0, 3, 1]), ["batch", "y", 1]),
    ("negative_label", at(["batch", "y"], [0, 1, -1]), ["batch", "y", 2]),
    ("non_integer_label", at(["batch", "y"], [0.5, 1, 1]), ["batch", "y", 0]),
    ("nan_label", at(["batch", "y"], [0, "NaN", 1]), ["batch", "y", 1]),
    ("labels_as_matrix", at(["batch", "y"], [[0], [1], [2]]), ["batch", "y"]),
    ("one_class", at(["layers", 1, "units"], 1), ["layers", 1, "units"]),
    ("x_and_random", at(["batch", "random"], {"size": 3}), ["batch"]),
    ("random_size_0", at(["batch"], {"random": {"size": 0}}), ["batch", "random", "size"]),
    ("weights_and_init", at(["init"], {"scheme": "he"}), ["init"]),
    ("unknown_scheme", at(["init"], {"scheme": "orthogonal"}), ["init", "scheme"]),
    ("negative_l2", at(["l2"], -0.1), ["l2"]),
    ("boolean_l2", at(["l2"], True), ["l2"]),
    ("dtype", at(["dtype"], "float16"), ["dtype"]),
    ("include", at(["include"], ["graph"]), ["include", 0]),
    ("zero_input_dim", at(["input_dim"], 0), ["input_dim"]),
    ("misspelled_field", at(["layer"], []), ["layer"]),
    ("threshold_out_of_range", at(["thresholds"], {"dead_warn": 2}), ["thresholds", "dead_warn"]),
]  # fmt: skip


@pytest.mark.parametrize(("change", "loc"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_network_is_422_at_the_field(client: FlaskClient, change: Any, loc: list[Any]) -> None:
    body = copy.deepcopy(valid_body())
    change(body)
    out = problem(client.post("/v1/network", json=body))
    assert out["errors"][0]["loc"] == loc, out


def test_mse_targets_must_match_the_output_units(client: FlaskClient) -> None:
    body = valid_body()
    body["loss"] = "mse"
    body["batch"]["y"] = [1.0, 2.0, 3.0]  # 3 output units: (N, 3) needed
    out = problem(client.post("/v1/network", json=body))
    assert out["errors"][0]["loc"] == ["batch", "y"]
    assert "[3, 3]" in out["detail"]
    body["batch"]["y"] = [[1.0, 2.0, 3.0]] * 3
    assert post(client, body)["loss"] > 0


def test_engine_errors_are_titled_invalid_network(client: FlaskClient) -> None:
    body = valid_body()
    body["batch"]["y"] = [0, 9, 1]
    out = problem(client.post("/v1/network", json=body))
    assert out["title"] == "Invalid network"
    assert "label 9.0" in out["detail"] and "[0, 3)" in out["detail"]


# --- engine level --------------------------------------------------------------------------


def test_network_diagnostics_straight_from_the_engine() -> None:
    spec = NetworkSpec(
        input_shape=(3,),
        layers=(Dense(4, "relu"), Dense(4, "sigmoid"), Dense(1, "linear")),
        loss="mse",
        init=Init("he", 0),
        batch=RandomBatch(32, 0),
    )
    counts = parameter_counts(spec)
    assert (counts.neurons, counts.weights, counts.biases, counts.total) == (9, 32, 9, 41)
    check_network(spec)
    result = run(compile_graph(*lower(spec)))
    diagnostics = network_diagnostics(result, spec, Thresholds())
    assert diagnostics.name == "3-layer neural network"
    assert [layer.stage.layer.fan_in(layer.stage.x) for layer in diagnostics.layers] == [3, 4, 4]
    assert diagnostics.loss == float(result.values[result.program.output])


def test_openapi_lists_the_network_endpoint(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    assert "/v1/network" in document["paths"]
    schemas = document["components"]["schemas"]
    assert {"NetworkRequest", "NetworkResponse", "LayerReport"} <= set(schemas)


# --- work and memory: gradients nobody reads, dtype casts, diagnostics' reductions --------


def network_request(include: list[str]) -> dict[str, Any]:
    return {
        "input_dim": 2,
        "layers": [{"units": 3, "activation": "relu"}, {"units": 2, "activation": "linear"}],
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "he", "seed": 1},
        "batch": {"x": X3, "y": [0.0, 1.0, 1.0]},
        "include": include,
    }


def test_input_gradient_is_skipped_unless_the_report_returns_it(client: FlaskClient) -> None:
    from gradiag.schemas.network import NetworkRequest
    from gradiag.service.network import diagnose_network

    for include, computed in (([], False), (["gradients"], True)):
        request = NetworkRequest.model_validate(network_request(include))
        done = diagnose_network(request, NetworkLimits())
        x_grad = done.result.grad(done.result.program.node_ids().index("X"))
        assert (x_grad is not None) is computed
    with_grads = post(client, network_request(["gradients"]))
    without = post(client, network_request([]))
    assert {k: v for k, v in with_grads.items() if k != "nodes"} == without
    nodes = with_grads["nodes"]
    dz1, W1 = np.array(nodes["layer1.z"]["grad"]), np.array(nodes["layer1.W"]["value"])
    np.testing.assert_allclose(nodes["X"]["grad"], dz1 @ W1.T, rtol=1e-15, atol=1e-15)


def test_no_grad_leaf_skips_its_matmul_and_changes_no_other_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = small_spec("relu", "softmax_cross_entropy", l2=0.1)
    nodes, output = lower(spec)
    full = run(compile_graph(nodes, output))
    calls: list[tuple[bool, ...]] = []
    affine = OPS["affine"]

    def spy(dout: Any, cache: Any, needs: tuple[bool, ...] = (True, True, True)) -> Any:
        calls.append(needs)
        return affine.backward(dout, cache, needs)

    monkeypatch.setitem(OPS, "affine", dataclasses.replace(affine, backward=spy))
    program = compile_graph(nodes, output, no_grad=frozenset({"X"}))
    skipped = run(program)
    assert calls == [(True, True, True), (False, True, True)]  # layer 2, then layer 1 (X)
    for i, node in enumerate(program.node_ids()):
        g_full, g_skipped = full.grad(i), skipped.grad(i)
        if node == "X":
            assert g_full is not None and g_skipped is None
        elif g_full is None:
            assert g_skipped is None
        else:
            np.testing.assert_array_equal(g_skipped, g_full, err_msg=node)
    diagnostics = network_diagnostics(skipped, spec, Thresholds())
    assert diagnostics.nonfinite_nodes == []


def test_float32_leaves_are_cast_as_drawn_and_compile_copies_none() -> None:
    spec = NetworkSpec(
        input_shape=(5,),
        layers=(Dense(4, "relu"), Dense(3, "linear")),
        loss="mse",
        init=Init("he", 2),
        batch=RandomBatch(6, 3),
        dtype="float32",
    )
    nodes, output = lower(spec)
    leaves = {node.id: node.value for node in nodes if node.value is not None}
    assert {value.dtype for value in leaves.values()} == {np.dtype(np.float32)}
    wide = init_weights(spec)  # float64, as drawn
    for i, w in enumerate(wide, start=1):
        np.testing.assert_array_equal(leaves[f"layer{i}.W"], w["W"].astype(np.float32))
    program = compile_graph(nodes, output, dtype=np.float32)
    for i, value in program.tensors.items():
        assert value is leaves[program.node_id(i)]  # the same array: no copy


def test_float32_request_allocates_little_beyond_the_tensors_it_keeps() -> None:
    """tracemalloc sees NumPy's allocations: the whole request (draw, lower, compile, run,
    diagnostics) peaks at 1.05x the bytes of the values and gradients it keeps. A float64
    twin of the drawn weights alone made it ~1.5x; float64 copies for the norms more."""
    import tracemalloc

    spec = NetworkSpec(
        input_shape=(64,),
        layers=(Dense(256, "relu"), Dense(256, "relu"), Dense(10, "linear")),
        loss="softmax_cross_entropy",
        init=Init("he", 0),
        batch=RandomBatch(128, 0),
        dtype="float32",
    )

    def request() -> Result:
        nodes, output = lower(spec)
        no_grad = frozenset({"X"})
        result = run(compile_graph(nodes, output, dtype=np.float32, no_grad=no_grad))
        network_diagnostics(result, spec, Thresholds())
        return result

    request()  # first calls import and set up NumPy's lazy parts: not the request's memory
    tracemalloc.start()
    try:
        result = request()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = {id(a): a.nbytes for a in [*result.values, *result.grads] if a is not None}
    assert peak <= 1.2 * sum(kept.values())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_norms_and_moments_are_the_float64_formulas(dtype: str) -> None:
    spec = NetworkSpec(
        input_shape=(6,),
        layers=(Dense(5, "tanh"), Dense(4, "relu"), Dense(2, "linear")),
        loss="mse",
        init=Init("xavier", 4),
        batch=RandomBatch(7, 5),
        dtype=dtype,
    )
    result = run(compile_graph(*lower(spec), dtype=np.dtype(dtype)))
    at = {node: i for i, node in enumerate(result.program.node_ids())}

    def norm(x: Any) -> float:
        return float(np.linalg.norm(np.asarray(x, np.float64)))

    for layer in network_diagnostics(result, spec, Thresholds()).layers:
        name = layer.name
        a = result.values[at[f"{name}.a"]]
        assert layer.activation_mean == pytest.approx(np.mean(a, dtype=np.float64), rel=1e-12)
        assert layer.activation_std == pytest.approx(np.std(a, dtype=np.float64), rel=1e-12)
        rel = 1e-12 if dtype == "float64" else 1e-5  # float32: a float32 dot (diagnostics)
        assert layer.weight_norm == pytest.approx(norm(result.values[at[f"{name}.W"]]), rel=rel)
        for part in ("W", "b", "z"):
            want = norm(result.grad(at[f"{name}.{part}"]))
            assert layer.grad_norms[part] == pytest.approx(want, rel=rel)


def test_relu_nan_input_propagates_and_is_reported_where_it_starts(client: FlaskClient) -> None:
    body = two_unit_network("relu", bias=0.0)
    body["batch"]["x"][1][0] = "NaN"
    report = post(client, body)
    nodes = report["nodes"]
    assert nodes["layer1.a"]["value"][1][0] == "NaN"  # relu(NaN) is NaN, as in PyTorch
    assert report["health"]["status"] == "fail"
    assert [f["code"] for f in report["health"]["findings"]] == ["nonfinite"]
    assert "'X'" in report["health"]["findings"][0]["message"]
