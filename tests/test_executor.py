"""The executor (levels x groups) against the textbook walk, node by node (tests/reference.py).

Random scalar DAGs with fan-out (operands drawn from all earlier nodes), every batched op,
leaky_relu with two alphas (two groups at one level), kinks and ties (relu/abs at 0, max/min
of equal operands), consts, nodes that do not reach the output, non-finite values, and
graphs that mix tensors and scalars."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_run, reference_values

from gradiag.engine import NodeSpec, Result, compile_graph, run
from gradiag.engine.explain import local_grads
from gradiag.engine.ops import OPS
from gradiag.engine.plan import make_plan

UNARY = ["identity", "neg", "exp", "log", "sqrt", "square", "abs", "reciprocal", "relu",
         "sigmoid", "tanh", "leaky_relu"]  # fmt: skip
# not pow: NumPy runs a 0-d x ** 0.5 as sqrt (the reference's call), a batch as pow, and
# (-inf) ** 0.5 is nan one way and inf the other (test_pow_batches below)
BINARY = ["add", "sub", "mul", "div", "max", "min"]
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


def assert_matches_reference(
    result: Result, output_grad: np.ndarray | None = None, rtol: float = 1e-12
) -> None:
    """Values bit for bit (the same op calls on the same numbers; pow's aside, whose 0-d call
    NumPy may run as sqrt), gradients equal up to the order fan-in sums add in."""
    program = result.program
    values, grads = reference_run(program, output_grad)
    for i, (value, grad) in enumerate(zip(values, grads, strict=True)):
        got = result.value(i)
        if program.op(i) == "pow":
            np.testing.assert_allclose(got, value, rtol=1e-15, err_msg=str(i))
        else:
            assert np.array_equal(got, value, equal_nan=True), i
        if grad is None:
            assert result.grad(i) is None, i
            continue
        # a sum that cancels to near 0 keeps the rounding of its larger terms (the atol)
        np.testing.assert_allclose(result.grad(i), grad, rtol=rtol, atol=1e-12, err_msg=str(i))


def evaluate(specs: list[NodeSpec], output: str, dtype: type = np.float64) -> Result:
    return run(compile_graph(specs, output, dtype=dtype))


@pytest.mark.parametrize("seed", range(12))
def test_random_dags_match_the_reference(seed: int) -> None:
    specs = random_dag(seed, 400 + 50 * seed)
    assert_matches_reference(evaluate(specs, specs[-1].id))


@pytest.mark.parametrize("seed", range(6))
def test_unsafe_ops_with_nonfinite_values(seed: int) -> None:
    """log(0), 1/0, sqrt(-1): infinities and NaNs propagate as the textbook walk has them."""
    specs = random_dag(100 + seed, 500, safe=False)
    assert_matches_reference(evaluate(specs, specs[-1].id))


@pytest.mark.parametrize("seed", range(4))
def test_output_in_the_middle(seed: int) -> None:
    """Nodes after the output or beside it get gradient 0, even where 0 * inf would be NaN."""
    specs = random_dag(200 + seed, 600, safe=False)
    assert_matches_reference(evaluate(specs, specs[350].id))


def test_float32() -> None:
    specs = random_dag(7, 800)
    result = evaluate(specs, specs[-1].id, dtype=np.float32)
    assert result.value(len(specs) - 1).dtype == np.float32
    assert_matches_reference(result, rtol=1e-5)


def test_gradient_seed() -> None:
    specs = random_dag(8, 300)
    seed = np.asarray(-2.5)
    assert_matches_reference(run(compile_graph(specs, specs[-1].id), seed), seed)


@pytest.mark.parametrize("seed", range(4))
def test_graphs_that_mix_tensors_and_scalars(seed: int) -> None:
    """A scalar DAG whose leaves feed a tensor branch and back: sum(v * l0) + the DAG's
    output, with v a vector. The scalar nodes batch; the tensor ones run alone."""
    specs = random_dag(500 + seed, 300)
    rng = np.random.default_rng(seed)
    specs += [NodeSpec("v", "param", value=rng.standard_normal(5))]
    specs += [NodeSpec("vl", "mul", ("v", "l0")), NodeSpec("t", "tanh", ("vl",))]
    specs += [NodeSpec("s", "sum", ("t",)), NodeSpec("out", "add", ("s", specs[299].id))]
    specs += [NodeSpec("e", "mean", ("s",)), NodeSpec("top", "mul", ("e", "out"))]
    program = compile_graph(specs, "top")
    result = run(program)
    assert_matches_reference(result)
    assert result.grad(program.node_ids().index("v")).shape == (5,)


def test_a_tensor_graph_runs_a_group_per_node() -> None:
    specs = [NodeSpec("x", "input", value=np.ones(3))]
    specs += [NodeSpec(f"n{k}", "tanh", (specs[-1].id,)) for k in range(300)]
    program = compile_graph(specs, specs[-1].id)
    assert all(not group.batched for level in program.plan.levels for group in level.groups)
    assert_matches_reference(run(program))


def test_a_long_chain_is_one_group_per_level() -> None:
    specs = [NodeSpec("x", "input", value=np.asarray(0.3))]
    for k in range(1000):
        specs.append(NodeSpec(f"n{k}", "sigmoid", (specs[-1].id,)))
    program = compile_graph(specs, specs[-1].id)
    assert len(program.plan.levels) == 1000
    assert all(len(level.groups) == 1 for level in program.plan.levels)
    assert_matches_reference(run(program))


def plain_levels(codes: list[int], first: list[int], second: list[int]) -> list[int]:
    """1 + the deepest operand's level, leaves 0: the definition, row by row."""
    level: list[int] = []
    for code, a, b in zip(codes, first, second, strict=True):
        level.append(0 if code < 0 else 1 + max(level[a], level[b] if b >= 0 else 0))
    return level


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), deep=st.booleans())
def test_the_plan_orders_rows_by_level_then_op_then_row(seed: int, deep: bool) -> None:
    """make_plan against the definition: op rows sorted by (level, op code), rows of one
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
    operands = np.full((3, n), -1, np.intp)
    operands[0], operands[1] = first, second
    code_column = np.array(codes, np.intp)
    names = ["add", "mul", "input"]  # code 2: the leaves
    leaf_coded = np.where(code_column < 0, 2, code_column)
    attrs = [{}] * n
    plan = make_plan(names, leaf_coded, attrs, operands, np.ones(n, bool), np.ones(n, bool))
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
            assert set(grouped.tolist()) == {["add", "mul"].index(group.op.name)}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(30, 700), safe=st.booleans())
def test_hypothesis_dags(seed: int, n: int, safe: bool) -> None:
    specs = random_dag(seed, n, safe=safe, leaves=min(20, n // 2))
    assert_matches_reference(evaluate(specs, specs[-1].id))


def test_a_leaf_read_twice_in_a_level_adds_both_edges() -> None:
    """x * x and x * c at one level: x's three edges are added after the walk, in one
    bincount; d(x*x + x*c)/dx = 2x + c."""
    specs = [NodeSpec("x", "input", value=np.asarray(1.5))]
    specs += [NodeSpec("c", "param", value=np.asarray(-0.5))]
    specs += [NodeSpec("sq", "mul", ("x", "x")), NodeSpec("xc", "mul", ("x", "c"))]
    specs += [NodeSpec("s", "add", ("sq", "xc"))]
    result = evaluate(specs, "s")
    assert float(result.grad(0)) == 2 * 1.5 - 0.5  # 2x + c


def test_an_unreached_infinite_local_gradient_adds_nothing() -> None:
    """sqrt(0) has local gradient inf. Beside the output (not on its path) its gradient 0 times
    inf would be NaN in x's gradient: an unreached node adds nothing."""
    specs = [
        NodeSpec("x", "input", value=np.asarray(0.0)),
        NodeSpec("y", "input", value=np.asarray(2.0)),
    ]
    specs += [NodeSpec("root", "sqrt", ("x",)), NodeSpec("xy", "mul", ("x", "y"))]
    specs += [NodeSpec("out", "add", ("xy", "y")), NodeSpec("e", "exp", ("root",))]
    specs += [NodeSpec("big", "exp", ("e",)), NodeSpec("bigger", "exp", ("big",))]
    result = evaluate(specs, "out")
    assert_matches_reference(result)
    assert float(result.grad(0)) == 2.0  # d(xy + y)/dx = y; nothing from sqrt
    assert float(result.grad(2)) == 0.0  # root
    assert float(result.value(2)) == 0.0  # sqrt(0)


def test_an_op_node_read_twice_in_a_level_adds_both_edges() -> None:
    """h = tanh(x) read by h * h and h * c at one level: two edges into one op node in one
    level; d/dh of (h*h + h*c) = 2h + c."""
    specs = [NodeSpec("x", "input", value=np.asarray(0.3))]
    specs += [NodeSpec("c", "param", value=np.asarray(-0.5))]
    specs += [NodeSpec("h", "tanh", ("x",)), NodeSpec("k", "tanh", ("c",))]
    specs += [NodeSpec("sq", "mul", ("h", "h")), NodeSpec("hc", "mul", ("h", "c"))]
    specs += [NodeSpec("kk", "mul", ("k", "c")), NodeSpec("s", "add", ("sq", "hc"))]
    specs += [NodeSpec("out", "add", ("s", "kk"))]
    program = compile_graph(specs, "out")
    result = run(program)
    row = program.node_ids().index
    h = np.tanh(0.3)
    assert float(result.grad(row("h"))) == pytest.approx(2 * h - 0.5, rel=1e-15)
    assert float(result.grad(row("x"))) == pytest.approx((2 * h - 0.5) * (1 - h * h), rel=1e-15)
    k = np.tanh(-0.5)  # c: from h * c, from k * c and through k = tanh(c)
    want_c = h + k + (-0.5) * (1 - k * k)
    assert float(result.grad(row("c"))) == pytest.approx(want_c, rel=1e-15)


def test_a_blocked_infinite_gradient_is_zero_not_nan() -> None:
    """An infinite upstream gradient that a relu blocks would be inf * 0 = NaN as a local
    derivative times a gradient; the level runs the ops' own backward, which gives 0."""
    specs = [NodeSpec("x", "input", value=np.asarray(-1.0))]
    specs += [NodeSpec("big", "param", value=np.asarray(1e308))]
    specs += [NodeSpec(f"pad{k}", "param", value=np.asarray(0.1 * k)) for k in range(30)]
    specs += [NodeSpec("r", "relu", ("x",)), NodeSpec("huge", "mul", ("big", "big"))]
    specs += [NodeSpec("out", "mul", ("r", "huge"))]  # d out / d r = inf; r is blocked
    program = compile_graph(specs, "out")
    result = run(program)
    row = program.node_ids().index
    assert float(result.grad(row("x"))) == 0.0  # not NaN
    assert np.isinf(float(result.grad(row("r"))))
    assert_matches_reference(result)


def test_local_gradients_are_the_ops_backward_at_one() -> None:
    """The local derivatives the backward keeps (and the report reads) are each node's op
    backward at an upstream gradient of 1; an operand read twice (x * x) gets the sum."""
    specs = random_dag(21, 700, safe=False)
    program = compile_graph(specs, specs[-1].id)
    local = local_grads(run(program))
    values, caches = reference_values(program)
    ids = program.node_ids()
    assert len(local) == 700 - 20
    with np.errstate(all="ignore"):
        for i, grads in local.items():
            op = OPS[program.op(i)]
            want: dict[str, float] = {}
            ones = np.ones((), program.dtype)
            for j, d in zip(program.inputs(i), op.backward(ones, caches[i]), strict=True):
                want[ids[j]] = want.get(ids[j], 0.0) + float(d)
            assert grads.keys() == want.keys(), i
            np.testing.assert_array_equal(list(grads.values()), list(want.values()), str(i))
    assert values  # the reference ran


def test_pow_batches_and_agrees_with_the_reference_on_finite_values() -> None:
    rng = np.random.default_rng(0)
    specs = [NodeSpec(f"b{k}", "input", value=np.asarray(rng.uniform(0.1, 3))) for k in range(50)]
    specs += [NodeSpec(f"e{k}", "param", value=np.asarray(e)) for k, e in enumerate([0.5, -1, 2.5])]
    specs += [NodeSpec(f"p{k}", "pow", (f"b{k}", f"e{k % 3}")) for k in range(50)]
    total = "p0"
    for k in range(1, 50):
        specs.append(NodeSpec(f"s{k}", "add", (total, f"p{k}")))
        total = f"s{k}"
    program = compile_graph(specs, total)
    assert any(g.batched and g.op.name == "pow" for lv in program.plan.levels for g in lv.groups)
    assert_matches_reference(run(program))


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
def test_extreme_local_derivatives_match_the_reference(
    op: str, value: float, scale: float, dtype: type
) -> None:
    """An upstream gradient so large or small that the op's derivative alone would underflow
    or overflow: ops that do not `scale` (reciprocal, div, sqrt, log) run their own backward
    in the batched walk too, so the gradient is the textbook walk's exactly."""
    specs = [NodeSpec("x", "param", value=np.asarray(value))]
    specs += [NodeSpec("big", "param", value=np.asarray(scale))]
    specs += [NodeSpec("f", op, ("x",)), NodeSpec("out", "mul", ("f", "big"))]
    program = compile_graph(specs, "out", dtype=dtype)
    _, grads = reference_run(program)
    got = run(program).grad(0)
    assert got is not None and grads[0] is not None
    assert float(got) == float(grads[0]) != 0.0
