"""Gradient checking: centred differences, relative errors, CS231n bands, kinks, cost caps."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from gradiag.engine import NodeSpec, compile_graph, run
from gradiag.engine.expression import parse_expression
from gradiag.engine.gradcheck import (
    GradcheckOptions,
    GradcheckResult,
    evaluation_budget,
    gradcheck,
    relative_error,
    verdict,
)

SIGMOID = "1 / (1 + exp(-(w0*x0 + w1*x1 + w2)))"
SIGMOID_VALUES = {"w0": 2.0, "x0": -1.0, "w1": -3.0, "x1": -2.0, "w2": -3.0}


def check(source: str, values: dict[str, Any], **options: Any) -> GradcheckResult:
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    parsed = parse_expression(source, arrays)
    result = run(compile_graph(parsed.nodes, parsed.output))
    return gradcheck(result, options=GradcheckOptions(**options))


# --- the relative error and the bands ---------------------------------------------------


def test_relative_error_is_the_cs231n_formula() -> None:
    assert float(relative_error(1.0, 1.0)) == 0.0
    assert float(relative_error(0.0, 0.0)) == 0.0  # both zero: no error
    assert float(relative_error(2.0, 1.0)) == 0.5  # |2 - 1| / max(2, 1)
    assert float(relative_error(-1.0, 1.0)) == 2.0  # opposite signs: the worst
    assert float(relative_error(1e-8, 0.0)) == 1.0  # one zero: 100 % off
    assert float(relative_error(1.0, 1.0 + 1e-9)) == pytest.approx(1e-9, rel=1e-6)
    np.testing.assert_array_equal(relative_error([1.0, 3.0], [1.0, 1.0]), [0.0, 2 / 3])


def test_relative_error_of_non_finite_numbers() -> None:
    assert float(relative_error(math.inf, math.inf)) == 0.0
    assert float(relative_error(math.inf, 1.0)) == math.inf
    assert float(relative_error(math.nan, 1.0)) == math.inf


@pytest.mark.parametrize(
    ("error", "band"),
    [
        (0.5, "wrong"),
        (1.01e-2, "wrong"),
        (1e-2, "uncomfortable"),
        (1e-3, "uncomfortable"),
        (1e-4, "ok for kinks"),
        (1e-6, "ok for kinks"),
        (1e-7, "good"),
        (0.0, "good"),
        (math.nan, "wrong"),
        (math.inf, "wrong"),
    ],
)
def test_verdict_bands_follow_cs231n(error: float, band: str) -> None:
    assert verdict(error) == band


def test_a_wrong_gradient_would_fail() -> None:
    """The engine cannot be broken from outside, so the comparison is exercised directly:
    an analytic gradient off by 10 % is 'wrong', one off by 1e-5 'ok for kinks'."""
    assert verdict(float(relative_error(1.1, 1.0))) == "wrong"
    assert verdict(float(relative_error(1.0 + 1e-5, 1.0))) == "ok for kinks"


# --- smooth graphs pass --------------------------------------------------------------


def test_sigmoid_neuron_passes_with_tiny_errors() -> None:
    result = check(SIGMOID, SIGMOID_VALUES)
    assert result.passed and result.complete
    assert result.max_relative_error < 1e-6
    assert result.verdict == "good"
    assert [n.id for n in result.nodes] == list(SIGMOID_VALUES)
    assert result.evaluations == 10  # two forwards per scalar leaf, nothing more


def test_tanh_matmul_graph_passes() -> None:
    rng = np.random.default_rng(0)
    values = {"W": rng.normal(size=(4, 3)), "x": rng.normal(size=3), "b": rng.normal(size=4)}
    result = check("sum(tanh(W @ x + b))", values)
    assert result.passed and result.max_relative_error < 1e-6
    assert {n.id: n.checked for n in result.nodes} == {"W": 12, "x": 3, "b": 4}


def test_output_grad_weights_the_numerical_derivative() -> None:
    parsed = parse_expression("x * y", {"x": np.asarray([1.0, 2.0]), "y": np.asarray(3.0)})
    program = compile_graph(parsed.nodes, parsed.output)
    seed = np.asarray([2.0, -1.0])
    result = gradcheck(run(program, seed), seed)
    assert result.passed and result.max_relative_error < 1e-8


# --- kinks ---------------------------------------------------------------------------


def test_relu_kink_within_the_step_is_flagged_not_failed() -> None:
    result = check("relu(x)", {"x": 1e-6}, step=1e-5)
    (node,) = result.nodes
    assert result.passed  # the crossing is left out of `passed`
    assert node.kink_crossings == 1 and result.kink_crossings == 1
    (kink,) = node.kinks
    assert (kink.at, kink.op, kink.analytic) == ("relu(x)", "relu", 1.0)
    assert kink.numerical == pytest.approx(0.55)  # (1.1e-5 - 0) / 2e-5
    assert verdict(kink.relative_error) == "wrong"  # what it would have been


def test_relu_away_from_the_kink_is_checked_normally() -> None:
    result = check("relu(x)", {"x": 0.5}, step=1e-5)
    assert result.kink_crossings == 0 and result.passed


@pytest.mark.parametrize(
    ("source", "values", "op"),
    [
        ("abs(x)", {"x": 0.0}, "abs"),
        ("leaky_relu(x)", {"x": -1e-6}, "leaky_relu"),
        ("max(x, y)", {"x": 1.0, "y": 1.0}, "max"),
        ("min(x, y)", {"x": 1.0, "y": 1.0 + 1e-6}, "min"),
    ],
)
def test_other_kinks_and_ties_are_flagged(source: str, values: dict[str, Any], op: str) -> None:
    result = check(source, values)
    assert result.nodes[0].kink_crossings == 1
    assert result.nodes[0].kinks[0].op == op
    assert result.passed


def test_kink_element_of_a_tensor_is_named() -> None:
    result = check("sum(relu(x))", {"x": [1.0, 2e-6, -3.0]})
    (node,) = result.nodes
    assert node.kink_crossings == 1
    assert node.kinks[0].element == (1,) and node.kinks[0].at_element == (1,)
    assert node.checked == 3 and result.passed


# --- cost caps -----------------------------------------------------------------------


def test_large_leaves_are_sampled_reproducibly() -> None:
    values = {"x": np.linspace(-1.0, 1.0, 100)}
    first = check("sum(tanh(x))", values, max_elements_per_node=5, seed=7)
    again = check("sum(tanh(x))", values, max_elements_per_node=5, seed=7)
    assert first.nodes[0].checked == 5 and first.evaluations == 10
    assert first.complete  # the sample is the request, not a cut
    assert first.nodes[0].worst_element == again.nodes[0].worst_element
    assert first.max_relative_error == again.max_relative_error


def test_evaluation_cap_shares_elements_round_robin() -> None:
    values = {"a": np.ones(10), "b": np.ones(10)}
    result = check("sum(a * b)", values, max_evaluations=8)
    assert result.evaluations == 8 and not result.complete
    assert [n.checked for n in result.nodes] == [2, 2]


def test_evaluation_budget_counts_nodes_and_flops() -> None:
    program = compile_graph([NodeSpec("x", "input", value=np.ones(()))], "x")
    assert evaluation_budget(program, 0, max_node_evaluations=100) == 100
    program = dataclasses.replace(program, flops=10)
    assert evaluation_budget(program, 50, max_node_evaluations=100) == 5


def test_class_labels_as_inputs_are_undefined_not_failures() -> None:
    nodes = [
        NodeSpec("s", "input", value=np.asarray([[1.0, 2.0, 0.5]])),
        NodeSpec("y", "input", value=np.asarray([1.0])),
        NodeSpec("loss", "softmax_cross_entropy", ("s", "y")),
    ]
    result = gradcheck(run(compile_graph(nodes, "loss")))
    by_id = {n.id: n for n in result.nodes}
    assert by_id["y"].undefined == 1 and by_id["y"].checked == 0
    assert by_id["s"].checked == 3 and result.passed


# --- over HTTP ---------------------------------------------------------------------------


def test_gradcheck_true_on_an_expression_over_http(client: FlaskClient) -> None:
    body = {"expression": SIGMOID, "values": SIGMOID_VALUES, "gradcheck": True}
    answer = client.post("/v1/graph", json=body).get_json()
    report = answer["gradcheck"]
    assert report["passed"] is True and report["max_relative_error"] < 1e-6
    assert set(report["per_node"]) == set(SIGMOID_VALUES)
    assert report["verdict"] == "good" and report["step"] == 1e-5
    assert report["tolerance"] == 1e-6 and report["complete"] is True


def test_gradcheck_options_over_http_report_the_kink(client: FlaskClient) -> None:
    body = {
        "nodes": [
            {"id": "x", "op": "input", "value": 1e-6},
            {"id": "r", "op": "relu", "inputs": ["x"]},
        ],
        "output": "r",
        "gradcheck": {"step": 1e-5, "tolerance": 1e-6, "max_elements_per_node": 8, "seed": 1},
    }
    answer = client.post("/v1/graph", json=body).get_json()
    report = answer["gradcheck"]
    assert report["passed"] is True and report["kink_crossings"] == 1
    kink = report["nodes"]["x"]["kinks"][0]
    assert (kink["at"], kink["op"]) == ("r", "relu")
    assert report["per_node"] == {"x": 0.0}


def test_no_gradcheck_key_without_asking(client: FlaskClient) -> None:
    answer = client.post("/v1/graph", json={"expression": "x", "values": {"x": 1}}).get_json()
    assert "gradcheck" not in answer and "explanation" not in answer


@pytest.mark.parametrize(
    "options",
    [{"step": 0}, {"step": -1e-5}, {"tolerance": -1}, {"max_elements_per_node": 0}, {"h": 1}],
)
def test_bad_gradcheck_options_are_422(client: FlaskClient, options: dict[str, Any]) -> None:
    body = {"expression": "x", "values": {"x": 1}, "gradcheck": options}
    answer = client.post("/v1/graph", json=body)
    assert answer.status_code == 422
    assert answer.get_json()["errors"][0]["loc"][0] == "gradcheck"
