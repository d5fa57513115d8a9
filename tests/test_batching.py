"""Level batching (engine.graph) gives the per-node walk's values and gradients.

Random scalar DAGs with fan-out (operands drawn from all earlier nodes), every elementwise op,
leaky_relu with two alphas (two groups at one level), kinks and ties (relu/abs at 0, max/min
of equal operands), consts, nodes that do not reach the output, and non-finite values."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradiag.engine import graph
from gradiag.engine.diagnostics import Thresholds, graph_diagnostics
from gradiag.engine.explain import local_grads
from gradiag.engine.graph import NodeSpec, batch_plan, compile_graph, run
from gradiag.engine.ops import OPS

UNARY = ["identity", "neg", "exp", "log", "sqrt", "square", "abs", "reciprocal", "relu",
         "sigmoid", "tanh", "leaky_relu"]  # fmt: skip
BINARY = ["add", "sub", "mul", "div", "max", "min"]  # pow is not batched (engine.ops)
SAFE_UNARY = ["identity", "neg", "abs", "relu", "sigmoid", "tanh", "leaky_relu", "square"]
SAFE_BINARY = ["add", "sub", "mul", "max", "min"]


def random_dag(seed: int, n: int, *, safe: bool = True, leaves: int = 20) -> list[NodeSpec]:
    rng = random.Random(seed)
    unary, binary = (SAFE_UNARY, SAFE_BINARY) if safe else (UNARY, BINARY)
    specs: list[NodeSpec] = []
    for k in range(leaves):
        op = "const" if k % 7 == 3 else ("param" if k % 2 else "input")
        value = rng.choice([0.0, 0.0, 1.0, -1.0, 0.5, rng.uniform(-2, 2)])  # kinks and ties
        specs.append(NodeSpec(f"l{k}", op, value=np.asarray(value)))
    for k in range(leaves, n):
        # fan-out: recent nodes are picked often, so many share operands at one level
        def pick(k: int = k) -> str:
            j = (
                k - 1 - min(int(rng.expovariate(0.2)), k - 1)
                if rng.random() < 0.7
                else rng.randrange(k)
            )
            return specs[j].id

        if rng.random() < 0.5:
            op = rng.choice(unary)
            attrs = {"alpha": rng.choice([0.01, 0.2])} if op == "leaky_relu" else {}
            specs.append(NodeSpec(f"n{k}", op, (pick(),), attrs))
        else:
            a = pick()
            b = a if rng.random() < 0.1 else pick()  # x op x: one node in both positions
            specs.append(NodeSpec(f"n{k}", rng.choice(binary), (a, b)))
    return specs


def both_paths(
    specs: list[NodeSpec], output: str, monkeypatch: pytest.MonkeyPatch, dtype: type = np.float64
) -> tuple[graph.Result, graph.Result]:
    batched = compile_graph(specs, output, dtype=dtype)
    assert batch_plan(batched) is not None
    with monkeypatch.context() as m:
        m.setattr(graph, "BATCH_MIN_NODES", 10**9)
        plain = compile_graph(specs, output, dtype=dtype)
        assert batch_plan(plain) is None
    return run(batched), run(plain)


def assert_same(batched: graph.Result, plain: graph.Result, rtol: float = 1e-12) -> None:
    values_b = np.array([float(v) for v in batched.values])
    values_p = np.array([float(v) for v in plain.values])
    assert np.array_equal(values_b, values_p, equal_nan=True)  # forward: same op calls
    for i, (gb, gp) in enumerate(zip(batched.grads, plain.grads, strict=True)):
        if gp is None:
            assert gb is None, i
            continue
        assert gb is not None, i
        # fan-in sums may add in another order: equal up to rounding, and a sum that cancels
        # to near 0 keeps the rounding of its larger terms (hence the small atol)
        np.testing.assert_allclose(float(gb), float(gp), rtol=rtol, atol=1e-12, err_msg=str(i))


@pytest.mark.parametrize("seed", range(12))
def test_random_dags_match_the_plain_walk(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = random_dag(seed, 400 + 50 * seed)
    batched, plain = both_paths(specs, specs[-1].id, monkeypatch)
    assert_same(batched, plain)


@pytest.mark.parametrize("seed", range(6))
def test_unsafe_ops_with_nonfinite_values(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """log(0), 1/0, sqrt(-1): infinities and NaNs propagate the same way on both paths."""
    specs = random_dag(100 + seed, 500, safe=False)
    batched, plain = both_paths(specs, specs[-1].id, monkeypatch)
    assert_same(batched, plain)


@pytest.mark.parametrize("seed", range(4))
def test_output_in_the_middle(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes after the output or beside it get gradient 0, even where 0 * inf would be NaN."""
    specs = random_dag(200 + seed, 600, safe=False)
    batched, plain = both_paths(specs, specs[350].id, monkeypatch)
    assert_same(batched, plain)


def test_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = random_dag(7, 800)
    batched, plain = both_paths(specs, specs[-1].id, monkeypatch, dtype=np.float32)
    assert batched.values[-1].dtype == np.float32
    assert_same(batched, plain, rtol=1e-5)


def test_gradient_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = random_dag(8, 300)
    batched = compile_graph(specs, specs[-1].id)
    with monkeypatch.context() as m:
        m.setattr(graph, "BATCH_MIN_NODES", 10**9)
        plain = compile_graph(specs, specs[-1].id)
    assert_same(run(batched, np.asarray(-2.5)), run(plain, np.asarray(-2.5)))


def test_tensor_graphs_take_the_plain_walk() -> None:
    specs = [NodeSpec("x", "input", value=np.ones(3))]
    specs += [NodeSpec(f"n{k}", "tanh", (specs[-1].id,)) for k in range(300)]
    assert batch_plan(compile_graph(specs, specs[-1].id)) is None


def test_a_graph_with_pow_takes_the_plain_walk() -> None:
    specs = random_dag(3, 400)
    specs.append(NodeSpec("p", "pow", (specs[-1].id, specs[-2].id)))
    assert batch_plan(compile_graph(specs, "p")) is None


def test_a_long_chain_is_one_group_per_level(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [NodeSpec("x", "input", value=np.asarray(0.3))]
    for k in range(1000):
        specs.append(NodeSpec(f"n{k}", "sigmoid", (specs[-1].id,)))
    batched, plain = both_paths(specs, specs[-1].id, monkeypatch)
    plan = batch_plan(batched.program)
    assert plan is not None and len(plan.levels) == 1000
    assert_same(batched, plain)


def plain_levels(codes: list[int], first: list[int], second: list[int]) -> list[int]:
    """1 + the deepest operand's level, leaves 0: the definition, row by row."""
    level: list[int] = []
    for code, a, b in zip(codes, first, second, strict=True):
        level.append(0 if code < 0 else 1 + max(level[a], level[b] if b >= 0 else 0))
    return level


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), deep=st.booleans())
def test_the_plan_orders_rows_by_level_then_op_then_row(seed: int, deep: bool) -> None:
    """plan_columns against the definition: op rows sorted by (level, op code), rows of one
    key in row order (`np.lexsort`), on random DAGs of add and mul. `deep` grows a 23,000-row
    chain, so (level, code) keys pass 16 bits (the plan's radix sort stops there); rows off
    the chain put several rows of both ops at one level."""
    rng = random.Random(seed)
    codes, first, second = [-1, -1], [-1, -1], [-1, -1]  # two leaves
    chain, end = 0, 0  # the chain's length and last row
    while chain < (23_000 if deep else 300):
        row = len(codes)
        codes.append(rng.randrange(2))
        if rng.random() < 0.7:  # the chain grows
            first.append(end)
            second.append(rng.randrange(2))
            chain, end = chain + 1, row
        else:  # a row off the chain: any earlier rows
            first.append(rng.randrange(row))
            second.append(rng.randrange(row))
    n = len(codes)
    columns = (np.array(first, np.intp), np.array(second, np.intp))
    code_column = np.array(codes, np.intp)
    plan = graph.plan_columns(code_column, [("add", {}), ("mul", {})], columns, n - 1, [])
    levels = np.array(plain_levels(codes, first, second))
    inner = np.flatnonzero(code_column >= 0)
    want = inner[np.lexsort((code_column[inner], levels[inner]))]
    assert plan.order[: plan.n_ops].tolist() == want.tolist()
    assert len(plan.levels) == levels.max()
    for level in plan.levels:  # each group: one (level, op) run of the order
        rows = plan.order[level.start : level.stop]
        assert len(set(levels[rows].tolist())) == 1
        for group in level.groups:
            grouped = code_column[plan.order[group.start : group.stop]]
            assert set(grouped.tolist()) == {["add", "mul"].index(group.op_name)}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(256, 700), safe=st.booleans())
def test_hypothesis_dags(seed: int, n: int, safe: bool) -> None:
    specs = random_dag(seed, n, safe=safe)
    batched = compile_graph(specs, specs[-1].id)
    plain = compile_graph(specs, specs[-1].id)
    plain.__dict__["_plan"] = graph._NOT_BATCHABLE  # the per-node walk on the same graph
    assert_same(run(batched), run(plain))


# --- what the batched run hands the readers: flat arrays, whole-column diagnostics --------


@pytest.mark.parametrize("seed", range(6))
def test_flat_arrays_are_the_values_and_gradients(seed: int) -> None:
    specs = random_dag(300 + seed, 600, safe=seed % 2 == 0)
    result = run(compile_graph(specs, specs[-1].id))
    assert result.flat_values is not None and result.flat_grads is not None
    values = np.array([float(v) for v in result.values])
    assert np.array_equal(result.flat_values, values, equal_nan=True)
    for i, grad in enumerate(result.grads):
        # a const has no gradient (None in the list, 0 in the array)
        expected = 0.0 if grad is None else float(grad)
        assert np.array_equal(result.flat_grads[i], expected, equal_nan=True), i


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_scalar_diagnostics_match_the_per_node_reading(seed: int, eps: float) -> None:
    """graph_diagnostics reads a batched run's flat arrays in whole-column passes; the
    per-node reading of the same result gives the same stats and findings, in order."""
    specs = random_dag(400 + seed, 700, safe=seed % 2 == 0)
    result = run(compile_graph(specs, specs[-1].id))
    thresholds = Thresholds(saturation_eps=eps, exploding_norm=1e-9, dead_warn=0.0)
    fast = graph_diagnostics(result, thresholds)
    per_node = graph_diagnostics(
        dataclasses.replace(result, flat_values=None, flat_grads=None), thresholds
    )
    assert fast == per_node
    assert fast.relu.nodes > 0 and fast.findings  # the graph does exercise the readings


def test_scalar_diagnostics_exploding_and_nonfinite_leaves() -> None:
    """Leaf gradients above the norm warn (not the NaN or infinite ones: those are the
    nonfinite finding's), in node order, on both readings."""
    specs = [NodeSpec(f"w{k}", "param", value=np.asarray(float(k))) for k in range(300)]
    specs += [NodeSpec("zero", "input", value=np.asarray(0.0))]
    specs += [NodeSpec("big", "mul", ("w299", "w150")), NodeSpec("lg", "log", ("zero",))]
    specs += [NodeSpec("out", "add", ("big", "lg"))]
    result = run(compile_graph(specs, "out"))
    assert result.flat_grads is not None
    thresholds = Thresholds(exploding_norm=200.0)
    fast = graph_diagnostics(result, thresholds)
    per_node = graph_diagnostics(
        dataclasses.replace(result, flat_values=None, flat_grads=None), thresholds
    )
    assert fast == per_node
    assert [(f.code, f.location) for f in fast.findings] == [
        ("nonfinite", "zero"),
        ("exploding_gradient", "w150"),  # d(out)/d(w150) = w299 = 299; w299's is 150
    ]
    assert fast.nonfinite_nodes == ["zero", "lg", "out"]
    assert fast.parameter_tensors == fast.parameter_total == 300


def test_a_leaf_read_twice_in_a_level_adds_both_edges() -> None:
    """x * x and x * c at one level: x's three edges are added after the walk, in one
    bincount; d(x*x + x*c)/dx = 2x + c."""
    specs = [NodeSpec("x", "input", value=np.asarray(1.5))]
    specs += [NodeSpec("c", "param", value=np.asarray(-0.5))]
    specs += [NodeSpec(f"pad{k}", "param", value=np.asarray(0.1 * k)) for k in range(300)]
    specs += [NodeSpec("sq", "mul", ("x", "x")), NodeSpec("xc", "mul", ("x", "c"))]
    specs += [NodeSpec("s", "add", ("sq", "xc"))]
    program = compile_graph(specs, "s")
    plan = batch_plan(program)
    assert plan is not None
    (level,) = [level for level in plan.levels if any(g.op_name == "mul" for g in level.groups)]
    assert level.edge_span == (0, 0)  # every operand of the level is a leaf
    result = run(program)
    x = program.ids.index("x")
    assert float(result.grads[x]) == pytest.approx(2 * 1.5 - 0.5)  # 2x + c


def test_an_unreached_infinite_local_gradient_adds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """sqrt(0) has local gradient inf. Beside the output (not on its path) its gradient 0 times
    inf would be NaN in x's gradient; backward runs again with unreached nodes held at 0."""
    specs = [
        NodeSpec("x", "input", value=np.asarray(0.0)),
        NodeSpec("y", "input", value=np.asarray(2.0)),
    ]
    specs += [NodeSpec(f"pad{k}", "param", value=np.asarray(0.5)) for k in range(300)]
    specs += [NodeSpec("root", "sqrt", ("x",)), NodeSpec("xy", "mul", ("x", "y"))]
    specs += [NodeSpec("out", "add", ("xy", "y"))]
    batched, plain = both_paths(specs, "out", monkeypatch)
    assert_same(batched, plain)
    x = batched.program.ids.index("x")
    assert float(batched.grads[x]) == 2.0  # d(xy + y)/dx = y; nothing from sqrt
    assert float(batched.grads[batched.program.ids.index("root")]) == 0.0
    assert float(batched.values[batched.program.ids.index("root")]) == 0.0  # sqrt(0)


def test_batched_results_read_as_lists() -> None:
    """A batched run keeps values and gradients as arrays; they read as the per-node lists
    do: NumPy scalars by index, None for a const's gradient, slices and iteration."""
    specs = random_dag(11, 400)
    result = run(compile_graph(specs, specs[-1].id))
    assert result.flat_values is not None and result.flat_grads is not None
    consts = [i for i, spec in enumerate(specs) if spec.op == "const"]
    assert consts and all(result.grads[i] is None for i in consts)
    assert len(result.values) == len(result.grads) == len(specs)
    assert [float(v) for v in result.values] == result.flat_values.tolist()
    listed = list(result.grads)
    assert [g is None for g in listed] == [i in consts for i in range(len(specs))]
    assert [float(g) for g in result.grads[20:30] if g is not None] == [
        result.flat_grads[i] for i in range(20, 30) if i not in consts
    ]


@pytest.mark.parametrize("safe", [True, False])
def test_local_gradients_of_a_batched_run_match_the_plain_walk(
    safe: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report's local derivatives, read off the flat columns for a batched run, are the
    per-node path's: same keys (x * x: one key, the two derivatives summed), same numbers."""
    specs = random_dag(21, 700, safe=safe)
    batched, plain = both_paths(specs, specs[-1].id, monkeypatch)
    fast, slow = local_grads(batched), local_grads(plain)
    assert fast.keys() == slow.keys() and len(fast) == 700 - 20
    for i, grads in slow.items():
        assert fast[i].keys() == grads.keys(), i
        np.testing.assert_array_equal(list(fast[i].values()), list(grads.values()), err_msg=str(i))


def test_an_op_node_read_twice_in_a_level_adds_both_edges() -> None:
    """h = tanh(x) read by h * h and h * c at one level: two edges into one op node in one
    level, so that level scatters with np.add.at; d/dh of (h*h + h*c) = 2h + c."""
    specs = [NodeSpec("x", "input", value=np.asarray(0.3))]
    specs += [NodeSpec("c", "param", value=np.asarray(-0.5))]
    specs += [NodeSpec(f"pad{k}", "param", value=np.asarray(0.1 * k)) for k in range(300)]
    specs += [NodeSpec("h", "tanh", ("x",)), NodeSpec("k", "tanh", ("c",))]
    specs += [NodeSpec("sq", "mul", ("h", "h")), NodeSpec("hc", "mul", ("h", "c"))]
    specs += [NodeSpec("kk", "mul", ("k", "c")), NodeSpec("s", "add", ("sq", "hc"))]
    specs += [NodeSpec("out", "add", ("s", "kk"))]
    program = compile_graph(specs, "out")
    plan = batch_plan(program)
    assert plan is not None
    by_level = {group.op_name: level for level in plan.levels for group in level.groups}
    assert not by_level["mul"].edges_distinct  # h three times among the mul level's edges
    assert by_level["tanh"].edge_span == (0, 0)  # its operands are leaves: added at the end
    result = run(program)
    h, x = np.tanh(0.3), program.ids.index("x")
    assert float(result.grads[program.ids.index("h")]) == pytest.approx(2 * h - 0.5, rel=1e-15)
    assert float(result.grads[x]) == pytest.approx((2 * h - 0.5) * (1 - h * h), rel=1e-15)
    k = np.tanh(-0.5)  # c: from h * c, from k * c and through k = tanh(c)
    want_c = h + k + (-0.5) * (1 - k * k)
    assert float(result.grads[program.ids.index("c")]) == pytest.approx(want_c, rel=1e-15)


def test_finite_gradients_take_the_local_derivatives_and_a_blocked_inf_the_ops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backward multiplies by local derivatives (the ops' backward at 1) while every gradient
    is finite; an infinite upstream gradient that a relu blocks would be inf * 0 = NaN that
    way, so the backward is redone by the ops' own backward, which gives the relu's 0."""
    calls: list[int] = []
    exact = graph._backward_by_ops

    def counted(*args: object) -> object:
        calls.append(1)
        return exact(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(graph, "_backward_by_ops", counted)
    specs = random_dag(5, 400)
    run(compile_graph(specs, specs[-1].id))
    assert calls == []
    specs = [NodeSpec("x", "input", value=np.asarray(-1.0))]
    specs += [NodeSpec("big", "param", value=np.asarray(1e308))]
    specs += [NodeSpec(f"pad{k}", "param", value=np.asarray(0.1 * k)) for k in range(300)]
    specs += [NodeSpec("r", "relu", ("x",)), NodeSpec("huge", "mul", ("big", "big"))]
    specs += [NodeSpec("out", "mul", ("r", "huge"))]  # d out / d r = inf; r is blocked
    program = compile_graph(specs, "out")
    result = run(program)
    assert calls == [1]
    assert float(result.grads[program.ids.index("x")]) == 0.0  # not NaN
    assert np.isinf(float(result.grads[program.ids.index("r")]))


SCALING = [name for name, op in OPS.items() if op.scales]


@pytest.mark.parametrize("name", SCALING)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_op_that_scales_has_a_backward_of_g_times_its_derivative(name: str, dtype: type) -> None:
    """What `scales` promises the level batching: for finite upstream gradients, the op's
    backward is g times its backward at 1, bit for bit, over ordinary, huge, tiny, zero and
    subnormal values (the batched backward multiplies those derivatives by g)."""
    op, info = OPS[name], np.finfo(dtype)
    special = [0.0, -0.0, 1.0, -2.5, 0.3, 1e-3, info.tiny, info.tiny / 8, info.max / 1.5]
    rng = np.random.default_rng(0)
    values = np.concatenate((special, -np.array(special), rng.standard_normal(64) * 10))
    values = values.astype(dtype)
    grads = np.concatenate((special, -np.array(special), rng.standard_normal(8) * 1e30))
    with np.errstate(all="ignore"):
        for a, b, g in itertools.product(values[::5], values[::7], grads.astype(dtype)):
            operands = [np.full(4, a), np.full(4, b)][: op.arity]
            _, cache = op.forward(*operands)
            upstream = np.full(4, g, dtype)
            got = op.backward(upstream, cache)
            scaled = op.backward(np.ones(4, dtype), cache)
            for d, d1 in zip(got, scaled, strict=True):
                assert np.array_equal(d, upstream * d1, equal_nan=True), (a, b, g)


@pytest.mark.parametrize(
    ("op", "value", "scale", "dtype"),
    [
        ("reciprocal", 1e200, 1e300, np.float64),  # d = -1/x^2 = -1e-400 underflows alone
        ("reciprocal", 1e25, 1e30, np.float32),
        ("sqrt", 1e-300, 1e-300, np.float64),
        ("log", 1e-310, 1e-300, np.float64),  # 1/x overflows alone; g/x does not
        ("square", 0.1, 1e308, np.float64),  # g * 2 overflows first in the old order
        ("sigmoid", 3.0, 1e308, np.float64),
    ],
)
def test_extreme_local_derivatives_match_the_plain_walk(
    op: str, value: float, scale: float, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream gradient so large or small that the op's derivative alone would underflow
    or overflow: ops that do not `scale` (reciprocal, div, sqrt, log) run their own backward
    in the batched walk too, so the gradient is the per-node walk's exactly."""
    specs = [NodeSpec("x", "param", value=np.asarray(value))]
    specs += [NodeSpec("big", "param", value=np.asarray(scale))]
    specs += [NodeSpec(f"pad{k}", "param", value=np.asarray(0.1 * k)) for k in range(300)]
    specs += [NodeSpec("f", op, ("x",)), NodeSpec("out", "mul", ("f", "big"))]
    batched, plain = both_paths(specs, "out", monkeypatch, dtype)
    x = batched.program.ids.index("x")
    assert float(batched.grads[x]) == float(plain.grads[x])
    assert float(plain.grads[x]) != 0.0
