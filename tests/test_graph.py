"""The compiled graph, straight through the engine: order, forward, backward, errors, limits."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from gradiag.engine import (
    GraphError,
    LimitError,
    Limits,
    NodeSpec,
    Result,
    ShapeError,
    Thresholds,
    ValueDomainError,
    compile_graph,
    graph_diagnostics,
    run,
)
from gradiag.engine.ops import unbroadcast


def leaf(node_id: str, value: Any, op: str = "input") -> NodeSpec:
    return NodeSpec(node_id, op, value=np.asarray(value, dtype=np.float64))


def gate(node_id: str, op: str, *inputs: str, **attrs: Any) -> NodeSpec:
    return NodeSpec(node_id, op, tuple(inputs), attrs)


def evaluate(nodes: list[NodeSpec], output: str, **kwargs: Any) -> Result:
    return run(compile_graph(nodes, output), **kwargs)


def by_id(result: Result) -> tuple[dict[str, Any], dict[str, Any]]:
    ids = result.program.node_ids()
    values = {node: result.value(i) for i, node in enumerate(ids)}
    return values, {node: result.grad(i) for i, node in enumerate(ids)}


# --- backprop by hand: the CS231n circuits ----------------------------------------------


def test_cs231n_add_then_multiply_circuit() -> None:
    result = evaluate(
        [
            leaf("x", -2.0),
            leaf("y", 5.0),
            leaf("z", -4.0),
            gate("q", "add", "x", "y"),
            gate("f", "mul", "q", "z"),
        ],
        "f",
    )
    values, grads = by_id(result)
    assert values["f"] == -12.0
    assert {k: float(g) for k, g in grads.items()} == {
        "x": -4.0,
        "y": -4.0,
        "z": 3.0,
        "q": -4.0,
        "f": 1.0,
    }


def test_fan_out_accumulates_both_paths() -> None:
    # b = a + a; c = b * b: dc/db = 2b = 12 reaches b twice through mul, and each of the
    # two add paths hands it to a: dc/da = 2 * 2b = 4b = 24 at a = 3.
    result = evaluate([leaf("a", 3.0), gate("b", "add", "a", "a"), gate("c", "mul", "b", "b")], "c")
    values, grads = by_id(result)
    assert values["b"] == 6.0
    assert values["c"] == 36.0
    assert grads["b"] == 12.0
    assert grads["a"] == 24.0 == 4 * values["b"]


def test_node_used_by_two_gates_sums_their_gradients() -> None:
    # f = a*x + exp(x): df/dx = a + exp(x)
    result = evaluate(
        [
            leaf("x", 0.5),
            leaf("a", 2.0),
            gate("ax", "mul", "a", "x"),
            gate("ex", "exp", "x"),
            gate("f", "add", "ax", "ex"),
        ],
        "f",
    )
    _, grads = by_id(result)
    assert grads["x"] == pytest.approx(2.0 + np.exp(0.5), rel=1e-15)


def test_unconnected_input_gets_zero_gradient_of_its_shape() -> None:
    result = evaluate(
        [leaf("x", 2.0), leaf("lonely", [[1.0, 2.0, 3.0]]), gate("f", "square", "x")], "f"
    )
    _, grads = by_id(result)
    assert grads["x"] == 4.0
    np.testing.assert_array_equal(grads["lonely"], np.zeros((1, 3)))


def test_nodes_downstream_of_the_output_get_zero_gradient() -> None:
    result = evaluate([leaf("x", 2.0), gate("f", "square", "x"), gate("g", "exp", "f")], "f")
    _, grads = by_id(result)
    assert grads["g"] == 0.0
    assert grads["x"] == 4.0


def test_const_nodes_get_no_gradient() -> None:
    result = evaluate([leaf("x", 3.0), leaf("c", 2.0, "const"), gate("f", "mul", "x", "c")], "f")
    _, grads = by_id(result)
    assert grads["c"] is None
    assert grads["x"] == 2.0


def test_const_output_gets_no_gradient_either() -> None:
    result = evaluate([leaf("c", 2.0, "const"), leaf("x", 1.0), gate("y", "neg", "x")], "c")
    _, grads = by_id(result)
    assert grads["c"] is None
    assert grads["x"] == 0.0


def test_output_grad_seeds_the_backward_pass() -> None:
    result = evaluate(
        [leaf("x", [1.0, 2.0]), gate("f", "square", "x")], "f", output_grad=np.array([10.0, -1.0])
    )
    _, grads = by_id(result)
    np.testing.assert_array_equal(grads["x"], [20.0, -4.0])  # 2x * seed


def test_output_grad_of_the_wrong_shape_is_a_shape_error() -> None:
    program = compile_graph([leaf("x", [1.0, 2.0])], "x")
    with pytest.raises(ShapeError) as err:
        run(program, np.array([1.0, 2.0, 3.0]))
    assert err.value.loc == ("output_grad",)


def test_broadcast_gradient_is_summed_back_to_the_operand() -> None:
    result = evaluate(
        [
            leaf("col", [[1.0], [2.0], [3.0]]),
            leaf("row", [1.0, 2.0, 3.0, 4.0]),
            gate("m", "mul", "col", "row"),
            gate("s", "sum", "m"),
        ],
        "s",
    )
    values, grads = by_id(result)
    assert values["m"].shape == (3, 4)
    np.testing.assert_array_equal(grads["col"], [[10.0], [10.0], [10.0]])  # sum of row
    np.testing.assert_array_equal(grads["row"], [6.0, 6.0, 6.0, 6.0])  # sum of col


@pytest.mark.parametrize(
    ("grad_shape", "shape", "expected"),
    [
        ((3, 4), (4,), np.full(4, 3.0)),
        ((3, 4), (3, 1), np.full((3, 1), 4.0)),
        ((2, 3), (), np.array(6.0)),
        ((2, 1, 4), (1, 1), np.array([[8.0]])),
        ((2, 3), (2, 3), np.ones((2, 3))),
    ],
)
def test_unbroadcast_sums_stretched_and_added_axes(
    grad_shape: tuple[int, ...], shape: tuple[int, ...], expected: Any
) -> None:
    out = unbroadcast(np.ones(grad_shape), shape)
    assert out.shape == shape
    np.testing.assert_array_equal(out, expected)


# --- kinks and ties through the whole graph ---------------------------------------------


def test_relu_abs_and_leaky_relu_at_zero_follow_pytorch() -> None:
    result = evaluate(
        [
            leaf("x", [0.0, 0.0, 0.0]),
            gate("r", "relu", "x"),
            gate("a", "abs", "x"),
            gate("l", "leaky_relu", "x", alpha=0.3),
            gate("ra", "add", "r", "a"),
            gate("s", "add", "ra", "l"),
        ],
        "s",
    )
    _, grads = by_id(result)
    np.testing.assert_array_equal(grads["x"], [0.3, 0.3, 0.3])  # relu 0 + abs 0 + alpha


def test_max_tie_splits_gradient_between_operands() -> None:
    result = evaluate([leaf("a", 2.0), leaf("b", 2.0), gate("m", "max", "a", "b")], "m")
    _, grads = by_id(result)
    assert grads["a"] == grads["b"] == 0.5


def test_max_of_a_node_with_itself_gives_the_whole_gradient() -> None:
    result = evaluate([leaf("a", 2.0), gate("m", "min", "a", "a")], "m")
    _, grads = by_id(result)
    assert grads["a"] == 1.0  # two halves accumulate


# --- order, structure errors, cycles ----------------------------------------------------


def test_nodes_are_numbered_in_topological_order_whatever_the_request_order() -> None:
    program = compile_graph(
        [
            gate("f", "mul", "q", "z"),
            gate("q", "add", "x", "y"),
            leaf("z", -4.0),
            leaf("x", -2.0),
            leaf("y", 5.0),
        ],
        "f",
    )
    position = {node_id: i for i, node_id in enumerate(program.ids)}
    assert position["q"] > max(position["x"], position["y"])
    assert position["f"] > max(position["q"], position["z"])
    assert program.ids == ["z", "x", "y", "q", "f"]  # ties keep request order
    assert run(program).values[program.output] == -12.0


def located(nodes: list[NodeSpec]) -> list[NodeSpec]:
    """The specs as the wire front end hands them over: each knows where it sits."""
    return [
        NodeSpec(n.id, n.op, n.inputs, n.attrs, n.value, loc=("nodes", k))
        for k, n in enumerate(nodes)
    ]


def test_cycle_is_refused_and_named() -> None:
    nodes = located(
        [
            leaf("x", 1.0),
            gate("a", "add", "x", "c"),
            gate("b", "exp", "a"),
            gate("c", "neg", "b"),
            gate("out", "neg", "c"),
        ]
    )
    with pytest.raises(GraphError) as err:
        compile_graph(nodes, "out")
    message = err.value.message
    assert "cycle" in message
    for node_id in ("'a'", "'b'", "'c'"):
        assert node_id in message
    assert "'x'" not in message and "'out'" not in message
    assert err.value.node in {"a", "b", "c"}


def test_self_loop_is_a_cycle() -> None:
    with pytest.raises(GraphError) as err:
        compile_graph(located([leaf("x", 1.0), gate("y", "add", "x", "y")]), "y")
    assert err.value.message == "the graph has a cycle: 'y' -> 'y'"
    assert err.value.node == "y"
    assert err.value.loc == ("nodes", 1)


@pytest.mark.parametrize(
    ("nodes", "output", "loc", "node", "words"),
    [
        ([leaf("x", 1.0), leaf("x", 2.0)], "x", ("nodes", 1, "id"), "x", "duplicate id 'x'"),
        ([leaf("x", 1.0), gate("y", "frob", "x")], "y", ("nodes", 1, "op"), "y", "unknown op"),
        (
            [leaf("x", 1.0), gate("y", "add", "x", "k")],
            "y",
            ("nodes", 1, "inputs", 1),
            "y",
            "input 'k'",
        ),
        ([leaf("x", 1.0), gate("y", "add", "x")], "y", ("nodes", 1, "inputs"), "y", "2 input"),
        (
            [leaf("x", 1.0), gate("y", "neg", "x", alpha=1.0)],
            "y",
            ("nodes", 1, "attrs", "alpha"),
            "y",
            "no attribute",
        ),
        ([leaf("x", 1.0)], "nope", ("output",), None, "output 'nope'"),
    ],
)
def test_structure_errors_name_the_node_and_field(
    nodes: list[NodeSpec], output: str, loc: tuple[Any, ...], node: str | None, words: str
) -> None:
    with pytest.raises(GraphError) as err:
        compile_graph(located(nodes), output)
    assert err.value.loc == loc
    assert err.value.node == node
    assert words in err.value.message


@pytest.mark.parametrize(
    ("operands", "op", "attrs", "words"),
    [
        (([1.0, 2.0], [1.0, 2.0, 3.0]), "add", {}, "shapes [2] and [3] do not broadcast"),
        (([[1.0, 2.0]], [[1.0, 2.0]]), "matmul", {}, "inner sizes 2 != 1"),
        ((1.0, [1.0]), "matmul", {}, "not scalars"),
        (([[1.0, 2.0]], [0.0, 1.0]), "softmax_cross_entropy", {}, "one per row"),
        (([[1.0, 2.0]],), "sum", {"axis": 2}, "out of range"),
        (([1.0, 2.0],), "transpose", {"axes": [1]}, "not a permutation"),
    ],
)
def test_shape_errors_are_found_before_running_and_name_the_node(
    operands: tuple[Any, ...], op: str, attrs: dict[str, Any], words: str
) -> None:
    names = [f"in{k}" for k in range(len(operands))]
    nodes = [leaf(n, v) for n, v in zip(names, operands, strict=True)]
    nodes.append(gate("bad", op, *names, **attrs))
    with pytest.raises(ShapeError) as err:
        compile_graph(located(nodes), "bad")
    assert err.value.node == "bad"
    assert err.value.loc == ("nodes", len(operands))
    assert words in err.value.message


@pytest.mark.parametrize("labels", [[2.0], [-1.0], [0.5], [float("nan")]])
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "svm_hinge"])
def test_class_labels_must_be_integers_in_range(labels: list[float], loss: str) -> None:
    nodes = located(
        [leaf("s", [[1.0, 2.0]]), leaf("y", labels, "const"), gate("l", loss, "s", "y")]
    )
    program = compile_graph(nodes, "l")
    with pytest.raises(ValueDomainError) as err:
        run(program)
    assert err.value.node == "l"
    assert "not an integer class in [0, 2)" in err.value.message
    assert "np.float64" not in err.value.message


# --- limits: refused before anything large is allocated ---------------------------------


def test_node_limit() -> None:
    nodes = [leaf("x", 1.0), gate("a", "neg", "x"), gate("b", "neg", "a")]
    with pytest.raises(LimitError) as err:
        compile_graph(nodes, "b", limits=Limits(max_nodes=2))
    assert err.value.limit == "max_nodes"
    assert err.value.value == 2


def test_tensor_and_flop_limits_are_checked_from_shapes_alone() -> None:
    # (2000, 1) * (1, 2000) would be 4e6 elements: refused before the product exists.
    nodes = located([leaf("a", np.ones((2000, 1))), leaf("b", np.ones((1, 2000)))])
    nodes.append(NodeSpec("m", "mul", ("a", "b"), loc=("nodes", 2)))
    with pytest.raises(LimitError) as err:
        compile_graph(nodes, "m", limits=Limits(max_tensor_elements=1_000_000))
    assert (err.value.limit, err.value.node, err.value.loc) == (
        "max_tensor_elements",
        "m",
        ("nodes", 2),
    )

    nodes[2] = NodeSpec("m", "matmul", ("b", "a"), loc=("nodes", 2))  # 1x2000 @ 2000x1
    assert compile_graph(nodes, "m").flops == 2 * 2000
    with pytest.raises(LimitError) as err:
        compile_graph(nodes, "m", limits=Limits(max_flops=1000))
    assert err.value.limit == "max_flops"


# --- numerical stability, non-finite values ---------------------------------------------


def test_sigmoid_and_softmax_stay_finite_at_huge_inputs() -> None:
    result = evaluate(
        [
            leaf("x", [-1000.0, 1000.0]),
            gate("s", "sigmoid", "x"),
            leaf("scores", [[1000.0, -1000.0], [-1000.0, 1000.0]]),
            leaf("labels", [0.0, 0.0], "const"),
            gate("ce", "softmax_cross_entropy", "scores", "labels"),
            gate("ss", "sum", "s"),
            gate("f", "add", "ss", "ce"),
        ],
        "f",
    )
    values, grads = by_id(result)
    np.testing.assert_array_equal(values["s"], [0.0, 1.0])
    assert values["ce"] == pytest.approx(1000.0)
    for g in (grads["x"], grads["scores"]):
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(grads["x"], [0.0, 0.0])
    np.testing.assert_allclose(grads["scores"], [[0.0, 0.0], [-0.5, 0.5]])


def test_log_of_zero_is_reported_as_nonfinite() -> None:
    result = evaluate([leaf("x", 0.0), gate("y", "log", "x")], "y")
    values, grads = by_id(result)
    assert values["y"] == -np.inf
    assert grads["x"] == np.inf
    diagnostics = graph_diagnostics(result, Thresholds())
    assert diagnostics.nonfinite_nodes == ["x", "y"]
    assert diagnostics.status == "fail"
    assert [f.code for f in diagnostics.findings] == ["nonfinite"]


def test_param_used_twice_counts_once() -> None:
    result = evaluate(
        [
            leaf("W", [[1.0, 2.0], [3.0, 4.0]], "param"),
            leaf("b", [1.0, 1.0], "param"),
            leaf("x", [1.0, -1.0]),
            gate("h", "matmul", "W", "x"),
            gate("h2", "matmul", "W", "h"),
            gate("z", "add", "h2", "b"),
            gate("f", "sum", "z"),
        ],
        "f",
    )
    diagnostics = graph_diagnostics(result, Thresholds())
    assert (diagnostics.parameter_tensors, diagnostics.parameter_total) == (2, 6)


# --- depth: nothing recurses ------------------------------------------------------------


def long_chain(length: int) -> list[NodeSpec]:
    """x, c = 1, then alternately +c and neg: every 4 gates bring the value back."""
    nodes = [leaf("x", 0.5), leaf("c", 1.0, "const")]
    previous = "x"
    for k in range(length - 2):
        node_id = f"n{k}"
        nodes.append(
            gate(node_id, "add", previous, "c") if k % 2 == 0 else gate(node_id, "neg", previous)
        )
        previous = node_id
    return nodes


def test_200k_node_chain_runs_without_recursion() -> None:
    started = time.perf_counter()
    nodes = long_chain(200_000)
    result = evaluate(nodes, nodes[-1].id)
    values, grads = by_id(result)
    # 199,998 gates = 49,999 full cycles of 4 and then (+1, neg): -(0.5 + 1) = -1.5
    assert values[nodes[-1].id] == -1.5
    assert grads["x"] == -1.0  # 99,999 negations
    assert grads["c"] is None
    assert time.perf_counter() - started < 60  # a bound against a hang, not a benchmark
