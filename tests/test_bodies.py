"""One compiler: a nodes body and a columns body of the same graph are the same program.

Random scalar DAGs (every batched op, leaky_relu with and without alpha, consts, x op x,
fan-out, non-finite leaves and ops that make non-finite values) posted as nodes and as a
table answer with the same numbers, findings, gradcheck and explanation, byte for byte; a
body out of topological order is sorted; errors and limits are 422s at the node at fault.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import orjson
import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gradiag.engine import NodeSpec, compile_graph
from gradiag.engine.ops import LEAF_OPS, OPS
from gradiag.service import create_app
from gradiag.service.config import Settings

# pow aside: (-inf) ** 0.5 and the like are data the reference walk reads otherwise
ELEMENTWISE = sorted(name for name, op in OPS.items() if op.batches and name != "pow")
UNARY = [name for name in ELEMENTWISE if OPS[name].arity == 1]
BINARY = [name for name in ELEMENTWISE if OPS[name].arity == 2]
# leaf values: kinks and ties (0, equal operands), ints, and the wire's non-finite strings
LEAF_VALUES: list[Any] = [0.0, 0.0, 1.0, -1.0, 0.5, -2.5, 3, "NaN", "Infinity", "-Infinity"]
ALPHAS = [None, 0.01, 0.2]  # none (the default), the default given, another slope

Wire = dict[str, Any]


# --- helpers -----------------------------------------------------------------------------


def random_nodes(seed: int, n: int, *, leaves: int = 24) -> list[Wire]:
    """A random scalar DAG as wire nodes in topological order: every elementwise op,
    leaky_relu with and without alpha, consts, x op x, fan-out to recent nodes and to any
    earlier one, non-finite leaves and ops that make non-finite values (log, div, ...)."""
    rng = random.Random(seed)
    nodes: list[Wire] = []
    for k in range(leaves):
        op = "const" if k % 7 == 3 else ("param" if k % 2 else "input")
        value = rng.choice([*LEAF_VALUES, rng.uniform(-2, 2)])
        nodes.append({"id": f"l{k}", "op": op, "value": value})
    for k in range(leaves, n):

        def pick(k: int = k) -> str:
            recent = rng.random() < 0.7
            j = k - 1 - min(int(rng.expovariate(0.2)), k - 1) if recent else rng.randrange(k)
            return str(nodes[j]["id"])

        if rng.random() < 0.5:
            nodes.append(unary_node(f"n{k}", rng.choice(UNARY), pick(), rng.choice(ALPHAS)))
        else:
            a = pick()
            b = a if rng.random() < 0.1 else pick()  # x op x: one node in both positions
            nodes.append({"id": f"n{k}", "op": rng.choice(BINARY), "inputs": [a, b]})
    return nodes


def unary_node(node_id: str, op: str, operand: str, alpha: float | None) -> Wire:
    node: Wire = {"id": node_id, "op": op, "inputs": [operand]}
    if op == "leaky_relu" and alpha is not None:
        node["attrs"] = {"alpha": alpha}
    return node


def post(client: FlaskClient, body: Wire) -> tuple[int, bytes]:
    response = client.post("/v1/graph", data=orjson.dumps(body), content_type="application/json")
    return response.status_code, response.get_data()


def as_columns(body: Wire) -> Wire:
    """The same graph as a columns body answering with `nodes` (ids given)."""
    nodes = body["nodes"]
    row = {node["id"]: k for k, node in enumerate(nodes)}
    inputs = [[-1] * len(nodes), [-1] * len(nodes)]
    for k, node in enumerate(nodes):
        for position, ref in enumerate(node.get("inputs", [])):
            inputs[position][k] = row[ref]
    columns = {
        "op": [node["op"] for node in nodes],
        "inputs": inputs,
        "value": [node.get("value") for node in nodes],
        "id": [node["id"] for node in nodes],
    }
    if any("attrs" in node for node in nodes):
        columns["attrs"] = [node.get("attrs") for node in nodes]
    rest = {key: value for key, value in body.items() if key != "nodes"}
    return {"columns": columns, "report": "nodes", **rest}


def assert_same_answer(client: FlaskClient, body: Wire) -> bytes:
    """The nodes body and its table give the same bytes."""
    as_nodes = post(client, body)
    as_table = post(client, as_columns(body))
    assert as_nodes[0] == as_table[0] == 200, as_nodes
    assert as_nodes[1] == as_table[1]
    return as_nodes[1]


CLIENT = create_app(Settings(), TESTING=True).test_client()  # for hypothesis (no fixtures)


# --- (a) random DAGs: the nodes body's answer is the table's, byte for byte --------------


@pytest.mark.parametrize(("seed", "n"), [(0, 30), (1, 700), (2, 1200), (3, 2000), (4, 512)])
def test_random_dags_answer_alike(client: FlaskClient, seed: int, n: int) -> None:
    nodes = random_nodes(seed, n)
    body = {"nodes": nodes, "output": nodes[-1]["id"]}
    answer = orjson.loads(assert_same_answer(client, body))
    assert list(answer["nodes"]) == [node["id"] for node in nodes]  # the request's order


@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_explain_and_options_answer_alike(client: FlaskClient, seed: int) -> None:
    nodes = random_nodes(10 + seed, 300 + 100 * seed)
    output = nodes[len(nodes) // 2 + seed]["id"]  # some nodes do not reach the output
    body = {
        "nodes": nodes,
        "output": output,
        "gradcheck": {"max_evaluations": 200, "seed": seed} if seed else True,
        "explain": True,
        "output_grad": [None, 2.0, "-Infinity"][seed],
        "thresholds": {"dead_warn": 0.05, "saturated_warn": 0.05},
    }
    answer = orjson.loads(assert_same_answer(client, body))
    assert "gradcheck" in answer and answer["explanation"]["leaves"]
    assert all("role" in node for node in answer["nodes"].values())


def test_the_columns_report_of_a_nodes_body_is_the_tables(client: FlaskClient) -> None:
    nodes = random_nodes(20, 400)
    body = {"nodes": nodes, "output": "n300", "report": "columns"}
    table = {**as_columns(body), "report": "columns"}
    assert post(client, body) == post(client, table)


# --- (b) hypothesis graphs ------------------------------------------------------------------


@st.composite
def scalar_graphs(draw: st.DrawFn) -> Wire:
    leaves = draw(st.integers(1, 8))
    n = draw(st.integers(256, 400))
    ops = draw(st.lists(st.sampled_from(ELEMENTWISE), min_size=n - leaves, max_size=n - leaves))
    nodes: list[Wire] = [
        {
            "id": f"x{k}",
            "op": draw(st.sampled_from(sorted(LEAF_OPS))),
            "value": draw(st.sampled_from(LEAF_VALUES)),
        }
        for k in range(leaves)
    ]
    for k, op in enumerate(ops, start=leaves):
        operands = [f"x{draw(st.integers(0, k - 1))}" for _ in range(OPS[op].arity)]
        if OPS[op].arity == 1:
            nodes.append(unary_node(f"x{k}", op, operands[0], draw(st.sampled_from(ALPHAS))))
        else:
            nodes.append({"id": f"x{k}", "op": op, "inputs": operands})
    return {"nodes": nodes, "output": f"x{draw(st.integers(0, n - 1))}"}


@hypothesis_settings(max_examples=25, deadline=None)
@given(body=scalar_graphs())
def test_hypothesis_graphs_answer_alike(body: Wire) -> None:
    assert_same_answer(CLIENT, body)


# --- (c) order, tensors and pow -----------------------------------------------------------


def test_a_request_out_of_topological_order_is_sorted(client: FlaskClient) -> None:
    nodes = random_nodes(40, 500)
    output = nodes[-1]["id"]
    shuffled = nodes[:]
    random.Random(0).shuffle(shuffled)
    _, in_order = post(client, {"nodes": nodes, "output": output, "explain": True})
    status, answer = post(client, {"nodes": shuffled, "output": output, "explain": True})
    assert status == 200
    expected, got = orjson.loads(in_order)["nodes"], orjson.loads(answer)["nodes"]
    assert got.keys() == expected.keys()
    for node_id, node in got.items():
        want = expected[node_id]
        assert node["value"] == want["value"], node_id
        assert node.get("inputs") == want.get("inputs"), node_id
        # Kahn's order is another fan-in summation order: equal up to rounding
        grads = [[node.get("grad", 0.0)], [want.get("grad", 0.0)]]
        got_grad, want_grad = (np.array(g, dtype=np.float64) for g in grads)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-12, atol=1e-12, err_msg=node_id)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"op": "param", "value": [1.0, 2.0]}, id="a tensor leaf"),
        pytest.param({"op": "pow", "inputs": ["l0", "l1"]}, id="pow"),
    ],
)
def test_tensor_leaves_and_pow_among_scalars(client: FlaskClient, change: Wire) -> None:
    """A tensor leaf makes its users tensors (single nodes beside the batched scalars)."""
    nodes = random_nodes(50, 400)
    nodes[30] = {"id": nodes[30]["id"], **change}
    status, raw = post(client, {"nodes": nodes, "output": nodes[-1]["id"]})
    assert status == 200, raw
    answer = orjson.loads(raw)
    assert answer["nodes"][nodes[30]["id"]]["op"] == change["op"]


# --- (d) errors: the per-node route's problem JSON, never a 500 -------------------------


def broken(kind: str) -> Wire:
    nodes = random_nodes(70, 400)
    output = nodes[-1]["id"]
    if kind == "unknown input":
        nodes[200]["inputs"][0] = "nowhere"
    elif kind == "duplicate id":
        nodes[250]["id"] = nodes[100]["id"]
    elif kind == "cycle":
        nodes[100] = {"id": nodes[100]["id"], "op": "neg", "inputs": [nodes[300]["id"]]}
        nodes[300] = {"id": nodes[300]["id"], "op": "exp", "inputs": [nodes[100]["id"]]}
    elif kind == "self reference":
        nodes[150] = {"id": "me", "op": "relu", "inputs": ["me"]}
    elif kind == "unknown output":
        output = "nowhere"
    return {"nodes": nodes, "output": output}


@pytest.mark.parametrize(
    ("kind", "loc"),
    [
        ("unknown input", ["nodes", 200, "inputs", 0]),
        ("duplicate id", ["nodes", 250, "id"]),
        ("cycle", ["nodes", 300]),  # the cycle n300 -> n100 -> n300, named from n300
        ("self reference", ["nodes", 150]),
        ("unknown output", ["output"]),
    ],
)
def test_errors_name_the_node_at_fault(client: FlaskClient, kind: str, loc: list[Any]) -> None:
    status, raw = post(client, broken(kind))
    assert status == 422, raw
    assert orjson.loads(raw)["errors"][0]["loc"] == loc


@pytest.mark.parametrize(
    ("limit", "settings"),
    [
        ("max_nodes", Settings(max_nodes=300)),
        ("max_flops", Settings(max_flops=100)),
        ("max_total_elements", Settings(max_total_elements=350)),
    ],
)
def test_limits_are_named(client: FlaskClient, limit: str) -> None:
    """`settings` overrides conftest's fixture, so `client` has the low limit."""
    nodes = random_nodes(80, 400)
    status, raw = post(client, {"nodes": nodes, "output": nodes[-1]["id"]})
    assert status == 422 and orjson.loads(raw)["limit"] == limit


# --- (e) numbering, and a hand-derived answer -----------------------------------------------


def leaf(node_id: str, value: float) -> NodeSpec:
    return NodeSpec(node_id, "input", value=np.asarray(value))


def test_a_topological_request_keeps_its_order() -> None:
    nodes = [
        leaf("x", -2.0),
        leaf("y", 5.0),
        NodeSpec("q", "add", ("x", "y")),
        leaf("z", -4.0),
        NodeSpec("f", "mul", ("q", "z")),
    ]
    assert compile_graph(nodes, "f").ids == ["x", "y", "q", "z", "f"]
    # not topological: Kahn's order, ties in request order (the leaves first here)
    assert compile_graph(nodes[::-1], "f").ids == ["z", "y", "x", "q", "f"]


def test_the_cs231n_circuit_among_unrelated_params(client: FlaskClient) -> None:
    """f = (x + y) * z at x=-2, y=5, z=-4 after 300 params: q = 3, f = -12; df/dx = df/dy =
    z = -4, df/dz = q = 3; the params do not reach f (gradient 0)."""
    padding = [{"id": f"p{k}", "op": "param", "value": 0.5} for k in range(300)]
    circuit = [
        {"id": "x", "op": "input", "value": -2},
        {"id": "y", "op": "input", "value": 5},
        {"id": "q", "op": "add", "inputs": ["x", "y"]},
        {"id": "z", "op": "input", "value": -4},
        {"id": "f", "op": "mul", "inputs": ["q", "z"]},
    ]
    status, raw = post(client, {"nodes": [*padding, *circuit], "output": "f", "explain": True})
    assert status == 200
    answer = orjson.loads(raw)
    nodes = answer["nodes"]
    assert answer["output"] == {"id": "f", "value": -12.0, "shape": []}
    assert [nodes[k]["grad"] for k in ("x", "y", "z", "q", "f")] == [-4.0, -4.0, 3.0, -4.0, 1.0]
    assert nodes["q"]["value"] == 3.0 and nodes["p7"]["grad"] == 0.0
    assert nodes["f"]["inputs"] == ["q", "z"] and nodes["f"]["local_grad"] == {"q": -4.0, "z": 3.0}
    assert list(nodes)[-5:] == ["x", "y", "q", "z", "f"]  # the request's order
