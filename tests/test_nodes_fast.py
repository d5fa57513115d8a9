"""The table route for big scalar nodes bodies (service.frontend.scalar_nodes_program).

A nodes body of >= 256 one-number leaves and elementwise ops, in topological order, is
compiled as a table by engine.columns instead of node by node. Its answers must be the
per-node route's byte for byte (values, gradients, local_grad, findings, health, ids,
gradcheck, explanation), its errors the same problem JSON, and a body it does not fit (not
topological, a tensor leaf, a non-elementwise op) must take the per-node route. And
compile_graph keeps the request's order when it is topological, so both routes number the
nodes alike."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gradiag.engine.columns import compile_columns
from gradiag.engine.graph import NodeSpec, batch_plan, compile_graph
from gradiag.engine.ops import LEAF_OPS, OPS
from gradiag.schemas.graph import GraphRequest
from gradiag.service import create_app, frontend
from gradiag.service.config import Settings

ELEMENTWISE = sorted(name for name, op in OPS.items() if op.elementwise)
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


@contextmanager
def table_route() -> Iterator[list[bool]]:
    """Record, per nodes body posted inside the block, whether the table route took it."""
    taken: list[bool] = []
    real = frontend.scalar_nodes_program

    def spy(*args: Any, **kwargs: Any) -> Any:
        program = real(*args, **kwargs)
        taken.append(program is not None)
        return program

    with pytest.MonkeyPatch.context() as m:
        m.setattr(frontend, "scalar_nodes_program", spy)
        yield taken


def both_routes(client: FlaskClient, body: Wire) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """The answer through the table route (when the body fits it) and through the per-node
    route (the table route switched off)."""
    fast = post(client, body)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(frontend, "scalar_nodes_program", lambda *args, **kwargs: None)
        slow = post(client, body)
    return fast, slow


def assert_same_answer(client: FlaskClient, body: Wire, *, table: bool = True) -> bytes:
    """Both routes give the same bytes; `table`: the table route took the body."""
    with table_route() as taken:
        fast, slow = both_routes(client, body)
    assert taken == [table]
    assert fast[0] == slow[0] and fast[0] != 500, fast
    assert fast[1] == slow[1]
    return fast[1]


CLIENT = create_app(Settings(), TESTING=True).test_client()  # for hypothesis (no fixtures)


# --- (a) random DAGs: the table route's answer is the per-node route's, byte for byte ---


@pytest.mark.parametrize(("seed", "n"), [(0, 300), (1, 700), (2, 1200), (3, 2000), (4, 512)])
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


def test_columns_report_of_a_nodes_body_answers_alike(client: FlaskClient) -> None:
    nodes = random_nodes(20, 400)
    assert_same_answer(client, {"nodes": nodes, "output": "n300", "report": "columns"})


def test_the_programs_are_the_same() -> None:
    """Engine level: the table's program is compile_graph's, field by field."""
    request = GraphRequest.model_validate({"nodes": random_nodes(30, 600), "output": "n500"})
    limits = frontend.engine_limits(Settings())
    table = frontend.scalar_nodes_program(request, limits)
    assert table is not None
    nodes = compile_graph(frontend.graph_nodes(request), request.output, limits=limits)
    assert list(table.ids) == nodes.ids and list(table.ops) == nodes.ops
    assert list(table.operands) == nodes.operands
    assert [dict(a) for a in table.attrs] == nodes.attrs
    assert list(table.shapes) == nodes.shapes and list(table.locs) == nodes.locs
    assert (table.output, table.flops, table.dtype) == (nodes.output, nodes.flops, nodes.dtype)
    assert list(table.leaf_values) == list(nodes.leaf_values)
    for i in nodes.leaf_values:
        np.testing.assert_array_equal(table.leaf_values[i], nodes.leaf_values[i])
    assert batch_plan(table) is not None and batch_plan(nodes) is not None


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


# --- (c) bodies the table route does not take -----------------------------------------------


def test_a_request_out_of_topological_order_is_sorted_node_by_node(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = random_nodes(40, 500)
    output = nodes[-1]["id"]
    shuffled = nodes[:]
    random.Random(0).shuffle(shuffled)
    table_calls: list[int] = []
    real = compile_columns

    def counted(*args: Any, **kwargs: Any) -> Any:
        table_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(frontend, "compile_columns", counted)
    _, in_order = post(client, {"nodes": nodes, "output": output})
    assert table_calls == [1]
    status, answer = post(client, {"nodes": shuffled, "output": output})
    assert status == 200 and table_calls == [1]  # the shuffled body never reached the table
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
        pytest.param({"op": "pow", "inputs": ["l0", "l1"]}, id="pow is not elementwise"),
    ],
)
def test_bodies_the_table_does_not_fit_answer_node_by_node(
    client: FlaskClient, change: Wire
) -> None:
    nodes = random_nodes(50, 400)
    nodes[30] = {"id": nodes[30]["id"], **change}
    assert_same_answer(client, {"nodes": nodes, "output": nodes[-1]["id"]}, table=False)


def test_a_small_body_is_compiled_node_by_node(client: FlaskClient) -> None:
    nodes = random_nodes(60, 255)
    assert_same_answer(client, {"nodes": nodes, "output": nodes[-1]["id"]}, table=False)


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
    "kind", ["unknown input", "duplicate id", "cycle", "self reference", "unknown output"]
)
def test_errors_are_the_per_node_routes(client: FlaskClient, kind: str) -> None:
    body = broken(kind)
    fast, slow = both_routes(client, body)
    assert fast == slow
    assert fast[0] == 422, fast
    assert orjson.loads(fast[1])["errors"][0]["loc"][0] in ("nodes", "output")


@pytest.mark.parametrize(
    ("limit", "settings"),
    [
        ("max_nodes", Settings(max_nodes=300)),
        ("max_flops", Settings(max_flops=100)),
        ("max_total_elements", Settings(max_total_elements=350)),
    ],
)
def test_limits_are_the_per_node_routes(client: FlaskClient, limit: str) -> None:
    """`settings` overrides conftest's fixture, so `client` has the low limit."""
    nodes = random_nodes(80, 400)
    fast, slow = both_routes(client, {"nodes": nodes, "output": nodes[-1]["id"]})
    assert fast == slow
    assert fast[0] in (413, 422) and orjson.loads(fast[1])["limit"] == limit


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
    with table_route() as taken:
        status, raw = post(client, {"nodes": [*padding, *circuit], "output": "f"})
    assert taken == [True] and status == 200
    answer = orjson.loads(raw)
    nodes = answer["nodes"]
    assert answer["output"] == {"id": "f", "value": -12.0, "shape": []}
    assert [nodes[k]["grad"] for k in ("x", "y", "z", "q", "f")] == [-4.0, -4.0, 3.0, -4.0, 1.0]
    assert nodes["q"]["value"] == 3.0 and nodes["p7"]["grad"] == 0.0
    assert nodes["f"]["inputs"] == ["q", "z"] and nodes["f"]["local_grad"] == {"q": -4.0, "z": 3.0}
    assert list(nodes)[-5:] == ["x", "y", "q", "z", "f"]  # the request's order
