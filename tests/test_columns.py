"""POST /v1/graph with a `columns` body: a scalar graph as a table, row i of every column is
node i. The hand-derived CS231n circuits, the same answer as the nodes body and as the
per-node walk (random DAGs and hypothesis tables), non-finite data, every 422 with its loc,
`report: "columns"` on the other bodies, gradcheck and explain, the SVG view, `gradiag check`
and the OpenAPI document."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from reference import reference_run
from werkzeug.test import TestResponse

from gradiag.engine import run
from gradiag.engine.columns import compile_columns
from gradiag.schemas.graph import GraphResponse
from gradiag.service import create_app
from gradiag.service.cli import main
from gradiag.service.config import Settings

PROBLEM = "application/problem+json"


# --- helpers -----------------------------------------------------------------------------


def post(client: FlaskClient, body: Any, url: str = "/v1/graph") -> TestResponse:
    return client.post(url, json=body)


def ok(response: TestResponse) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    answer: dict[str, Any] = response.get_json()
    GraphResponse.model_validate(answer)  # the documented response model
    return answer


def first_error(response: TestResponse) -> dict[str, Any]:
    """The first `errors[]` item of a 422 problem+json answer."""
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == PROBLEM
    problem = json.loads(response.get_data())
    assert problem["status"] == 422 and problem["detail"]
    assert problem["errors"], problem
    error: dict[str, Any] = problem["errors"][0]
    assert isinstance(error["msg"], str) and error["msg"]
    return error


def table(**columns: Any) -> dict[str, Any]:
    """The CS231n circuit f = (x + y) * z as columns, with any column replaced."""
    return {**CIRCUIT, **columns}


# f = (x + y) * z at x=-2, y=5, z=-4: q = 3, f = -12; df/dx = df/dy = z = -4, df/dz = q = 3
CIRCUIT: dict[str, Any] = {
    "op": ["input", "input", "input", "add", "mul"],
    "inputs": [[-1, -1, -1, 0, 3], [-1, -1, -1, 1, 2]],
    "value": [-2, 5, -4, None, None],
}
CIRCUIT_IDS = ["x", "y", "z", "q", "f"]
CIRCUIT_VALUES = [-2.0, 5.0, -4.0, 3.0, -12.0]
CIRCUIT_GRADS = [-4.0, -4.0, 3.0, -4.0, 1.0]
CIRCUIT_NODES = {
    "nodes": [
        {"id": "x", "op": "input", "value": -2},
        {"id": "y", "op": "input", "value": 5},
        {"id": "z", "op": "input", "value": -4},
        {"id": "q", "op": "add", "inputs": ["x", "y"]},
        {"id": "f", "op": "mul", "inputs": ["q", "z"]},
    ],
    "output": "f",
}

# The CS231n sigmoid neuron f = 1 / (1 + exp(-(w0*x0 + w1*x1 + w2))) gate by gate, with a const
NEURON: dict[str, Any] = {
    "id": ["w0", "x0", "w1", "x1", "w2", "m0", "m1", "s0", "s", "n", "e", "one", "d", "f"],
    "op": ["input"] * 5 + ["mul", "mul", "add", "add", "neg", "exp", "const", "add", "reciprocal"],
    "inputs": [
        [-1, -1, -1, -1, -1, 0, 2, 5, 7, 8, 9, -1, 10, 12],
        [-1, -1, -1, -1, -1, 1, 3, 6, 4, -1, -1, -1, 11, -1],
    ],
    "value": [2, -1, -3, -2, -3, None, None, None, None, None, None, 1, None, None],
}
NEURON_GRADS = {"w0": -0.196, "x0": 0.393, "w1": -0.393, "x1": -0.590, "w2": 0.196}


def nodes_of(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """The same graph as the nodes body, one node per row in row order."""
    ids = columns.get("id") or [str(i) for i in range(len(columns["op"]))]
    attrs = columns.get("attrs") or [None] * len(ids)
    nodes: list[dict[str, Any]] = []
    for i, op in enumerate(columns["op"]):
        if columns["value"][i] is not None:
            nodes.append({"id": ids[i], "op": op, "value": columns["value"][i]})
            continue
        inputs = [ids[row[i]] for row in columns["inputs"] if row[i] >= 0]
        node: dict[str, Any] = {"id": ids[i], "op": op, "inputs": inputs}
        if attrs[i]:
            node["attrs"] = attrs[i]
        nodes.append(node)
    return nodes


def reordered(columns: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The table with its rows in the order of `order` (ids), operand rows renumbered."""
    old = {node_id: i for i, node_id in enumerate(columns["id"])}
    rows = [old[node_id] for node_id in order]
    new = {old_row: k for k, old_row in enumerate(rows)}
    return {
        "op": [columns["op"][i] for i in rows],
        "inputs": [[-1 if r[i] < 0 else new[r[i]] for i in rows] for r in columns["inputs"]],
        "value": [columns["value"][i] for i in rows],
        "id": list(order),
        "attrs": [columns["attrs"][i] for i in rows],
    }


def by_id(answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values, grads) keyed by node id from either form of an answer (a const's grad: None)."""
    if "columns" in answer:
        cols = answer["columns"]
        ids = cols.get("id") or [str(i) for i in range(len(cols["value"]))]
        return dict(zip(ids, cols["value"], strict=True)), dict(zip(ids, cols["grad"], strict=True))
    nodes = answer["nodes"]
    return {k: n["value"] for k, n in nodes.items()}, {k: n.get("grad") for k, n in nodes.items()}


def assert_close(got: dict[str, Any] | list[Any], expected: dict[str, Any] | list[Any]) -> None:
    """Wire gradients equal up to summation order: non-finite strings and nulls exactly,
    numbers to 1e-12 relative and 1e-12 absolute."""
    a_all = got if isinstance(got, dict) else dict(enumerate(got))
    b_all = expected if isinstance(expected, dict) else dict(enumerate(expected))
    assert a_all.keys() == b_all.keys()
    for key, a in a_all.items():
        b = b_all[key]
        if isinstance(a, float) and isinstance(b, float):
            assert abs(a - b) <= 1e-12 + 1e-12 * abs(b), (key, a, b)
        else:
            assert a == b, (key, a, b)


def finding_keys(answer: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The findings as a sorted list, the `nonfinite` one without its location: it names
    where NaN or Infinity starts in the answer's own order (the table's rows, or the nodes
    body's topological order), and two bodies of one graph may order the nodes differently."""
    findings = answer["health"]["findings"]
    nonfinite = [f for f in findings if f["code"] == "nonfinite"]
    assert len(nonfinite) == (1 if answer["diagnostics"]["nonfinite_nodes"] else 0)
    if nonfinite:
        assert nonfinite[0]["location"] in answer["diagnostics"]["nonfinite_nodes"]
    return sorted(
        (f["location"], f["code"], f["message"]) if f["code"] != "nonfinite" else ("", "", "")
        for f in findings
    )


# --- 1. the CS231n circuits over HTTP ----------------------------------------------------


def test_circuit_answers_in_columns_by_default(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": CIRCUIT}))
    assert answer["output"] == {"id": "4", "value": -12.0, "shape": []}  # default: last row
    # no `id` column in the request: none in the answer, and no `nodes` map
    assert answer["columns"] == {"value": CIRCUIT_VALUES, "grad": CIRCUIT_GRADS}
    assert "nodes" not in answer
    assert answer["parameters"] == {"tensors": 0, "total": 0}
    units = {"units": 0, "saturated_units": 0, "saturated_unit_fraction": 0.0}
    none_saturated = {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0}
    assert answer["diagnostics"] == {
        "relu": {"nodes": 0, "elements": 0, "dead_elements": 0, "dead_fraction": 0.0,
                 "units": 0, "dead_units": 0, "dead_unit_fraction": 0.0, "margin_nodes": 0},
        "sigmoid": {**none_saturated, **units},
        "tanh": {**none_saturated, **units},
        "nonfinite_nodes": [],
    }  # fmt: skip
    assert answer["health"] == {"status": "ok", "findings": []}


def test_circuit_with_ids_and_output_by_id(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": table(id=CIRCUIT_IDS), "output": "f"}))
    assert answer["output"] == {"id": "f", "value": -12.0, "shape": []}
    assert answer["columns"] == {
        "id": CIRCUIT_IDS,
        "value": CIRCUIT_VALUES,
        "grad": CIRCUIT_GRADS,
    }
    # d q / d node: x and y 1, z and f (not on a path to q) 0
    answer = ok(post(client, {"columns": table(id=CIRCUIT_IDS), "output": "q"}))
    assert answer["output"] == {"id": "q", "value": 3.0, "shape": []}
    assert answer["columns"]["grad"] == [1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("ids", "output", "expected_id"),
    [
        (None, 3, "3"),  # a row number
        (None, "3", "3"),  # the default id of row 3
        (CIRCUIT_IDS, 3, "q"),  # a row number names the row even when ids are given
        (CIRCUIT_IDS, "q", "q"),
    ],
)
def test_output_by_row_or_id(
    client: FlaskClient, ids: list[str] | None, output: Any, expected_id: str
) -> None:
    columns = table() if ids is None else table(id=ids)
    answer = ok(post(client, {"columns": columns, "output": output}))
    assert answer["output"] == {"id": expected_id, "value": 3.0, "shape": []}
    assert answer["columns"]["grad"] == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_a_table_of_leaves_needs_no_inputs(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": {"op": ["param", "const"], "value": [3, 4]}, "output": 0}))
    assert answer["columns"] == {"value": [3.0, 4.0], "grad": [1.0, None]}
    assert answer["parameters"] == {"tensors": 1, "total": 1}


def test_output_grad_scales_every_gradient(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": CIRCUIT, "output_grad": 2}))
    assert answer["columns"]["grad"] == [2 * g for g in CIRCUIT_GRADS]


def test_report_nodes_is_the_nodes_body_answer(client: FlaskClient) -> None:
    """The whole answer (nodes map with roles, inputs and local gradients; diagnostics;
    health) is the nodes body's."""
    body = {"columns": table(id=CIRCUIT_IDS), "output": "f", "report": "nodes", "explain": True}
    columns_answer = ok(post(client, body))
    nodes_answer = ok(post(client, {**CIRCUIT_NODES, "explain": True}))
    assert "columns" not in columns_answer
    assert columns_answer == nodes_answer
    assert nodes_answer["nodes"]["f"]["local_grad"] == {"q": -4.0, "z": 3.0}


def test_report_nodes_without_ids_keys_the_rows(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": CIRCUIT, "report": "nodes", "explain": True}))
    assert list(answer["nodes"]) == ["0", "1", "2", "3", "4"]
    assert answer["nodes"]["4"]["inputs"] == ["3", "2"]
    assert [n["grad"] for n in answer["nodes"].values()] == CIRCUIT_GRADS


def test_cs231n_sigmoid_neuron_as_columns(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": NEURON}))
    assert answer["output"]["id"] == "f"
    assert answer["output"]["value"] == pytest.approx(0.7311, abs=1e-4)
    values, grads = by_id(answer)
    for node_id, expected in NEURON_GRADS.items():
        assert grads[node_id] == pytest.approx(expected, abs=1e-3), node_id
    assert grads["d"] == pytest.approx(-0.5344, abs=1e-4)  # -1/d^2 at d = 1 + e^-1
    assert values["one"] == 1.0 and grads["one"] is None  # a const row has no gradient
    nodes_answer = ok(post(client, {"nodes": nodes_of(NEURON), "output": "f"}))
    assert by_id(nodes_answer) == (values, grads)


def test_leaky_relu_alpha_from_attrs(client: FlaskClient) -> None:
    columns = {
        "op": ["input", "leaky_relu", "leaky_relu", "add"],
        "inputs": [[-1, 0, 0, 1], [-1, -1, -1, 2]],
        "value": [-2, None, None, None],
        "attrs": [None, {"alpha": 0.2}, None, None],  # row 2: the default alpha 0.01
    }
    answer = ok(post(client, {"columns": columns}))
    assert answer["columns"]["value"] == pytest.approx([-2.0, -0.4, -0.02, -0.42])
    assert answer["columns"]["grad"] == pytest.approx([0.21, 1.0, 1.0, 1.0])


# --- 2. random scalar DAGs: the nodes body and the per-node walk give the same answer -----

SAFE_UNARY = ["identity", "neg", "abs", "square", "relu", "sigmoid", "tanh", "leaky_relu"]
UNSAFE_UNARY = ["exp", "log", "sqrt", "reciprocal"]
SAFE_BINARY = ["add", "sub", "mul", "max", "min"]
UNSAFE_BINARY = ["div"]
LEAVES = 20


def random_table(seed: int, n: int, *, safe: bool) -> tuple[dict[str, Any], int, int]:
    """A scalar DAG of n rows in topological order: (columns, output row, unused leaf row).

    20 leaves (input, param, const) with repeated values (ties for max/min, relu at 0),
    fan-out (recent rows are picked often), x op x, leaky_relu with and without alphas, one
    param leaf nobody uses, and an output that is not the last row. `safe=False` adds exp,
    log, sqrt, reciprocal and div: infinities and NaNs."""
    rng = random.Random(seed)
    unary = SAFE_UNARY + ([] if safe else UNSAFE_UNARY)
    binary = SAFE_BINARY + ([] if safe else UNSAFE_BINARY)
    ops: list[str] = []
    first: list[int] = []
    second: list[int] = []
    values: list[float | None] = []
    attrs: list[dict[str, float] | None] = []
    unused = rng.randrange(LEAVES, n // 2)

    def pick(i: int) -> int:
        while True:
            if rng.random() < 0.7:
                j = i - 1 - min(int(rng.expovariate(0.2)), i - 1)
            else:
                j = rng.randrange(i)
            if j != unused:
                return j

    for i in range(n):
        if i < LEAVES or i == unused:
            kind = ("input", "param")[i % 2] if i % 7 != 3 else "const"
            ops.append("param" if i == unused else kind)
            first.append(-1)
            second.append(-1)
            values.append(rng.choice([0.0, 0.0, 1.0, -1.0, 0.5, rng.uniform(-2, 2)]))
            attrs.append(None)
            continue
        if rng.random() < 0.5:
            op = rng.choice(unary)
            alpha = op == "leaky_relu" and rng.random() < 0.7
            ops.append(op)
            first.append(pick(i))
            second.append(-1)
            attrs.append({"alpha": rng.choice([0.01, 0.2])} if alpha else None)
        else:
            a = pick(i)
            ops.append(rng.choice(binary))
            first.append(a)
            second.append(a if rng.random() < 0.1 else pick(i))  # x * x, max(x, x)
            attrs.append(None)
        values.append(None)
    columns = {
        "op": ops,
        "inputs": [first, second],
        "value": values,
        "id": [f"n{i}" for i in range(n)],
        "attrs": attrs,
    }
    return columns, rng.randrange(n * 3 // 4, n - 1), unused


# seed, rows, safe, thresholds (findings: every relu, saturation, exploding leaves)
DAGS = [
    (0, 300, True, {"exploding_norm": 0.1}),
    (1, 700, False, {"saturation_eps": 0.3}),
    (2, 1300, True, {"exploding_norm": 1e-3, "dead_warn": 0.0}),
    (3, 2000, False, {}),
]


def test_random_tables_have_the_features_they_claim() -> None:
    for seed, n, safe, _ in DAGS:
        columns, output, unused = random_table(seed, n, safe=safe)
        ops, (a, b) = columns["op"], columns["inputs"]
        assert {"const", "param", "input", "relu", "sigmoid", "tanh", "leaky_relu"} <= set(ops)
        assert any(attrs for attrs in columns["attrs"])
        assert any(ops[i] == "mul" and a[i] == b[i] for i in range(n))  # fan-out x * x
        assert any(ops[i] in ("max", "min") and a[i] == b[i] for i in range(n))  # a tie
        assert unused not in a and unused not in b
        assert output < n - 1
        assert all(a[i] < i and b[i] < i for i in range(n))


@pytest.mark.parametrize(("seed", "n", "safe", "thresholds"), DAGS)
def test_random_table_matches_the_nodes_body(
    client: FlaskClient, seed: int, n: int, safe: bool, thresholds: dict[str, float]
) -> None:
    columns, output, unused = random_table(seed, n, safe=safe)
    output_id = columns["id"][output]
    answer = ok(post(client, {"columns": columns, "output": output, "thresholds": thresholds}))
    expected = ok(
        post(client, {"nodes": nodes_of(columns), "output": output_id, "thresholds": thresholds})
    )
    values, grads = by_id(answer)
    expected_values, expected_grads = by_id(expected)
    assert answer["columns"]["id"] == columns["id"]  # the request's row order
    assert values == expected_values  # the same op calls: exactly
    assert_close(grads, expected_grads)
    assert answer["output"] == expected["output"]
    assert answer["parameters"] == expected["parameters"]
    assert answer["parameters"]["tensors"] == columns["op"].count("param")  # unused one too
    for gate in ("relu", "sigmoid", "tanh"):
        assert answer["diagnostics"][gate] == expected["diagnostics"][gate]
    # The table keeps its rows, and so does the nodes body (its request order is topological
    # here); the same ids and findings, each list in its own topological order
    nonfinite = answer["diagnostics"]["nonfinite_nodes"]
    assert sorted(nonfinite) == sorted(expected["diagnostics"]["nonfinite_nodes"])
    assert nonfinite == [i for i in columns["id"] if i in set(nonfinite)]
    assert answer["health"]["status"] == expected["health"]["status"]
    assert finding_keys(answer) == finding_keys(expected)
    assert answer["health"]["findings"], "the thresholds make the graph report something"
    assert (nonfinite != []) == (not safe)
    # nothing after the output and no unused leaf reaches it
    assert grads[columns["id"][unused]] == 0.0
    assert all(g == 0.0 for g in answer["columns"]["grad"][output + 1 :])

    # the table in the nodes body's own order: the whole answer is the same, order included
    order = list(expected["nodes"])
    same_order = reordered(columns, order)
    assert [node["id"] for node in nodes_of(same_order)] == order
    answer = ok(
        post(client, {"columns": same_order, "output": output_id, "thresholds": thresholds})
    )
    assert answer["columns"]["id"] == order
    assert answer["columns"]["value"] == [expected["nodes"][i]["value"] for i in order]
    assert_close(answer["columns"]["grad"], [expected["nodes"][i].get("grad") for i in order])
    for key in ("output", "parameters", "diagnostics", "health"):
        assert answer[key] == expected[key], key
    # and `report: "nodes"` on it is the nodes body's map: roles, inputs, local gradients
    body = {"columns": same_order, "output": output_id, "report": "nodes"}
    nodes = ok(post(client, {**body, "thresholds": thresholds}))["nodes"]
    assert list(nodes) == order
    assert_close(by_id({"nodes": nodes})[1], expected_grads)
    strip = ("grad", "local_grad")
    for node_id, node in nodes.items():
        want = expected["nodes"][node_id]
        assert {k: v for k, v in node.items() if k not in strip} == {
            k: v for k, v in want.items() if k not in strip
        }, node_id
        assert_close(node.get("local_grad", {}), want.get("local_grad", {}))


@pytest.mark.parametrize(("seed", "n", "safe", "thresholds"), DAGS)
def test_random_table_matches_the_reference_walk(
    seed: int, n: int, safe: bool, thresholds: dict[str, float]
) -> None:
    """Every op row of a table is a batched scalar node; the executor's values are the
    textbook walk's (tests/reference.py) bit for bit, its gradients up to fan-in order."""
    columns, output, _ = random_table(seed, n, safe=safe)
    ops, inputs, values, attrs = (columns[k] for k in ("op", "inputs", "value", "attrs"))
    program = compile_columns(ops, inputs, values, output=output, attrs=attrs)
    groups = [group for level in program.plan.levels for group in level.groups]
    assert groups and all(group.batched for group in groups)
    result = run(program)
    want_values, want_grads = reference_run(program)
    for i, (value, grad) in enumerate(zip(want_values, want_grads, strict=True)):
        assert np.array_equal(result.value(i), value, equal_nan=True), i
        got = result.grad(i)
        if grad is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, grad, rtol=1e-12, atol=1e-12, err_msg=str(i))


SMALL_OPS = SAFE_UNARY + UNSAFE_UNARY + SAFE_BINARY + UNSAFE_BINARY


@st.composite
def small_tables(draw: st.DrawFn) -> dict[str, Any]:
    leaves = draw(st.integers(1, 4))
    n = leaves + draw(st.integers(0, 25))
    ops: list[str] = []
    inputs: list[list[int]] = [[], []]
    values: list[float | None] = []
    attrs: list[dict[str, float] | None] = []
    for i in range(n):
        if i < leaves:
            ops.append(draw(st.sampled_from(["input", "param", "const"])))
            values.append(draw(st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.5, 3.0])))
            inputs[0].append(-1)
            inputs[1].append(-1)
            attrs.append(None)
            continue
        op = draw(st.sampled_from(SMALL_OPS))
        ops.append(op)
        values.append(None)
        inputs[0].append(draw(st.integers(0, i - 1)))
        inputs[1].append(draw(st.integers(0, i - 1)) if op in SAFE_BINARY + UNSAFE_BINARY else -1)
        alpha = op == "leaky_relu" and draw(st.booleans())
        attrs.append({"alpha": draw(st.sampled_from([0.01, 0.3]))} if alpha else None)
    return {
        "columns": {
            "op": ops,
            "inputs": inputs,
            "value": values,
            "id": [f"v{i}" for i in range(n)],
            "attrs": attrs,
        },
        "output": draw(st.integers(0, n - 1)),
        "output_grad": draw(st.sampled_from([None, 2.0, -0.5])),
    }


PROPERTY_CLIENT = create_app(Settings(), TESTING=True).test_client()


@hypothesis_settings(max_examples=40, deadline=None)
@given(body=small_tables())
def test_small_tables_and_their_nodes_bodies_agree(body: dict[str, Any]) -> None:
    """Any small table and the same graph as a nodes body give the same values, gradients
    and findings."""
    columns = body["columns"]
    nodes_body = {
        "nodes": nodes_of(columns),
        "output": columns["id"][body["output"]],
        "output_grad": body["output_grad"],
    }
    expected = ok(post(PROPERTY_CLIENT, nodes_body))
    per_node = ok(post(PROPERTY_CLIENT, body))
    values, grads = by_id(per_node)
    expected_values, expected_grads = by_id(expected)
    assert values == expected_values
    assert_close(grads, expected_grads)
    assert finding_keys(per_node) == finding_keys(expected)
    assert sorted(per_node["diagnostics"]["nonfinite_nodes"]) == sorted(
        expected["diagnostics"]["nonfinite_nodes"]
    )


# --- 3. non-finite data -------------------------------------------------------------------


def test_log_of_zero_and_one_over_zero(client: FlaskClient) -> None:
    # f = log(z) * (1/z) at z = 0: -inf * inf. df/dz = (1/z) (1/z) + log(z) (-1/z^2) = +inf
    columns = {
        "op": ["input", "const", "log", "reciprocal", "mul"],
        "inputs": [[-1, -1, 0, 0, 2], [-1, -1, -1, -1, 3]],
        "value": [0, 1, None, None, None],
        "id": ["z", "one", "lz", "rz", "f"],
    }
    answer = ok(post(client, {"columns": columns}))
    assert answer["output"] == {"id": "f", "value": "-Infinity", "shape": []}
    assert answer["columns"]["value"] == [0.0, 1.0, "-Infinity", "Infinity", "-Infinity"]
    assert answer["columns"]["grad"] == ["Infinity", None, "Infinity", "-Infinity", 1.0]
    assert answer["diagnostics"]["nonfinite_nodes"] == ["z", "lz", "rz", "f"]
    assert answer["health"]["status"] == "fail"
    (finding,) = answer["health"]["findings"]
    # the first node whose value is not finite: log(0) (z's gradient is infinite too)
    assert (finding["code"], finding["severity"], finding["location"]) == (
        "nonfinite",
        "fail",
        "lz",
    )


def test_zero_over_zero_gradients_are_nan(client: FlaskClient) -> None:
    # r = a / b at a = 1, b = 0 is inf; g = r - r is NaN. dg/dr = 1 - 1 = 0, so
    # dg/da = 0 / b and dg/db = -0 * a / b^2: both 0/0
    columns = {
        "op": ["input", "input", "div", "sub"],
        "inputs": [[-1, -1, 0, 2], [-1, -1, 1, 2]],
        "value": [1, 0, None, None],
    }
    answer = ok(post(client, {"columns": columns}))
    assert answer["columns"] == {
        "value": [1.0, 0.0, "Infinity", "NaN"],
        "grad": ["NaN", "NaN", 0.0, 1.0],
    }
    assert answer["diagnostics"]["nonfinite_nodes"] == ["0", "1", "2", "3"]  # the row ids
    assert answer["health"]["status"] == "fail"


def test_non_finite_strings_in_the_request(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": table(value=[-2, "Infinity", -4, None, None])}))
    assert answer["columns"]["value"] == [-2.0, "Infinity", -4.0, "Infinity", "-Infinity"]
    assert answer["columns"]["grad"] == [-4.0, -4.0, "Infinity", -4.0, 1.0]
    answer = ok(post(client, {"columns": table(value=["NaN", 5, -4, None, None])}))
    assert answer["columns"]["value"] == ["NaN", 5.0, -4.0, "NaN", "NaN"]
    assert answer["health"]["status"] == "fail"


def test_many_non_finite_rows_in_a_table(client: FlaskClient) -> None:
    """More than 64 non-finite numbers go through NumPy's string conversion: the same
    strings, never a bare inf in the JSON."""
    n = 400
    columns = {
        "op": ["input", "log", *["neg"] * (n - 2)],
        "inputs": [[-1, *range(n - 1)]],
        "value": [0, *[None] * (n - 1)],
    }
    answer = ok(post(client, {"columns": columns}))
    signs = ["-Infinity", "Infinity"]
    assert answer["columns"]["value"] == [0.0, *[signs[k % 2] for k in range(n - 1)]]
    # d out / d row: (-1)^(negs after it); d log(x)/dx at 0: 1/0
    last = (n - 2) % 2
    assert answer["columns"]["grad"][-1] == 1.0
    assert answer["columns"]["grad"][0] == ("Infinity" if last == 0 else "-Infinity")
    assert len(answer["diagnostics"]["nonfinite_nodes"]) == n
    assert answer["health"]["status"] == "fail"


# --- 4. every 422 with its loc -------------------------------------------------------------

BAD_TABLES: list[tuple[str, dict[str, Any], list[Any]]] = [
    # rows: an operand after its user, itself, or below -1
    ("operand after its user", table(inputs=[[-1, -1, -1, 0, 3], [-1, -1, -1, 4, 2]]),
     ["columns", "inputs", 1, 3]),
    ("operand is the row itself", table(inputs=[[-1, -1, -1, 3, 3], [-1, -1, -1, 1, 2]]),
     ["columns", "inputs", 0, 3]),
    ("operand below -1", table(inputs=[[-1, -1, -1, -2, 3], [-1, -1, -1, 1, 2]]),
     ["columns", "inputs", 0, 3]),
    ("too few operands", table(inputs=[[-1, -1, -1, 0, 3], [-1, -1, -1, -1, 2]]),
     ["columns", "inputs"]),
    ("a leaf with an operand", table(inputs=[[1, -1, -1, 0, 3], [-1, -1, -1, 1, 2]]),
     ["columns", "inputs"]),
    ("one operand list for add", table(inputs=[[-1, -1, -1, 0, 3]]), ["columns", "inputs"]),
    ("-1 then an operand",
     table(op=["input", "input", "input", "neg", "mul"],
           inputs=[[-1, -1, -1, -1, 3], [-1, -1, -1, 1, 2]]),
     ["columns", "inputs", 1, 3]),
    # values: a leaf needs one, an op row none, and numbers are strict
    ("leaf without a value", table(value=[-2, None, -4, None, None]), ["columns", "value", 1]),
    ("op row with a value", table(value=[-2, 5, -4, 3, None]), ["columns", "value", 3]),
    ('"1e3" as a value', table(value=[-2, "1e3", -4, None, None]), ["columns", "value", 1]),
    ("true as a value", table(value=[-2, True, -4, None, None]), ["columns", "value", 1]),
    ("a list as a value", table(value=[[1, 2], 5, -4, None, None]), ["columns", "value", 0]),
    ("a float row number", table(inputs=[[-1, -1, -1, 0.0, 3], [-1, -1, -1, 1, 2]]),
     ["columns", "inputs", 0, 3]),
    # column lengths
    ("short inputs list", table(inputs=[[-1, -1, -1, 0, 3], [-1, -1, -1, 1]]),
     ["columns", "inputs", 1]),
    ("short value column", table(value=[-2, 5, -4, None]), ["columns", "value"]),
    ("short id column", table(id=["x", "y"]), ["columns", "id"]),
    ("short attrs column", table(attrs=[None]), ["columns", "attrs"]),
    ("four operand lists", table(inputs=[[-1] * 5] * 4), ["columns", "inputs"]),
    ("no rows", {"op": [], "inputs": [], "value": []}, ["columns", "op"]),
    # ops and attrs
    ("unknown op", table(op=["input", "input", "input", "add", "frob"]), ["columns", "op", 4]),
    ("an attr the op does not take", table(attrs=[None, None, None, {"alpha": 0.2}, None]),
     ["columns", "attrs", 3, "alpha"]),
    ("an attr no op takes", table(attrs=[None, None, None, {"beta": 0.2}, None]),
     ["columns", "attrs", 3, "beta"]),
    ("matmul of two scalars", table(op=["input", "input", "input", "add", "matmul"]),
     ["columns", "op", 4]),
    ("sum of a scalar over axis 0",
     table(op=["input", "input", "input", "add", "sum"],
           inputs=[[-1, -1, -1, 0, 3], [-1, -1, -1, 1, -1]],
           attrs=[None, None, None, None, {"axis": 0}]),
     ["columns", "op", 4]),
    ("cross-entropy of scalars",
     table(op=["input", "input", "input", "add", "softmax_cross_entropy"]),
     ["columns", "op", 4]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("columns", "loc"), [case[1:] for case in BAD_TABLES], ids=[case[0] for case in BAD_TABLES]
)
def test_a_bad_table_is_a_422_at_its_cell(
    client: FlaskClient, columns: dict[str, Any], loc: list[Any]
) -> None:
    assert first_error(post(client, {"columns": columns}))["loc"] == loc


def test_duplicate_id_names_the_row_and_the_node(client: FlaskClient) -> None:
    error = first_error(post(client, {"columns": table(id=["x", "y", "x", "q", "f"])}))
    assert error["loc"] == ["columns", "id", 2]
    assert error["node"] == "x"
    assert "rows 0 and 2" in error["msg"]


@pytest.mark.parametrize(
    ("ids", "output"),
    [
        (None, 5),  # past the last row
        (None, -1),
        (None, "f"),  # no such id
        (CIRCUIT_IDS, "3"),  # with an id column, "3" is not an id
        (None, "03"),  # row 3's id is "3"
        (None, "+3"),
        (None, "\u0663"),  # ARABIC-INDIC DIGIT THREE: str.isdigit(), and int() reads 3
        (None, True),
        (None, 3.0),
    ],
)
def test_bad_output_is_a_422_at_output(client: FlaskClient, ids: Any, output: Any) -> None:
    columns = table() if ids is None else table(id=ids)
    assert first_error(post(client, {"columns": columns, "output": output}))["loc"] == ["output"]


def test_bad_report_is_a_422(client: FlaskClient) -> None:
    assert first_error(post(client, {"columns": CIRCUIT, "report": "rows"}))["loc"] == ["report"]


def test_columns_and_nodes_together_is_a_422(client: FlaskClient) -> None:
    body = {"columns": CIRCUIT, "nodes": CIRCUIT_NODES["nodes"]}
    assert first_error(post(client, body))["loc"] == ["nodes"]


@pytest.mark.parametrize(
    ("op", "inputs", "value"),
    [
        ("sum", [[-1, -1, -1, 0, 3], [-1, -1, -1, 1, -1]], 3.0),  # of a scalar: the scalar
        ("mean", [[-1, -1, -1, 0, 3], [-1, -1, -1, 1, -1]], 3.0),
        ("transpose", [[-1, -1, -1, 0, 3], [-1, -1, -1, 1, -1]], 3.0),
        ("mse", [[-1, -1, -1, 0, 3], [-1, -1, -1, 1, 2]], 49.0),  # (3 - (-4))^2
    ],
)
def test_non_elementwise_ops_that_keep_a_scalar_are_fine(
    client: FlaskClient, op: str, inputs: list[list[int]], value: float
) -> None:
    columns = table(op=["input", "input", "input", "add", op], inputs=inputs)
    assert ok(post(client, {"columns": columns}))["output"]["value"] == value


def test_over_max_nodes_is_a_422_naming_the_limit() -> None:
    client = create_app(Settings(max_nodes=4), TESTING=True).test_client()
    response = post(client, {"columns": CIRCUIT})
    assert first_error(response)["loc"] == ["columns", "op"]
    problem = response.get_json()
    assert (problem["limit"], problem["limit_value"]) == ("max_nodes", 4)
    # the limit comes first: a long table is refused before any column is read
    long = {"op": ["input"] * 5000, "value": [None] * 10}
    response = post(client, {"columns": long})
    assert response.get_json()["limit"] == "max_nodes"


def test_over_max_total_elements_is_a_422_naming_the_limit() -> None:
    client = create_app(Settings(max_total_elements=4), TESTING=True).test_client()
    response = post(client, {"columns": CIRCUIT})
    assert first_error(response)["loc"] == ["columns", "op"]
    assert response.get_json()["limit"] == "max_total_elements"


@pytest.mark.parametrize("row", [2**63, -(2**63) - 1])
def test_an_operand_row_beyond_int64_is_a_422(client: FlaskClient, row: int) -> None:
    columns = table(inputs=[[-1, -1, -1, row, 3], [-1, -1, -1, 1, 2]])
    assert first_error(post(client, {"columns": columns}))["loc"] == ["columns", "inputs", 0, 3]


def test_a_bad_output_grad_is_a_422_at_output_grad(client: FlaskClient) -> None:
    error = first_error(post(client, {"columns": CIRCUIT, "output_grad": "1e3"}))
    assert error["loc"] == ["output_grad"]


def test_the_flop_limit_reads_a_table_as_the_nodes_body() -> None:
    client = create_app(Settings(max_flops=2), TESTING=True).test_client()
    assert post(client, CIRCUIT_NODES).status_code == 200  # two ops: add, mul
    ok(post(client, {"columns": table(id=CIRCUIT_IDS), "output": "f"}))


# --- 5. report "columns" on the other bodies -----------------------------------------------


def test_report_columns_on_a_tensor_graph(client: FlaskClient) -> None:
    # f = sum(W @ x): q = [1 - 2, 3 - 4] = [-1, -1]; df/dW = 1 x^T = [[1, -1], [1, -1]]
    body = {
        "nodes": [
            {"id": "W", "op": "param", "value": [[1, 2], [3, 4]]},
            {"id": "x", "op": "const", "value": [1, -1]},
            {"id": "q", "op": "matmul", "inputs": ["W", "x"]},
            {"id": "f", "op": "sum", "inputs": ["q"]},
        ],
        "output": "f",
        "report": "columns",
    }
    answer = ok(post(client, body))
    assert "nodes" not in answer
    assert answer["columns"] == {
        "id": ["W", "x", "q", "f"],
        "shape": [[2, 2], [2], [2], []],
        "value": [[[1.0, 2.0], [3.0, 4.0]], [1.0, -1.0], [-1.0, -1.0], -2.0],
        "grad": [[[1.0, -1.0], [1.0, -1.0]], None, [1.0, 1.0], 1.0],
    }
    assert answer["parameters"] == {"tensors": 1, "total": 4}


def test_report_columns_on_a_scalar_nodes_body_is_in_topological_order(
    client: FlaskClient,
) -> None:
    body = {
        "nodes": [
            {"id": "f", "op": "mul", "inputs": ["a", "b"]},
            {"id": "b", "op": "input", "value": 2},
            {"id": "a", "op": "const", "value": 3},
        ],
        "output": "f",
        "report": "columns",
    }
    answer = ok(post(client, body))
    assert answer["columns"] == {"id": ["b", "a", "f"], "value": [2.0, 3.0, 6.0],
                                 "grad": [3.0, None, 1.0]}  # fmt: skip


def test_report_columns_on_an_expression(client: FlaskClient) -> None:
    body = {
        "expression": "(x + y) * z",
        "values": {"x": -2, "y": 5, "z": -4},
        "report": "columns",
    }
    answer = ok(post(client, body))
    assert answer["columns"] == {
        "id": ["x", "y", "z", "x + y", "(x + y) * z"],
        "value": CIRCUIT_VALUES,
        "grad": CIRCUIT_GRADS,
    }


# --- 6. gradcheck and explain ----------------------------------------------------------------


def test_gradcheck_and_explain_on_a_table(client: FlaskClient) -> None:
    options = {"gradcheck": True, "explain": True}
    answer = ok(post(client, {"columns": NEURON, **options}))
    check = answer["gradcheck"]
    assert check["passed"] is True and check["verdict"] == "good"
    assert set(check["per_node"]) == set(NEURON_GRADS)  # the input leaves, not the const
    assert check["max_relative_error"] < 1e-6
    leaves = answer["explanation"]["leaves"]
    assert {leaf["id"] for leaf in leaves} == set(NEURON_GRADS)
    assert leaves[0]["id"] == "x1"  # |-0.590|: the largest gradient
    assert leaves[0]["grad"] == pytest.approx(-0.590, abs=1e-3)
    expected = ok(post(client, {"nodes": nodes_of(NEURON), "output": "f", **options}))
    assert answer["gradcheck"] == expected["gradcheck"]
    assert answer["explanation"] == expected["explanation"]


# --- 7. the SVG view ---------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [NEURON, CIRCUIT], ids=["ids", "row ids"])
def test_svg_of_a_table(client: FlaskClient, columns: dict[str, Any]) -> None:
    response = post(client, {"columns": columns}, "/v1/graph.svg")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/svg+xml"
    svg = response.get_data(as_text=True)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    output = "f = 0.7311" if columns is NEURON else "4 = -12"
    assert f"<title>gradiag graph: output {output}</title>" in svg


def test_svg_of_a_bad_table_is_the_same_422(client: FlaskClient) -> None:
    columns = table(inputs=[[-1, -1, -1, 0, 3], [-1, -1, -1, 4, 2]])
    response = post(client, {"columns": columns}, "/v1/graph.svg")
    assert first_error(response)["loc"] == ["columns", "inputs", 1, 3]


# --- 8. gradiag check --------------------------------------------------------------------------


def test_gradiag_check_reads_a_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no pyproject.toml with [tool.gradiag] settings
    healthy = tmp_path / "circuit.columns.json"
    healthy.write_text(json.dumps({"columns": table(id=CIRCUIT_IDS), "output": "f"}))
    broken = tmp_path / "broken.columns.json"  # log(w * x) with w * x = -3: NaN
    broken.write_text(
        json.dumps(
            {
                "columns": {
                    "op": ["param", "input", "mul", "log"],
                    "inputs": [[-1, -1, 0, 2], [-1, -1, 1, -1]],
                    "value": [-1.5, 2, None, None],
                }
            }
        )
    )
    assert main(["check", str(healthy)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK    {healthy}  graph: output 'f' = -12, 5 nodes, 0 parameters")
    assert main(["check", str(broken)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAIL  {broken}  graph: output '3' = NaN, 4 nodes, 1 parameters")
    assert "fail  nonfinite at 3" in out


def test_gradiag_check_reports_a_bad_table_as_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.columns.json"
    bad.write_text(json.dumps({"columns": {"op": ["param", "relu"], "inputs": [[-1, 1]],
                                           "value": [1, None]}}))  # fmt: skip
    assert main(["check", str(bad)]) == 2
    assert "columns.inputs.0.1" in capsys.readouterr().out


# --- 9. OpenAPI ------------------------------------------------------------------------------


def test_openapi_lists_the_columns_body_and_answer(client: FlaskClient) -> None:
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    branches = {ref["$ref"].rsplit("/", 1)[1] for ref in schemas["GraphBody"]["oneOf"]}
    assert "ColumnsRequest" in branches
    request = schemas["ColumnsRequest"]["properties"]
    assert request["columns"]["$ref"] == "#/components/schemas/GraphColumns"
    assert request["report"]["default"] == "columns"
    assert set(schemas["GraphColumns"]["properties"]) == {"op", "inputs", "value", "id", "attrs"}
    assert schemas["GraphColumns"]["properties"]["inputs"]["maxItems"] == 3
    response = schemas["GraphResponse"]["properties"]
    assert {"$ref": "#/components/schemas/ColumnsReport"} in response["columns"]["anyOf"]
    assert {"id", "shape", "value", "grad"} <= set(schemas["ColumnsReport"]["properties"])
