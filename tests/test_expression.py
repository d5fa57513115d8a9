"""The expression body of POST /v1/graph: grammar, ids, gradients, and hostile input."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from gradiag.engine import compile_graph, run
from gradiag.engine.errors import LimitError
from gradiag.engine.expression import ExpressionError, parse_expression

# The contract's example requests, copied into the repository's examples/.
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIGMOID_GRADS = {"w0": -0.1966, "x0": 0.3932, "w1": -0.3932, "x1": -0.5898, "w2": 0.1966}
SIGMOID_VALUES = {"w0": 2.0, "x0": -1.0, "w1": -3.0, "x1": -2.0, "w2": -3.0}


def post(client: FlaskClient, body: Any) -> tuple[int, Any]:
    answer = client.post("/v1/graph", json=body)
    return answer.status_code, answer.get_json()


def grads(answer: Any, names: Any) -> dict[str, float]:
    return {name: answer["nodes"][name]["grad"] for name in names}


def parse(source: str, **values: Any) -> tuple[list[str], list[str], str]:
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    parsed = parse_expression(source, arrays)
    return [n.id for n in parsed.nodes], [n.op for n in parsed.nodes], parsed.output


# --- the seed examples ----------------------------------------------------------------


def test_cs231n_example1_as_an_expression(client: FlaskClient) -> None:
    status, answer = post(
        client, {"expression": "(x + y) * z", "values": {"x": -2, "y": 5, "z": -4}}
    )
    assert status == 200
    assert answer["output"] == {"id": "(x + y) * z", "value": -12.0, "shape": []}
    assert grads(answer, "xyz") == {"x": -4.0, "y": -4.0, "z": 3.0}
    assert answer["nodes"]["x + y"]["grad"] == -4.0
    assert list(answer["nodes"]) == ["x", "y", "z", "x + y", "(x + y) * z"]


def test_sigmoid_neuron_example_file_as_one_sigmoid_call(client: FlaskClient) -> None:
    body = json.loads((EXAMPLES / "cs231n-sigmoid.expression.json").read_text())
    status, answer = post(client, body)
    assert status == 200
    assert answer["output"]["value"] == pytest.approx(0.7311, abs=1e-4)
    assert grads(answer, SIGMOID_GRADS) == pytest.approx(SIGMOID_GRADS, abs=1e-4)
    assert answer["nodes"]["sigmoid(w0 * x0 + w1 * x1 + w2)"]["op"] == "sigmoid"


def test_sigmoid_neuron_gate_by_gate_gives_the_same_gradients(client: FlaskClient) -> None:
    expression = "1 / (1 + exp(-(w0*x0 + w1*x1 + w2)))"
    status, answer = post(client, {"expression": expression, "values": SIGMOID_VALUES})
    assert status == 200
    assert answer["output"]["value"] == pytest.approx(0.7311, abs=1e-4)
    assert grads(answer, SIGMOID_GRADS) == pytest.approx(SIGMOID_GRADS, abs=1e-4)
    ops = {node["op"] for node in answer["nodes"].values()}
    assert ops == {"input", "const", "mul", "add", "neg", "exp", "div"}
    assert answer["nodes"]["1"] == {"op": "const", "shape": [], "value": 1.0}  # lean


def test_max_gate_routes_the_gradient_to_the_larger_input(client: FlaskClient) -> None:
    values = {"x": 3, "y": -4, "z": 2, "w": -1}
    status, answer = post(client, {"expression": "2 * (x*y + max(z, w))", "values": values})
    assert status == 200
    assert answer["output"]["value"] == -20.0
    assert grads(answer, "xyzw") == {"x": -8.0, "y": 6.0, "z": 2.0, "w": 0.0}


def test_tensor_expression_sum_of_squares_of_a_matmul(client: FlaskClient) -> None:
    W = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]
    x = [1.0, -1.0, 2.0]
    status, answer = post(client, {"expression": "sum(square(W @ x))", "values": {"W": W, "x": x}})
    assert status == 200
    Wa, xa = np.array(W), np.array(x)
    y = Wa @ xa  # [-1, 7]
    assert answer["output"]["value"] == pytest.approx(float(y @ y))
    np.testing.assert_allclose(answer["nodes"]["W"]["grad"], np.outer(2 * y, xa))
    np.testing.assert_allclose(answer["nodes"]["x"]["grad"], Wa.T @ (2 * y))
    assert answer["nodes"]["W @ x"]["shape"] == [2]
    assert "local_grad" not in answer["nodes"]["W @ x"]  # only scalar nodes get one


# --- ids, sharing, leaves ------------------------------------------------------------


def test_identical_subexpressions_share_one_node_and_fan_out_adds_up() -> None:
    ids, _, _ = parse("(a + b) * (a + b)", a=1, b=2)
    assert ids == ["a", "b", "a + b", "(a + b) * (a + b)"]
    program = compile_graph(*_parsed("(a + b) * (a + b)", a=1.0, b=2.0))
    result = run(program)
    by_id = {node: result.grad(i) for i, node in enumerate(program.node_ids())}
    assert by_id["a"] == 6.0 and by_id["a + b"] == 6.0  # 2 (a + b), both paths summed


def _parsed(source: str, **values: float) -> tuple[Any, str]:
    parsed = parse_expression(source, {k: np.asarray(v) for k, v in values.items()})
    return parsed.nodes, parsed.output


def test_numbers_are_const_leaves_named_by_their_literal() -> None:
    ids, ops, _ = parse("2 * x + 1.0 + 1e-5 + 2.", x=1)
    consts = [i for i, o in zip(ids, ops, strict=True) if o == "const"]
    assert consts == ["2", "1.0", "1e-05", "2.0"]
    ids, ops, _ = parse("x * 2.0 + x * 2.", x=1)
    assert ids.count("2.0") == 1 and "x * 2.0 + x * 2.0" in ids  # same literal: one node


def test_unary_plus_makes_no_node_and_unary_minus_is_neg() -> None:
    ids, ops, output = parse("+x", x=1)
    assert (ids, output) == (["x"], "x")
    ids, ops, output = parse("-x", x=1)
    assert (ids, ops, output) == (["x", "-x"], ["input", "neg"], "-x")


def test_long_subexpressions_fall_back_to_t_ids() -> None:
    source = " + ".join(f"x{k}" for k in range(30))
    ids, _, output = parse(source, **{f"x{k}": k for k in range(30)})
    assert output == "t29"  # 29 adds, created in post-order; the last is the 29th
    assert all(len(i) <= 60 for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_text_that_names_a_value_falls_back_to_a_t_id() -> None:
    ids, _, output = parse("x + y", **{"x": 1, "y": 2, "x + y": 3, "t1": 4})
    assert output == "t1_"  # "x + y" and "t1" are both values' ids
    assert ids[:3] == ["x", "y", "x + y"]


def test_values_not_used_are_inputs_with_zero_gradient(client: FlaskClient) -> None:
    status, answer = post(client, {"expression": "x * 3", "values": {"x": 2, "unused": 5}})
    assert status == 200
    assert answer["nodes"]["unused"] == {"op": "input", "shape": [], "value": 5.0, "grad": 0.0}
    assert answer["nodes"]["x"]["grad"] == 3.0


def test_roles_and_local_gradients_of_scalar_gates(client: FlaskClient) -> None:
    body: dict[str, Any] = {"expression": "x * y", "values": {"x": 3, "y": -4}}
    status, answer = post(client, body)
    assert status == 200
    assert set(answer["nodes"]["x * y"]) == {"op", "shape", "value", "grad"}  # lean by default
    status, answer = post(client, {**body, "explain": True})
    node = answer["nodes"]["x * y"]
    assert node["role"].startswith("mul gate")
    assert node["inputs"] == ["x", "y"]
    assert node["local_grad"] == {"x": -4.0, "y": 3.0}
    body = {"expression": "x * x", "values": {"x": 3}, "explain": True}
    status, answer = post(client, body)
    assert answer["nodes"]["x * x"]["local_grad"] == {"x": 6.0}  # both slots summed


def test_output_grad_scales_the_gradients(client: FlaskClient) -> None:
    body = {"expression": "x * y", "values": {"x": 3, "y": -4}, "output_grad": 2}
    status, answer = post(client, body)
    assert status == 200
    assert grads(answer, "xy") == {"x": -8.0, "y": 6.0}


def test_explain_ranks_leaves_by_gradient_magnitude(client: FlaskClient) -> None:
    values = {"x": 3, "y": -4, "z": 2, "w": -1}
    body = {"expression": "2 * (x*y + max(z, w))", "values": values, "explain": True}
    _, answer = post(client, body)
    leaves = answer["explanation"]["leaves"]
    assert [leaf["id"] for leaf in leaves] == ["x", "y", "z", "w"]
    assert [leaf["grad"] for leaf in leaves] == [-8.0, 6.0, 2.0, 0.0]
    assert leaves[0]["sentence"] == (
        "x: -8.0 — increasing x by a small h changes the output by about -8.0h"
    )
    assert "does not change" in leaves[3]["sentence"]


def test_explain_on_tensor_leaves_uses_the_norm_and_the_largest_element(
    client: FlaskClient,
) -> None:
    body = {
        "expression": "sum(W @ x)",
        "values": {"W": [[1.0, 2.0], [3.0, 4.0]], "x": [10.0, -1.0]},
        "explain": True,
    }
    _, answer = post(client, body)
    leaves = answer["explanation"]["leaves"]
    assert [leaf["id"] for leaf in leaves] == ["W", "x"]  # |dW| = ||[[10,-1],[10,-1]]||
    assert leaves[0]["magnitude"] == pytest.approx(np.sqrt(202))
    assert leaves[1]["element"] == [1] and leaves[1]["grad"] == 6.0
    assert "x[1] = 6.0" in leaves[1]["sentence"]


def test_shape_errors_name_the_subexpression(client: FlaskClient) -> None:
    body = {"expression": "W @ x", "values": {"W": [[1.0, 2.0]], "x": [1.0, 2.0, 3.0]}}
    status, answer = post(client, body)
    assert status == 422
    assert "'W @ x'" in answer["detail"] and answer["errors"][0]["loc"] == ["expression"]


# --- refusals: precise messages -------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "quoted", "column"),
    [
        ("x + y.z", "'y.z'", 5),
        ("x + q", "'q'", 5),
        ("exp(x) + foo(x)", "'foo'", 10),
        ("max(x)", "max takes 2", 1),
        ("x < 1", "'x < 1'", 1),
        ("1 + True", "'True'", 5),
        ("x ^ x", "^", 1),
        ("exp(x, *x)", "'*x'", 8),
    ],
)
def test_refusals_quote_the_part_and_its_column(source: str, quoted: str, column: int) -> None:
    with pytest.raises(ExpressionError) as err:
        parse_expression(source, {"x": np.ones(())})
    assert quoted in err.value.message
    assert f"column {column}" in err.value.message
    assert err.value.column == column and err.value.loc == ("expression",)


def test_an_op_name_without_a_call_says_how_to_call_it() -> None:
    with pytest.raises(ExpressionError, match=r"unknown name 'exp' at column 1.*exp\(\.\.\.\)"):
        parse_expression("exp + 1", {})


def test_nesting_is_refused_before_parsing() -> None:
    with pytest.raises(LimitError) as err:
        parse_expression("(" * 150 + "x" + ")" * 150, {"x": np.ones(())})
    assert err.value.limit == "max_expression_nesting"
    with pytest.raises(LimitError):
        parse_expression("-" * 150 + "x", {"x": np.ones(())})


# --- the hostile corpus, over HTTP ----------------------------------------------------

HOSTILE = {
    "import": "__import__('os').system('x')",
    "attribute": "x.__class__",
    "subscript": "x[0]",
    "lambda": "lambda: 1",
    "comprehension": "[i for i in x]",
    "keyword": "exp(a=1)",
    "string": '"str"',
    "bytes": "b'x'",
    "boolean": "True",
    "none": "None",
    "ifexp": "x if y else z",
    "compare": "x < y",
    "bitand": "x & y",
    "floordiv": "x // y",
    "not": "not x",
    "walrus": "(a := 1)",
    "fstring": "f'{x}'",
    "nested_parens": "(" * 10_000 + "x" + ")" * 10_000,
    "nested_parens_under_length_limit": "(" * 4_000 + "x" + ")" * 4_000,
    "unary_100k": "-" * 100_000 + "x",
    "unary_under_length_limit": "-" * 9_000 + "x",
    "long_sum_chain": "+".join(["x"] * 4_000),
    "one_megabyte": "x+" * 500_000 + "x",
    "unknown_name": "x + nope",
    "unknown_function": "system(x)",
    "wrong_arity": "exp(x, y)",
    "syntax_error": "x +* y",
    "unclosed": "exp(x",
    "empty": "",
    "blank": "   ",
    "call_of_call": "f(x)(y)",
    "starred": "exp(*x)",
    "dunder_name": "__builtins__",
    "huge_int": "1" * 5_000,
    "huge_hex_int": "x * 0x" + "f" * 4_000,
    "complex": "1j * x",
    "non_ascii": "x + ÿ",
    "statement": "x = 1",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_expressions_are_refused_quickly(client: FlaskClient, name: str) -> None:
    body = {"expression": HOSTILE[name], "values": {"x": 1.0, "y": 2.0, "z": 3.0}}
    started = time.perf_counter()
    answer = client.post("/v1/graph", json=body)
    elapsed = time.perf_counter() - started
    assert answer.status_code == 422, answer.get_json()
    assert answer.mimetype == "application/problem+json"
    problem = answer.get_json()
    assert problem["errors"][0]["loc"] == ["expression"]
    assert elapsed < 0.5
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("name", "column"),
    [("attribute", 1), ("keyword", 5), ("unknown_name", 5), ("starred", 5), ("compare", 1)],
)
def test_hostile_refusals_carry_a_column(client: FlaskClient, name: str, column: int) -> None:
    body = {"expression": HOSTILE[name], "values": {"x": 1.0, "y": 2.0}}
    problem = client.post("/v1/graph", json=body).get_json()
    assert f"column {column}" in problem["detail"]


def test_length_limit_is_a_setting_and_names_it(client: FlaskClient) -> None:
    problem = client.post("/v1/graph", json={"expression": HOSTILE["one_megabyte"]}).get_json()
    assert problem["limit"] == "max_expression_chars" and problem["limit_value"] == 10_000


def test_constant_power_tower_is_infinity_reported_as_data(client: FlaskClient) -> None:
    started = time.perf_counter()
    status, answer = post(client, {"expression": "9**9**9**9", "gradcheck": True})
    assert time.perf_counter() - started < 0.5
    assert status == 200  # built as pow nodes over const leaves, computed in float64
    assert answer["output"]["value"] == "Infinity"
    assert answer["health"]["status"] == "fail"
    assert answer["nodes"]["9 ** 9"]["value"] == 9.0**9
    assert answer["nodes"]["9 ** 9 ** 9"]["value"] == "Infinity"
    assert "9 ** 9 ** 9" in answer["diagnostics"]["nonfinite_nodes"]
    assert answer["gradcheck"]["per_node"] == {}  # no differentiable leaf


def test_expression_body_refuses_unknown_fields_and_non_numbers(client: FlaskClient) -> None:
    status, problem = post(client, {"expression": "x", "values": {"x": "1e3"}})
    assert status == 422 and problem["errors"][0]["loc"][:2] == ["values", "x"]
    status, problem = post(client, {"expression": "x", "values": {"x": 1}, "nodes": []})
    assert status == 422 and problem["errors"][0]["loc"] == ["nodes"]
    status, problem = post(client, {"expression": 3})
    assert status == 422 and problem["errors"][0]["loc"] == ["expression"]


def test_graph_body_still_works_and_gets_roles(client: FlaskClient) -> None:
    body = json.loads((EXAMPLES / "cs231n.graph.json").read_text())
    status, answer = post(client, {**body, "explain": True})
    assert status == 200 and answer["output"]["value"] == -12.0
    assert answer["nodes"]["q"]["role"].startswith("add gate")
    assert answer["nodes"]["f"]["local_grad"] == {"q": -4.0, "z": 3.0}
    status, problem = post(client, {"nodes": [], "output": "f"})
    assert status == 422 and problem["errors"][0]["loc"] == ["nodes"]


def test_openapi_request_body_is_one_of_the_bodies(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    schema = document["paths"]["/v1/graph"]["post"]["requestBody"]["content"]
    assert schema["application/json"]["schema"]["$ref"] == "#/components/schemas/GraphBody"
    branches = document["components"]["schemas"]["GraphBody"]["oneOf"]
    assert {b["$ref"].rsplit("/", 1)[1] for b in branches} == {
        "GraphRequest",
        "ExpressionRequest",
        "ColumnsRequest",
    }
