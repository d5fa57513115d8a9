"""Every op of the table against its formula and against centred numerical differences.

One parametrised test covers the whole op table: adding an op to `engine.ops.OPS` means
adding one `Case` row here (a test fails until you do). Each row draws operands with
hypothesis (random shapes, NumPy broadcasting, random axes, 1-D/2-D/batched matmul), kept
away from kinks and poles so that a centred difference is a fair reference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradiag.engine.errors import ShapeError
from gradiag.engine.ops import LEAF_OPS, OPS, Array, all_finite, sigmoid_forward, unbroadcast
from gradiag.schemas import graph as graph_schema

H = 1e-6
RTOL = 1e-6
ATOL = 1e-8

Operands = tuple[Array, ...]
Attrs = dict[str, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]

# --- element strategies: away from kinks, poles and overflow ---------------------------

SMOOTH = st.floats(-2.0, 2.0)
POSITIVE = st.floats(0.5, 3.0)  # log, sqrt, pow bases
AWAY_FROM_ZERO = st.floats(0.1, 2.0) | st.floats(-2.0, -0.1)  # relu, abs, leaky_relu kinks
DENOMINATOR = st.floats(0.5, 2.0) | st.floats(-2.0, -0.5)  # div, reciprocal poles
EXPONENT = st.floats(-2.0, 2.0)
# max/min: two interleaved grids never tie and stay >= 0.25 apart, far more than H.
GRID_A = st.integers(-4, 4).map(lambda k: k * 0.5 + 0.25)
GRID_B = st.integers(-4, 4).map(lambda k: k * 0.5)
# svm_hinge: scores on a 0.3 grid offset so that no margin s_j - s_y + 1 is within 0.1 of 0.
HINGE_GRID = st.integers(-6, 6).map(lambda k: k * 0.3 + 0.05)

MAX_SIDE = 4


def array(draw: Draw, shape: Sequence[int], elements: st.SearchStrategy[float]) -> Array:
    return np.asarray(draw(hnp.arrays(np.float64, tuple(shape), elements=elements)))


# --- operand strategies: each returns (operands, attrs) ---------------------------------


def unary(elements: st.SearchStrategy[float]) -> st.SearchStrategy[tuple[Operands, Attrs]]:
    @st.composite
    def strategy(draw: Draw) -> tuple[Operands, Attrs]:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=MAX_SIDE))
        return (array(draw, shape, elements),), {}

    return strategy()


def broadcasting(
    left: st.SearchStrategy[float], right: st.SearchStrategy[float]
) -> st.SearchStrategy[tuple[Operands, Attrs]]:
    """Two operands of mutually broadcastable shapes: (3, 1) with (4,), scalars with matrices."""

    @st.composite
    def strategy(draw: Draw) -> tuple[Operands, Attrs]:
        shapes = draw(
            hnp.mutually_broadcastable_shapes(
                num_shapes=2, min_dims=0, max_dims=3, max_side=MAX_SIDE
            )
        )
        a_shape, b_shape = shapes.input_shapes
        return (array(draw, a_shape, left), array(draw, b_shape, right)), {}

    return strategy()


@st.composite
def matmul_operands(draw: Draw) -> tuple[Operands, Attrs]:
    """NumPy's matmul signature (n?,k),(k,m?): 1-D, 2-D and broadcast batched operands."""
    shapes = draw(
        hnp.mutually_broadcastable_shapes(
            signature=np.matmul.signature, max_dims=2, max_side=MAX_SIDE
        )
    )
    a_shape, b_shape = shapes.input_shapes
    return (array(draw, a_shape, SMOOTH), array(draw, b_shape, SMOOTH)), {}


@st.composite
def affine_operands(draw: Draw) -> tuple[Operands, Attrs]:
    """x (N, D), W (D, M), b (M,)."""
    n, d, m = (draw(st.integers(1, MAX_SIDE)) for _ in range(3))
    x, W, b = (array(draw, shape, SMOOTH) for shape in ((n, d), (d, m), (m,)))
    return (x, W, b), {}


@st.composite
def reduce_operands(draw: Draw) -> tuple[Operands, Attrs]:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=MAX_SIDE))
    ndim = len(shape)
    attrs: Attrs = {}
    if ndim:
        axis = draw(
            st.none()
            | st.integers(-ndim, ndim - 1)
            | st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)
        )
        if axis is not None:
            attrs["axis"] = axis
        if draw(st.booleans()):
            attrs["keepdims"] = True
    return (array(draw, shape, SMOOTH),), attrs


@st.composite
def softmax_operands(draw: Draw) -> tuple[Operands, Attrs]:
    """x of rank 1 to 3 and, half the time, an axis (default: the last)."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=MAX_SIDE))
    attrs: Attrs = {}
    if draw(st.booleans()):
        attrs["axis"] = draw(st.integers(-len(shape), len(shape) - 1))
    return (array(draw, shape, SMOOTH),), attrs


def ref_softmax(x: Array, axis: int = -1) -> Array:
    e = np.exp(x)  # SMOOTH elements: no overflow, so the textbook formula
    return e / e.sum(axis=axis, keepdims=True)


def ref_log_softmax(x: Array, axis: int = -1) -> Array:
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


@st.composite
def transpose_operands(draw: Draw) -> tuple[Operands, Attrs]:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=MAX_SIDE))
    attrs: Attrs = {}
    if draw(st.booleans()):
        attrs["axes"] = draw(st.permutations(range(len(shape))))
    return (array(draw, shape, SMOOTH),), attrs


@st.composite
def leaky_relu_operands(draw: Draw) -> tuple[Operands, Attrs]:
    ((x,), _) = draw(unary(AWAY_FROM_ZERO))
    attrs: Attrs = {}
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.floats(0.0, 0.5))
    return (x,), attrs


def class_scores(
    elements: st.SearchStrategy[float], min_classes: int = 1
) -> st.SearchStrategy[tuple[Operands, Attrs]]:
    """scores (N, C) and integer labels (N,) stored as floats, as the wire sends them; one
    class (C = 1): labels -1 or +1, the binary hinge's."""

    @st.composite
    def strategy(draw: Draw) -> tuple[Operands, Attrs]:
        rows = draw(st.integers(1, MAX_SIDE))
        classes = draw(st.integers(min_classes, MAX_SIDE))
        scores = array(draw, (rows, classes), elements)
        label = st.sampled_from([-1.0, 1.0]) if classes == 1 else st.integers(0, classes - 1)
        labels = array(draw, (rows,), label.map(float))
        return (scores, labels), {}

    return strategy()


@st.composite
def logits_operands(draw: Draw) -> tuple[Operands, Attrs]:
    """scores of any shape and targets in [0, 1] of the same shape, or (N,) for (N, 1)."""
    if draw(st.booleans()):
        rows = draw(st.integers(1, MAX_SIDE))
        scores = array(draw, (rows, 1), SMOOTH)
        return (scores, array(draw, (rows,), st.floats(0.0, 1.0))), {}
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=MAX_SIDE))
    return (array(draw, shape, SMOOTH), array(draw, shape, st.floats(0.0, 1.0))), {}


def distinct(draw: Draw, shape: tuple[int, ...]) -> Array:
    """Values >= 0.05 apart (no pooling ties within a centred difference's step)."""
    size = math.prod(shape)
    order = np.asarray(draw(st.permutations(range(size))), np.float64)
    return (order * 0.05 - size * 0.025).reshape(shape)


@st.composite
def image_operands(draw: Draw, pool: str | None = None) -> tuple[Operands, Attrs]:
    """x (N, C, H, W) and, for conv2d, W (F, C, kh, kw) and b (F,); stride, padding."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = draw(st.integers(3, 5)), draw(st.integers(3, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    if pool is not None:  # padding at most half the kernel, as PyTorch
        padding = [draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))]
        attrs: Attrs = {"kernel": [kh, kw], "stride": stride, "padding": padding}
        if pool == "avgpool2d":
            attrs["count_include_pad"] = draw(st.booleans())
        x = (
            distinct(draw, (n, c, h, w))
            if pool == "maxpool2d"
            else array(draw, (n, c, h, w), SMOOTH)
        )
        return (x,), attrs
    padding = [draw(st.integers(0, 1)), draw(st.integers(0, 1))]
    f = draw(st.integers(1, 2))
    x, W, b = (array(draw, shape, SMOOTH) for shape in ((n, c, h, w), (f, c, kh, kw), (f,)))
    return (x, W, b), {"stride": stride, "padding": padding}


@st.composite
def norm_operands(draw: Draw, *, running: bool) -> tuple[Operands, Attrs]:
    """x (N, C) or (N, C, H, W) with N * H * W >= 2, gamma, beta (C,) (and running stats)."""
    c = draw(st.integers(1, 3))
    shape = (draw(st.integers(2, 4)), c) if draw(st.booleans()) else (2, c, 2, 3)
    x = array(draw, shape, st.floats(-2.0, 2.0)) + np.arange(math.prod(shape)).reshape(shape)
    gamma, beta = array(draw, (c,), SMOOTH), array(draw, (c,), SMOOTH)
    if not running:
        return (x, gamma, beta), {}
    mean, var = array(draw, (c,), SMOOTH), array(draw, (c,), POSITIVE)
    return (x, gamma, beta, mean, var), {"eps": draw(st.sampled_from([1e-5, 0.1]))}


@st.composite
def reshape_operands(draw: Draw, *, flatten: bool) -> tuple[Operands, Attrs]:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=3))
    x = array(draw, shape, SMOOTH)
    if flatten:
        return (x,), {"axis": draw(st.integers(0, len(shape)))}
    target = [x.size] if draw(st.booleans()) else [-1, shape[-1]]
    return (x,), {"shape": target}


# --- the formulas, written a second time ------------------------------------------------


def _axis(attrs: Attrs) -> Any:
    axis = attrs.get("axis")
    return tuple(axis) if isinstance(axis, list) else axis


def ref_sum(x: Array, **attrs: Any) -> Any:
    return np.sum(x, axis=_axis(attrs), keepdims=attrs.get("keepdims", False))


def ref_mean(x: Array, **attrs: Any) -> Any:
    return np.mean(x, axis=_axis(attrs), keepdims=attrs.get("keepdims", False))


def ref_softmax_cross_entropy(scores: Array, labels: Array) -> Any:
    probs = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
    picked = [probs[i, int(label)] for i, label in enumerate(labels)]
    return -np.mean(np.log(picked))


def ref_svm_hinge(scores: Array, labels: Array) -> Array:
    if scores.shape[1] == 1:  # the binary hinge
        return np.asarray(np.mean(np.maximum(0.0, 1.0 - labels * scores[:, 0])))
    total = 0.0
    for i, label in enumerate(labels.astype(int)):
        for j in range(scores.shape[1]):
            if j != label:
                total += max(0.0, scores[i, j] - scores[i, label] + 1.0)
    return np.asarray(total / scores.shape[0])


def _pairs(attrs: Attrs, *names: str) -> list[tuple[int, int]]:
    return [tuple(attrs[name]) if name in attrs else (1, 1) for name in names]  # type: ignore[misc]


def ref_conv2d(x: Array, W: Array, b: Array, **attrs: Any) -> Array:
    """Cross-correlation by its definition: a loop over every output position."""
    (sh, sw), (ph, pw) = _pairs(attrs, "stride", "padding")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    f, _, kh, kw = W.shape
    ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.zeros((x.shape[0], f, ho, wo))
    for i, j in np.ndindex(ho, wo):
        window = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
        out[:, :, i, j] = np.einsum("nchw,fchw->nf", window, W) + b
    return out


def ref_pool(x: Array, *, average: bool, **attrs: Any) -> Array:
    kh, kw = attrs["kernel"]
    sh, sw = attrs.get("stride", (kh, kw))
    ph, pw = attrs.get("padding", (0, 0))
    fill = 0.0 if average else -np.inf
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    real = np.pad(np.ones(x.shape[2:]), ((ph, ph), (pw, pw)))
    ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.zeros((*x.shape[:2], ho, wo))
    for i, j in np.ndindex(ho, wo):
        rows, cols = slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw)
        window = xp[:, :, rows, cols]
        if not average:
            out[:, :, i, j] = window.max(axis=(2, 3))
        else:
            count = kh * kw if attrs.get("count_include_pad", True) else real[rows, cols].sum()
            out[:, :, i, j] = window.sum(axis=(2, 3)) / count
    return out


def _channel_view(v: Array, ndim: int) -> Array:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def ref_batchnorm(x: Array, gamma: Array, beta: Array, eps: float = 1e-5) -> Array:
    axes = tuple(k for k in range(x.ndim) if k != 1)
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    g, b = _channel_view(gamma, x.ndim), _channel_view(beta, x.ndim)
    return g * (x - mean) / np.sqrt(var + eps) + b


def ref_batchnorm_eval(
    x: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float = 1e-5
) -> Array:
    v = [_channel_view(p, x.ndim) for p in (gamma, beta, mean, var)]
    return v[0] * (x - v[2]) / np.sqrt(v[3] + eps) + v[1]


def ref_bce(scores: Array, targets: Array) -> Array:
    y = targets.reshape(scores.shape)
    p = 1.0 / (1.0 + np.exp(-scores))
    return np.asarray(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ref_flatten(x: Array, axis: int = 1) -> Array:
    return x.reshape(math.prod(x.shape[:axis]), -1) if x.size else x.reshape(0, 0)


@dataclass(frozen=True)
class Case:
    op: str
    draw: st.SearchStrategy[tuple[Operands, Attrs]]
    reference: Callable[..., Any]
    no_grad: tuple[int, ...] = ()  # operands the op gives no gradient (class labels)


CASES = [
    Case("add", broadcasting(SMOOTH, SMOOTH), lambda a, b: a + b),
    Case("sub", broadcasting(SMOOTH, SMOOTH), lambda a, b: a - b),
    Case("mul", broadcasting(SMOOTH, SMOOTH), lambda a, b: a * b),
    Case("div", broadcasting(SMOOTH, DENOMINATOR), lambda a, b: a / b),
    Case("pow", broadcasting(POSITIVE, EXPONENT), np.power),
    Case("max", broadcasting(GRID_A, GRID_B), np.maximum),
    Case("min", broadcasting(GRID_A, GRID_B), np.minimum),
    Case("neg", unary(SMOOTH), lambda x: -x),
    Case("exp", unary(SMOOTH), np.exp),
    Case("log", unary(POSITIVE), np.log),
    Case("sqrt", unary(POSITIVE), np.sqrt),
    Case("square", unary(SMOOTH), lambda x: x**2),
    Case("abs", unary(AWAY_FROM_ZERO), np.abs),
    Case("reciprocal", unary(DENOMINATOR), lambda x: 1.0 / x),
    Case("identity", unary(SMOOTH), lambda x: x),
    Case("relu", unary(AWAY_FROM_ZERO), lambda x: np.maximum(x, 0.0)),
    Case(
        "leaky_relu",
        leaky_relu_operands(),
        lambda x, alpha=0.01: np.where(x > 0, x, alpha * x),
    ),
    Case("sigmoid", unary(st.floats(-3.0, 3.0)), lambda x: 1.0 / (1.0 + np.exp(-x))),
    Case("tanh", unary(st.floats(-3.0, 3.0)), np.tanh),
    Case("matmul", matmul_operands(), lambda a, b: a @ b),
    Case("affine", affine_operands(), lambda x, W, b: x @ W + b),
    Case("transpose", transpose_operands(), lambda x, axes=None: np.transpose(x, axes)),
    Case("sum", reduce_operands(), ref_sum),
    Case("mean", reduce_operands(), ref_mean),
    Case("softmax", softmax_operands(), ref_softmax),
    Case("log_softmax", softmax_operands(), ref_log_softmax),
    Case("mse", broadcasting(SMOOTH, SMOOTH), lambda s, t: np.mean((s - t) ** 2)),
    Case(
        "softmax_cross_entropy",
        class_scores(SMOOTH, min_classes=2),
        ref_softmax_cross_entropy,
        no_grad=(1,),
    ),
    Case("svm_hinge", class_scores(HINGE_GRID), ref_svm_hinge, no_grad=(1,)),
    Case("bce_with_logits", logits_operands(), ref_bce),
    Case("conv2d", image_operands(), ref_conv2d),
    Case("maxpool2d", image_operands("maxpool2d"), lambda x, **a: ref_pool(x, average=False, **a)),
    Case("avgpool2d", image_operands("avgpool2d"), lambda x, **a: ref_pool(x, average=True, **a)),
    Case("batchnorm", norm_operands(running=False), ref_batchnorm),
    Case("batchnorm_eval", norm_operands(running=True), ref_batchnorm_eval),
    Case("flatten", reshape_operands(flatten=True), ref_flatten),
    Case("reshape", reshape_operands(flatten=False), lambda x, shape: x.reshape(shape)),
]


def test_gradient_table_covers_every_op() -> None:
    assert sorted(case.op for case in CASES) == sorted(OPS)


def test_schema_tags_match_engine_op_table() -> None:
    leaves = set(graph_schema.LEAF_OPS)
    assert leaves == set(LEAF_OPS)
    assert set(graph_schema.ALL_OPS) - leaves == set(OPS)
    assert len(graph_schema.ALL_OPS) == len(set(graph_schema.ALL_OPS))  # no tag listed twice


def numerical_vjp(
    f: Callable[..., Array], operands: Operands, k: int, dout: Array, h: float = H
) -> Array:
    """d/d(operand k) of sum(dout * f(...)) by centred differences, one element at a time."""
    x = operands[k]
    grad = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        f_plus = f(*operands[:k], plus, *operands[k + 1 :])
        f_minus = f(*operands[:k], minus, *operands[k + 1 :])
        # Difference first: the untouched elements cancel exactly, not after a large sum.
        grad[idx] = np.sum(dout * (f_plus - f_minus)) / (2 * h)
    return grad


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.op)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_op_matches_formula_and_centred_differences(case: Case, data: st.DataObject) -> None:
    operands, attrs = data.draw(case.draw, label="operands, attrs")
    op = OPS[case.op]

    def f(*xs: Array) -> Array:
        return np.asarray(op.forward(*xs, **attrs)[0])

    out, cache = op.forward(*operands, **attrs)
    out = np.asarray(out)
    assert out.shape == op.shape(*(x.shape for x in operands), **attrs)
    np.testing.assert_allclose(out, case.reference(*operands, **attrs), rtol=1e-12, atol=1e-12)

    seed = data.draw(st.integers(0, 2**32 - 1), label="dout seed")
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    dout_before = dout.copy()
    grads = op.backward(dout, cache)
    np.testing.assert_array_equal(dout, dout_before)  # backward never writes into dout
    assert len(grads) == op.arity == len(operands)

    for k, x in enumerate(operands):
        if k in case.no_grad:
            assert grads[k] is None
            continue
        grad = grads[k]
        assert grad is not None
        analytic = unbroadcast(grad, x.shape)
        assert analytic.shape == x.shape
        numeric = numerical_vjp(f, operands, k, dout)
        np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL, err_msg=f"d{k}")


# --- broadcasting, by hand: the shapes the brief names ----------------------------------

ELEMENTWISE_BINARY = ["add", "sub", "mul", "div", "pow", "max", "min", "mse"]


@pytest.mark.parametrize("op_name", ELEMENTWISE_BINARY)
@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((3, 1), (4,)), ((), (2, 3)), ((2, 3), ()), ((2, 1, 3), (4, 1)), ((1,), (3, 2))],
)
def test_binary_op_gradient_is_summed_back_to_each_operand_shape(
    op_name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(7)
    # Positive, distinct on two grids: valid for pow's base and away from max/min ties.
    a = np.asarray(rng.integers(1, 9, size=a_shape) * 0.5 + 0.25)
    b = np.asarray(rng.integers(1, 9, size=b_shape) * 0.5)
    op = OPS[op_name]
    out, cache = op.forward(a, b)
    dout = rng.standard_normal(np.shape(out))
    grads = op.backward(dout, cache)
    for k, x in enumerate((a, b)):
        grad = grads[k]
        assert grad is not None
        analytic = unbroadcast(grad, x.shape)
        assert analytic.shape == x.shape
        numeric = numerical_vjp(lambda *xs: np.asarray(op.forward(*xs)[0]), (a, b), k, dout)
        np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


def test_add_of_column_and_row_broadcasts_to_a_matrix_and_sums_gradients_back() -> None:
    a = np.array([[1.0], [2.0], [3.0]])  # (3, 1)
    b = np.array([10.0, 20.0, 30.0, 40.0])  # (4,)
    out, cache = OPS["add"].forward(a, b)
    assert out.shape == (3, 4)
    da, db = OPS["add"].backward(np.ones((3, 4)), cache)
    assert da is not None and db is not None
    np.testing.assert_array_equal(unbroadcast(da, (3, 1)), [[4.0], [4.0], [4.0]])
    np.testing.assert_array_equal(unbroadcast(db, (4,)), [3.0, 3.0, 3.0, 3.0])


# --- kinks and ties follow PyTorch ------------------------------------------------------


def only_grad(op_name: str, *operands: Array, **attrs: Any) -> tuple[Any, ...]:
    op = OPS[op_name]
    out, cache = op.forward(*operands, **attrs)
    return tuple(op.backward(np.ones(np.shape(out)), cache))


def test_relu_gradient_at_zero_is_zero() -> None:
    (dx,) = only_grad("relu", np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(dx, [0.0, 0.0, 1.0])


def test_abs_gradient_at_zero_is_zero() -> None:
    (dx,) = only_grad("abs", np.array([-1.5, 0.0, 2.0]))
    np.testing.assert_array_equal(dx, [-1.0, 0.0, 1.0])


def test_leaky_relu_gradient_at_zero_is_alpha() -> None:
    (dx,) = only_grad("leaky_relu", np.array([-1.0, 0.0, 2.0]), alpha=0.2)
    np.testing.assert_array_equal(dx, [0.2, 0.2, 1.0])
    (dx,) = only_grad("leaky_relu", np.array(0.0))
    assert dx == 0.01  # the default alpha


@pytest.mark.parametrize(
    ("op_name", "expected_da", "expected_db"),
    [("max", [0.5, 0.0, 1.0], [0.5, 1.0, 0.0]), ("min", [0.5, 1.0, 0.0], [0.5, 0.0, 1.0])],
)
def test_max_and_min_tie_splits_gradient_equally(
    op_name: str, expected_da: list[float], expected_db: list[float]
) -> None:
    da, db = only_grad(op_name, np.array([1.0, 2.0, 3.0]), np.array([1.0, 5.0, 0.0]))
    np.testing.assert_array_equal(da, expected_da)
    np.testing.assert_array_equal(db, expected_db)


def test_svm_hinge_margin_exactly_zero_passes_no_gradient() -> None:
    # s_1 - s_0 + 1 = 0: the margin sits on the kink and counts as not violated.
    (dscores, dlabels) = only_grad("svm_hinge", np.array([[1.0, 0.0]]), np.array([0.0]))
    assert dlabels is None
    np.testing.assert_array_equal(dscores, [[0.0, 0.0]])


def test_pow_gradients_match_pytorch_at_zero_exponent_and_zero_base() -> None:
    with np.errstate(divide="ignore", invalid="ignore"):  # as graph.backward runs every op
        dbase, dexp = only_grad("pow", np.array([0.0, 2.0]), np.array([0.0, 3.0]))
    np.testing.assert_array_equal(dbase, [0.0, 12.0])  # exponent 0: no base gradient
    np.testing.assert_allclose(dexp, [0.0, 8.0 * math.log(2.0)])  # base 0: none either


# --- numerical stability at the op level -----------------------------------------------


def test_sigmoid_is_finite_and_exact_at_extremes() -> None:
    x = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    out, cache = OPS["sigmoid"].forward(x)
    assert np.all(np.isfinite(out))
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == 0.5
    (dx,) = OPS["sigmoid"].backward(np.ones(5), cache)
    assert dx is not None
    assert np.all(np.isfinite(dx))
    assert dx[2] == 0.25


def test_softmax_cross_entropy_is_finite_with_huge_scores() -> None:
    scores = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]])
    labels = np.array([0.0, 0.0])
    loss, cache = OPS["softmax_cross_entropy"].forward(scores, labels)
    # row 0 is right with certainty (loss 0); row 1 is wrong by 2000 (loss 2000).
    assert loss == pytest.approx(1000.0)
    dscores, dlabels = OPS["softmax_cross_entropy"].backward(np.ones(()), cache)
    assert dlabels is None
    assert dscores is not None
    np.testing.assert_allclose(dscores, np.array([[0.0, 0.0], [-0.5, 0.5]]))


# --- affine: a fully-connected layer as one op ----------------------------------------


def test_affine_by_hand() -> None:
    x = np.array([[1.0, 2.0], [3.0, -1.0]])  # (N=2, D=2)
    W = np.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])  # (D=2, M=3)
    b = np.array([10.0, 20.0, 30.0])  # (M=3,)
    out, cache = OPS["affine"].forward(x, W, b)
    # row 0: [1 - 2, 2, 2 + 1] + b; row 1: [3 + 1, -1, 6 - 0.5] + b
    np.testing.assert_array_equal(out, [[9.0, 22.0, 33.0], [14.0, 19.0, 35.5]])
    dout = np.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
    dx, dW, db = OPS["affine"].backward(dout, cache)
    np.testing.assert_array_equal(dx, [[1.0 - 2.0, -1.0 - 0.5], [2.0, -2.0 + 1.0]])  # dout @ W.T
    np.testing.assert_array_equal(
        dW, [[1.0 + 6.0, 3.0, -1.0], [2.0 - 2.0, -1.0, -2.0]]
    )  # x.T @ dout
    np.testing.assert_array_equal(db, [3.0, 1.0, -1.0])  # dout summed over the rows
    assert OPS["affine"].flops([(2, 2), (2, 3), (3,)], (2, 3)) == 2 * 2 * 2 * 3 + 2 * 3


def test_affine_equals_matmul_then_add_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    dout = rng.standard_normal((5, 3))
    out, cache = OPS["affine"].forward(x, W, b)
    np.testing.assert_array_equal(out, x @ W + b)
    dx, dW, db = OPS["affine"].backward(dout, cache)
    (dx2, dW2), _ = OPS["matmul"].backward(dout, (x, W)), None
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(dW, dW2)
    np.testing.assert_array_equal(db, unbroadcast(dout, (3,)))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((3,), (3, 2), (2,)), "x must be a matrix (N, D), got shape [3]"),
        (((4, 3), (2, 5), (5,)), "W must be (D, M) with D = 3"),
        (((4, 3), (3, 5, 1), (5,)), "W must be (D, M) with D = 3"),
        (((4, 3), (3, 5), (4,)), "b must be (M,) = [5]"),
        (((4, 3), (3, 5), (1, 5)), "b must be (M,) = [5]"),
    ],
)
def test_affine_shape_errors_name_the_operand(
    shapes: tuple[tuple[int, ...], ...], message: str
) -> None:
    with pytest.raises(ShapeError, match=re.escape(message)):
        OPS["affine"].shape(*shapes)


@pytest.mark.parametrize(
    ("op_name", "operands"),
    [
        ("affine", ((2, 3), (3, 4), (4,))),
        ("matmul", ((2, 3), (3, 4))),
        ("matmul", ((3,), (2, 3, 4))),  # 1-D and batched: the promotion is undone as before
    ],
)
def test_needs_skips_exactly_the_unwanted_gradients(
    op_name: str, operands: tuple[tuple[int, ...], ...]
) -> None:
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(shape) for shape in operands]
    op = OPS[op_name]
    assert op.takes_needs
    out, cache = op.forward(*xs)
    dout = rng.standard_normal(np.shape(out))
    full = op.backward(dout, cache)
    for skipped in range(len(xs)):
        needs = tuple(k != skipped for k in range(len(xs)))
        partial = op.backward(dout, cache, needs)
        for k, (got, want) in enumerate(zip(partial, full, strict=True)):
            if k == skipped:
                assert got is None
            else:
                np.testing.assert_array_equal(got, want)


# --- relu: NaN propagates, a blocked inf stays blocked ----------------------------------


def test_relu_propagates_nan_as_pytorch_does() -> None:
    out, _ = OPS["relu"].forward(np.array([np.nan, -np.inf, np.inf, -2.0, 3.0]))
    np.testing.assert_array_equal(out, [np.nan, 0.0, np.inf, 0.0, 3.0])  # NaN == NaN here


def test_relu_blocked_inf_or_nan_upstream_gradient_is_zero_not_nan() -> None:
    x = np.array([-1.0, 0.0, 2.0, 3.0, -4.0])
    dout = np.array([np.inf, -np.inf, 5.0, np.inf, np.nan])
    (dx,) = only_grad_with("relu", dout, x)
    np.testing.assert_array_equal(dx, [0.0, 0.0, 5.0, np.inf, 0.0])  # passed where x > 0 only


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_keeps_the_dtype_and_gives_no_gradient_at_a_nan_input(dtype: type) -> None:
    x = np.array([np.nan, 1.5, -1.5], dtype)
    out, cache = OPS["relu"].forward(x)
    assert out.dtype == dtype
    (dx,) = OPS["relu"].backward(np.ones(3, dtype), cache)
    assert dx is not None and dx.dtype == dtype
    np.testing.assert_array_equal(dx, [0.0, 1.0, 0.0])


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0, 3.0])
def test_leaky_relu_slope_is_exactly_one_or_alpha(alpha: float) -> None:
    x = np.array([-2.0, 0.0, 0.5, 7.0, np.nan])
    out, _ = OPS["leaky_relu"].forward(x, alpha=alpha)
    np.testing.assert_array_equal(out, [-2.0 * alpha, 0.0, 0.5, 7.0, np.nan])
    (dx,) = only_grad("leaky_relu", x, alpha=alpha)
    np.testing.assert_array_equal(dx, [alpha, alpha, 1.0, 1.0, alpha])


def only_grad_with(op_name: str, dout: Array, *operands: Array) -> tuple[Any, ...]:
    op = OPS[op_name]
    _, cache = op.forward(*operands)
    with np.errstate(invalid="ignore"):  # as graph.backward runs every op
        return tuple(op.backward(dout, cache))


# --- all_finite: one read, exact ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "values",
    [
        [1.0, -2.0, 3.0],
        [1.0, np.nan, 3.0],
        [1.0, np.inf, 3.0],
        [-np.inf, np.inf],  # inf - inf: the sum alone would be NaN either way
        [3e38, 3e38, -3e38],  # finite, but the squares (float32 and float64 alike) overflow
        [1e200, -1e200],
    ],
)
def test_all_finite_matches_isfinite(dtype: type, values: list[float]) -> None:
    with np.errstate(over="ignore"):
        x = np.array(values).astype(dtype)  # 1e200 is inf in float32
    expected = bool(np.isfinite(x).all())
    assert all_finite(x) is expected
    assert all_finite(x.reshape(-1, 1)[::-1]) is expected  # not contiguous
    assert all_finite(x[0]) is bool(np.isfinite(x[0]))  # 0-d


# --- sigmoid's one-division form --------------------------------------------------------

SIGMOID_EDGES = [0.0, -0.0, 1.0, -1.0, 1e-320, -1e-320, 1e-160, -1e-160, 36.7, -36.7]
SIGMOID_EDGES += [700.0, -700.0]
SIGMOID_EDGES += [800.0, -800.0, 1e154, 1e155, -1e200, 1e308, math.inf, -math.inf, math.nan]


def two_quotient_sigmoid(x: np.ndarray) -> np.ndarray:
    """The textbook stable form: both quotients, then np.where picks one per element."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_is_the_two_quotient_form_bit_for_bit(dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate((rng.normal(0, 20, 10_000), rng.normal(0, 1e-3, 1000), SIGMOID_EDGES))
    with np.errstate(all="ignore"):
        x = x.astype(dtype)  # float32: the huge edges become infinities
        out, _ = sigmoid_forward(x)
        assert out.dtype == dtype
        assert out.tobytes() == two_quotient_sigmoid(x).tobytes()
        for value in x[-len(SIGMOID_EDGES) :]:  # 0-d operands, as a single node has them
            scalar, _ = sigmoid_forward(np.asarray(value))
            assert np.asarray(scalar).tobytes() == two_quotient_sigmoid(np.asarray(value)).tobytes()
