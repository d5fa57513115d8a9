"""The convolutional ops of engine/conv.py: by hand, against centred differences, against a
second formula (hypothesis), against PyTorch's recorded answers, and their shape errors.

PyTorch's answers are fixtures (tests/fixtures/oracle/ops, written by `make oracle
ORACLE_ARGS=ops` from bench/oracle/ops.py); this file never imports torch.
"""

from __future__ import annotations

import json
import math
import re
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradiag.engine import conv
from gradiag.engine.errors import ShapeError
from gradiag.engine.ops import OPS as TABLE
from gradiag.engine.ops import Array

Shape = tuple[int, ...]
Attrs = dict[str, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oracle" / "ops"
OPS = sorted(name for name, op in TABLE.items() if op.forward.__module__ == conv.__name__)
FUNCTIONS = ("forward", "backward", "shape", "flops", "scratch")


def fn(op: str, kind: str) -> Callable[..., Any]:
    function: Callable[..., Any] = getattr(conv, f"{op}_{kind}")
    return function


def run(op: str, operands: Sequence[Array], dout: Array | None = None, **attrs: Any) -> Any:
    """(out, grads) for dout (default ones)."""
    out, cache = fn(op, "forward")(*operands, **attrs)
    grads = fn(op, "backward")(np.ones(out.shape) if dout is None else dout, cache)
    return out, grads


def rel_error(a: Array, b: Array) -> float:
    """CS231n's relative error: max |a - b| / max(1e-8, |a| + |b|)."""
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def test_every_op_has_its_functions_attrs_meaning_and_role() -> None:
    assert set(OPS) == {
        "conv2d",
        "maxpool2d",
        "avgpool2d",
        "batchnorm",
        "batchnorm_eval",
        "flatten",
        "reshape",
    }
    for op in OPS:
        for kind in FUNCTIONS:
            assert callable(fn(op, kind)), f"{op}_{kind}"
        row = TABLE[op]
        assert row.meaning and row.role and all(attr.doc for attr in row.attrs.values())


# --- by hand ----------------------------------------------------------------------------


def test_conv2d_one_channel_3x3_input_with_a_2x2_kernel_by_hand() -> None:
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    W = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    b = np.array([1.0])
    out, (dx, dW, db) = run("conv2d", (x, W, b))
    # out[i, j] = x[i, j] + 2 x[i, j+1] + 3 x[i+1, j] + 4 x[i+1, j+1] + 1
    row0 = [1 + 4 + 12 + 20 + 1, 2 + 6 + 15 + 24 + 1]
    row1 = [4 + 10 + 21 + 32 + 1, 5 + 12 + 24 + 36 + 1]
    np.testing.assert_array_equal(out[0, 0], [row0, row1])
    # dW[i, j]: the sum of the inputs that weight i, j saw; db: one per output
    dW_rows = [[1 + 2 + 4 + 5, 2 + 3 + 5 + 6], [4 + 5 + 7 + 8, 5 + 6 + 8 + 9]]
    np.testing.assert_array_equal(dW[0, 0], dW_rows)
    np.testing.assert_array_equal(db, [4.0])
    # dx: every weight that touched the cell (the centre is in all four windows)
    np.testing.assert_array_equal(dx[0, 0], [[1, 1 + 2, 2], [1 + 3, 10, 2 + 4], [3, 3 + 4, 4]])


def test_conv2d_padding_stride_and_channels_by_hand() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    ones = np.ones((1, 1, 3, 3))
    out, _ = run("conv2d", (x, ones, np.zeros(1)), padding=1)
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), 10.0))  # each window sees all 4
    grid = np.arange(9.0).reshape(1, 1, 3, 3)
    out, (dx, _, _) = run("conv2d", (grid, np.full((1, 1, 1, 1), 2.0), np.zeros(1)), stride=2)
    np.testing.assert_array_equal(out, [[[[0.0, 4.0], [12.0, 16.0]]]])  # the corners, doubled
    np.testing.assert_array_equal(dx, [[[[2, 0, 2], [0, 0, 0], [2, 0, 2]]]])
    two = np.stack([grid[0, 0], -grid[0, 0]])[np.newaxis]  # (1, 2, 3, 3)
    out, _ = run("conv2d", (two, np.array([1.0, 10.0]).reshape(1, 2, 1, 1), np.zeros(1)))
    np.testing.assert_array_equal(out, -9.0 * grid)  # channels summed: x0 + 10 x1


def test_maxpool_tie_sends_the_whole_gradient_to_the_first_maximum() -> None:
    out, (dx,) = run("maxpool2d", (np.ones((1, 1, 2, 2)),))
    np.testing.assert_array_equal(out, [[[[1.0]]]])
    np.testing.assert_array_equal(dx, [[[[1.0, 0.0], [0.0, 0.0]]]])
    x = np.array([[[[0.0, 7.0], [7.0, 7.0]]]])
    _, (dx,) = run("maxpool2d", (x,))
    np.testing.assert_array_equal(dx, [[[[0.0, 1.0], [0.0, 0.0]]]])  # row-major order


def test_overlapping_max_windows_accumulate_on_a_shared_winner() -> None:
    x = np.array([[[[1.0, 3.0, 2.0, 5.0, 5.0]]]])  # windows [1,3] [3,2] [2,5] [5,5]
    out, (dx,) = run(
        "maxpool2d", (x,), np.array([[[[1.0, 10.0, 100.0, 1000.0]]]]), kernel=[1, 2], stride=1
    )
    np.testing.assert_array_equal(out, [[[[3.0, 3.0, 5.0, 5.0]]]])
    np.testing.assert_array_equal(dx, [[[[0.0, 11.0, 0.0, 1100.0, 0.0]]]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_windows_apart_send_each_gradient_to_the_window_maximum_in_the_dtype(dtype: type) -> None:
    # stride >= kernel: each window's gradient is stored at its winner (no overlap to add up);
    # a -0.0 arrives as 0.0, the sum 0 + dout that PyTorch (and the overlapping path) take
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(dtype)
    dout = np.random.default_rng(4).standard_normal((2, 3, 2, 2)).astype(dtype)
    dout[0, 0, 0, 0] = -0.0
    _, (dx,) = run("maxpool2d", (x,), dout, kernel=3)
    tiles = x.reshape(2, 3, 2, 3, 2, 3).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 2, 2, 9)
    first = tiles.argmax(axis=-1)  # row-major: the first maximum of each window
    expected = np.zeros((2, 3, 2, 2, 9), dtype)
    np.put_along_axis(expected, first[..., np.newaxis], dout[..., np.newaxis], axis=-1)
    expected = expected.reshape(2, 3, 2, 2, 3, 3).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, expected + 0.0)
    assert not np.signbit(dx[dx == 0]).any()  # no -0.0, the winner of dout[0, 0, 0, 0] included


def test_maxpool_window_of_minus_infinities_sends_its_gradient_to_its_first_real_cell() -> None:
    # PyTorch never reads the padding: the -inf pad does not win over real -inf cells
    x = np.full((1, 1, 4, 4), -np.inf)
    out, (dx,) = run("maxpool2d", (x,), kernel=3, stride=2, padding=1)
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), -np.inf))
    expected = np.zeros((4, 4))
    expected[[0, 0, 1, 1], [0, 1, 0, 1]] = 1.0  # first real cells of the four windows
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_maxpool_nan_wins_and_the_last_nan_takes_the_gradient_as_in_pytorch() -> None:
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 0, 2] = x[0, 0, 1, 0] = x[0, 0, 1, 3] = np.nan
    with np.errstate(all="ignore"):  # as the graph runs every op: NaN is data
        out, (dx,) = run("maxpool2d", (x,))
    np.testing.assert_array_equal(out, [[[[np.nan, np.nan]]]])
    np.testing.assert_array_equal(dx, [[[[0, 0, 0, 0], [1, 0, 0, 1]]]])


def test_avgpool_with_padding_in_both_count_modes_by_hand() -> None:
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    out, (dx,) = run("avgpool2d", (x,), kernel=2, stride=1, padding=1)
    np.testing.assert_array_equal(out[0, 0], np.array([[1, 3, 2], [4, 10, 6], [3, 7, 4]]) / 4)
    np.testing.assert_array_equal(dx, np.ones_like(x))  # four windows, a quarter from each
    out, (dx,) = run("avgpool2d", (x,), kernel=2, stride=1, padding=1, count_include_pad=False)
    np.testing.assert_array_equal(out[0, 0], [[1, 1.5, 2], [2, 2.5, 3], [3, 3.5, 4]])
    np.testing.assert_array_equal(dx, np.full_like(x, 1 + 0.5 + 0.5 + 0.25))  # 1, 2, 2, 4 cells


def test_batchnorm_output_has_mean_0_and_variance_1_per_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 5, 4)) * np.array([1.0, 50.0, 0.01]).reshape(1, 3, 1, 1) + 7
    out, _ = run("batchnorm", (x, np.ones(3), np.zeros(3)))
    var = x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-14)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), var / (var + 1e-5), rtol=1e-12)
    gamma, beta = np.array([2.0, -1.0, 0.5]), np.array([1.0, 2.0, 3.0])
    out, (dx, _, _) = run("batchnorm", (x, gamma, beta), rng.standard_normal(x.shape))
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), beta, rtol=1e-13)
    np.testing.assert_allclose(dx.sum(axis=(0, 2, 3)), 0.0, atol=1e-9)  # the mean is removed


def test_batchnorm_of_a_matrix_normalises_each_column_over_the_rows() -> None:
    x = np.array([[1.0, 10.0], [3.0, 14.0]])
    out, (dx, dgamma, dbeta) = run("batchnorm", (x, np.ones(2), np.zeros(2)), eps=0.0)
    np.testing.assert_array_equal(out, [[-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(dbeta, [2.0, 2.0])
    np.testing.assert_array_equal(dgamma, [0.0, 0.0])
    np.testing.assert_array_equal(dx, np.zeros((2, 2)))  # a uniform gradient is normalised away


def test_batchnorm_eval_by_hand() -> None:
    x = np.array([[1.0], [5.0]])
    args = (x, np.array([3.0]), np.array([1.0]), np.array([1.0]), np.array([4.0]))
    out, (dx, dgamma, dbeta, dmean, dvar) = run("batchnorm_eval", args, eps=0.0)
    np.testing.assert_array_equal(out, [[1.0], [7.0]])  # 3 * (x - 1) / 2 + 1
    np.testing.assert_array_equal(dx, [[1.5], [1.5]])
    np.testing.assert_array_equal(dgamma, [2.0])
    np.testing.assert_array_equal(dbeta, [2.0])
    np.testing.assert_array_equal(dmean, [-3.0])  # -gamma / std * 2
    np.testing.assert_array_equal(dvar, [-3.0 / 8.0 * 2.0])  # -gamma / (2 var) * dgamma


def test_flatten_and_reshape_keep_c_order() -> None:
    x = np.arange(24.0).reshape(2, 3, 2, 2)
    out, (dx,) = run("flatten", (x,), np.arange(24.0).reshape(2, 12))
    np.testing.assert_array_equal(out, x.reshape(2, 12))  # torch.flatten(x, 1): C, H, W
    np.testing.assert_array_equal(dx, x)
    out, _ = run("flatten", (x,), axis=0)
    assert out.shape == (1, 24)
    out, _ = run("flatten", (x,), axis=-1)  # counted from the back, as ONNX
    assert out.shape == (12, 2)
    out, (dx,) = run("reshape", (x,), shape=[4, -1])
    np.testing.assert_array_equal(out, np.arange(24.0).reshape(4, 6))
    assert dx.shape == x.shape


# --- centred differences ----------------------------------------------------------------


@dataclass(frozen=True)
class GradCase:
    op: str
    shapes: tuple[Shape, ...]
    attrs: Attrs = field(default_factory=dict)
    spread: bool = False  # values spaced 0.1 apart: no max ties, no winner change within H
    positive: tuple[int, ...] = ()  # operands drawn from [0.5, 2] (running_var)

    @property
    def id(self) -> str:
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.op}{list(self.shapes[0])}{attrs}".replace(" ", "")


def _conv_case(x: Shape, W: Shape, **attrs: Any) -> GradCase:
    return GradCase("conv2d", (x, W, (W[0],)), attrs)


def _bn_cases(x: Shape) -> list[GradCase]:
    c = (x[1],)
    return [
        GradCase("batchnorm", (x, c, c)),
        GradCase("batchnorm_eval", (x, c, c, c, c), positive=(4,)),
    ]


POOL_3X3_S1_P1: Attrs = {"kernel": 3, "stride": 1, "padding": 1}
POOL_4X4_S3_P2: Attrs = {"kernel": 4, "stride": 3, "padding": 2}

GRAD_CASES = [
    _conv_case((2, 2, 5, 5), (3, 2, 3, 3)),
    _conv_case((2, 2, 5, 6), (3, 2, 3, 3), padding=1),
    _conv_case((1, 2, 7, 6), (2, 2, 3, 3), stride=2, padding=1),
    _conv_case((1, 2, 4, 5), (2, 2, 2, 3), padding=2),
    _conv_case((2, 1, 7, 5), (2, 1, 3, 2), stride=[2, 1], padding=[0, 1]),
    _conv_case((1, 3, 6, 6), (2, 3, 1, 1), stride=2),
    _conv_case((1, 2, 3, 3), (2, 2, 3, 3)),  # the kernel covers the whole input
    GradCase("maxpool2d", ((2, 2, 6, 6),), spread=True),
    GradCase("maxpool2d", ((1, 2, 5, 6),), {"kernel": 3, "stride": 1, "padding": 1}, True),
    GradCase("maxpool2d", ((1, 2, 7, 7),), {"kernel": 3, "stride": 2, "padding": 1}, True),
    GradCase("maxpool2d", ((1, 2, 5, 7),), {"kernel": [2, 3], "stride": [1, 2]}, True),
    GradCase("maxpool2d", ((1, 1, 5, 5),), {"kernel": 2, "stride": 1, "padding": 1}, True),
    GradCase("avgpool2d", ((2, 2, 6, 6),)),
    GradCase("avgpool2d", ((1, 2, 5, 6),), {"kernel": 3, "stride": 1, "padding": 1}),
    GradCase(
        "avgpool2d",
        ((1, 2, 5, 6),),
        {"kernel": 3, "stride": 1, "padding": 1, "count_include_pad": False},
    ),
    GradCase("avgpool2d", ((1, 2, 7, 7),), {"kernel": [3, 2], "stride": [2, 1], "padding": 1}),
    GradCase(
        "avgpool2d",
        ((1, 1, 8, 8),),
        {"kernel": 4, "stride": 3, "padding": 2, "count_include_pad": False},
    ),
    *_bn_cases((6, 3)),
    *_bn_cases((3, 2, 3, 4)),
    *_bn_cases((4, 2, 5)),
    GradCase("batchnorm", ((2, 2, 2, 2), (2,), (2,)), {"eps": 0.1}),
    GradCase("flatten", ((2, 3, 2, 2),)),
    GradCase("flatten", ((2, 3, 2, 2),), {"axis": 2}),
    GradCase("reshape", ((2, 3, 4),), {"shape": [-1, 6]}),
    GradCase("reshape", ((2, 3, 4),), {"shape": [4, 3, 2]}),
]


def draw_operands(case: GradCase, rng: np.random.Generator) -> list[Array]:
    operands = []
    for k, shape in enumerate(case.shapes):
        if case.spread:
            values = rng.permutation(math.prod(shape)).reshape(shape) * 0.1 - 1.0
        elif k in case.positive:
            values = rng.uniform(0.5, 2.0, shape)
        else:
            values = rng.standard_normal(shape)
        operands.append(values)
    return operands


# conv, pooling, flatten and reshape are linear in each operand, so a centred difference has
# no truncation error and its rounding error (eps * |f| / h) falls as h grows; batchnorm's
# truncation error (h^2) is ~1e-10 here. Worst relative error seen: 5e-9 at 1e-5, 5e-8 at 1e-6.
H = 1e-5


def numerical_vjp(
    f: Callable[..., Array], operands: Sequence[Array], k: int, dout: Array, h: float = H
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
        grad[idx] = np.sum(dout * (f_plus - f_minus)) / (2 * h)
    return grad


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda case: case.id)
def test_every_gradient_matches_centred_differences(case: GradCase) -> None:
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    operands = draw_operands(case, rng)
    forward = fn(case.op, "forward")
    out, cache = forward(*operands, **case.attrs)
    assert out.shape == fn(case.op, "shape")(*case.shapes, **case.attrs)
    dout = rng.standard_normal(out.shape)
    dout_before = dout.copy()
    grads = fn(case.op, "backward")(dout, cache)
    np.testing.assert_array_equal(dout, dout_before)  # backward never writes into dout
    assert len(grads) == len(operands)

    def f(*xs: Array) -> Array:
        return np.asarray(forward(*xs, **case.attrs)[0])

    for k, (x, grad) in enumerate(zip(operands, grads, strict=True)):
        assert grad is not None and grad.shape == x.shape
        numeric = numerical_vjp(f, operands, k, dout)
        assert rel_error(grad, numeric) <= 1e-7, f"d operand {k}: {rel_error(grad, numeric)}"


def test_conv2d_needs_skips_exactly_the_unwanted_gradients() -> None:
    rng = np.random.default_rng(5)
    x, W, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), np.ones(4)
    out, cache = conv.conv2d_forward(x, W, b, padding=1)
    dout = rng.standard_normal(out.shape)
    full = conv.conv2d_backward(dout, cache)
    for skipped in range(3):
        needs = tuple(k != skipped for k in range(3))
        partial = conv.conv2d_backward(dout, cache, needs)
        for k, (got, want) in enumerate(zip(partial, full, strict=True)):
            if k == skipped:
                assert got is None
            else:
                np.testing.assert_array_equal(got, want)


# --- invariants and a second formula (hypothesis) ---------------------------------------


@dataclass(frozen=True)
class Geometry:
    n: int
    c: int
    size: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    seed: int

    @property
    def out_size(self) -> tuple[int, int]:
        return (
            (self.size[0] + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1,
            (self.size[1] + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1,
        )


@st.composite
def geometries(draw: Draw, pool: bool = False) -> Geometry:
    """Random windows: padding up to half the kernel for pools (PyTorch's rule), up to 2 for
    conv; inputs at least as large as the kernel once padded."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = (draw(st.integers(0, k // 2 if pool else 2)) for k in (kh, kw))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 8)), draw(st.integers(max(1, kw - 2 * pw), 8))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    n, c, seed = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 2**32 - 1))
    return Geometry(n, c, (h, w), (kh, kw), stride, (ph, pw), seed)


def patches(x: Array, g: Geometry, fill: float) -> list[Array]:
    """Each kernel offset's (N, C, Ho, Wo) patch of x padded with `fill`, row-major."""
    (ph, pw), (sh, sw), (ho, wo) = g.padding, g.stride, g.out_size
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    return [
        xp[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
        for i in range(g.kernel[0])
        for j in range(g.kernel[1])
    ]


def reference_conv2d(x: Array, W: Array, b: Array, g: Geometry) -> Array:
    """The same cross-correlation written a second time: one einsum per kernel offset."""
    kw = g.kernel[1]
    out = sum(
        np.einsum("nchw,fc->nfhw", patch, W[:, :, t // kw, t % kw])
        for t, patch in enumerate(patches(x, g, 0.0))
    )
    return np.asarray(out) + b.reshape(1, -1, 1, 1)


def conv_operands(g: Geometry, filters: int = 2) -> tuple[Array, Array, Array, Attrs]:
    rng = np.random.default_rng(g.seed)
    x = rng.standard_normal((g.n, g.c, *g.size))
    W = rng.standard_normal((filters, g.c, *g.kernel))
    attrs: Attrs = {"stride": list(g.stride), "padding": list(g.padding)}
    return x, W, rng.standard_normal(filters), attrs


@settings(max_examples=60, deadline=None)
@given(g=geometries())
def test_conv2d_matches_a_second_formula_and_its_backward_is_its_adjoint(g: Geometry) -> None:
    x, W, b, attrs = conv_operands(g)
    out, cache = conv.conv2d_forward(x, W, b, **attrs)
    assert out.shape == conv.conv2d_shape(x.shape, W.shape, b.shape, **attrs)
    np.testing.assert_allclose(out, reference_conv2d(x, W, b, g), rtol=1e-12, atol=1e-12)
    dout = np.random.default_rng(g.seed + 1).standard_normal(out.shape)
    dx, dW, db = conv.conv2d_backward(dout, cache)
    assert dx is not None and dW is not None and db is not None
    # <conv(x) - b, dout> = <x, dx> = <W, dW>: the backward is the forward's transpose
    inner = np.sum((out - b.reshape(1, -1, 1, 1)) * dout)
    assert np.sum(x * dx) == pytest.approx(inner, rel=1e-10, abs=1e-10)
    assert np.sum(W * dW) == pytest.approx(inner, rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(db, dout.sum(axis=(0, 2, 3)), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(g=geometries(), a=st.floats(-3.0, 3.0))
def test_conv2d_is_linear_in_x_and_in_W(g: Geometry, a: float) -> None:
    x, W, _, attrs = conv_operands(g)
    x2, W2, _, _ = conv_operands(replace(g, seed=g.seed + 7))
    zero = np.zeros(W.shape[0])

    def c(x: Array, W: Array) -> Array:
        return np.asarray(conv.conv2d_forward(x, W, zero, **attrs)[0])

    np.testing.assert_allclose(c(a * x + x2, W), a * c(x, W) + c(x2, W), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(c(x, a * W + W2), a * c(x, W) + c(x, W2), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(g=geometries(pool=True))
def test_maxpool_is_the_window_maximum_and_conserves_the_gradient(g: Geometry) -> None:
    rng = np.random.default_rng(g.seed)
    x = rng.integers(-3, 4, (g.n, g.c, *g.size)).astype(np.float64)  # many ties
    attrs: Attrs = {"kernel": list(g.kernel), "stride": list(g.stride), "padding": list(g.padding)}
    out, cache = conv.maxpool2d_forward(x, **attrs)
    np.testing.assert_array_equal(out, np.max(patches(x, g, -np.inf), axis=0))
    dout = rng.standard_normal(out.shape)
    (dx,) = conv.maxpool2d_backward(dout, cache)
    assert dx is not None
    assert dx.sum() == pytest.approx(dout.sum(), rel=1e-12, abs=1e-12)  # each window, one cell
    assert np.count_nonzero(dx) <= out.size


@settings(max_examples=60, deadline=None)
@given(g=geometries(pool=True), include=st.booleans(), value=st.floats(-1.7e308, 1.7e308))
def test_avgpool_matches_a_second_formula_and_keeps_a_constant(
    g: Geometry, include: bool, value: float
) -> None:
    attrs: Attrs = {
        "kernel": list(g.kernel),
        "stride": list(g.stride),
        "padding": list(g.padding),
        "count_include_pad": include,
    }
    x = np.random.default_rng(g.seed).standard_normal((g.n, g.c, *g.size))
    out, cache = conv.avgpool2d_forward(x, **attrs)
    real = np.sum(patches(np.ones_like(x), g, 0.0), axis=0)  # real cells per window
    divisor = math.prod(g.kernel) if include else real
    np.testing.assert_allclose(out, np.sum(patches(x, g, 0.0), axis=0) / divisor, rtol=1e-12)
    dout = np.random.default_rng(g.seed + 1).standard_normal(out.shape)
    (dx,) = conv.avgpool2d_backward(dout, cache)
    assert np.sum(x * dx) == pytest.approx(np.sum(out * dout), rel=1e-10, abs=1e-10)
    constant, _ = conv.avgpool2d_forward(np.full_like(x, value), **attrs)
    if include and any(g.padding):
        np.testing.assert_allclose(constant, value * (real / math.prod(g.kernel)), rtol=1e-12)
    else:  # the mean of a constant is that constant, even near the largest float
        np.testing.assert_allclose(constant, value, rtol=1e-14)


@st.composite
def reshapes(draw: Draw) -> tuple[Shape, Attrs, str]:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    if draw(st.booleans()):
        return shape, {"axis": draw(st.integers(-len(shape), len(shape)))}, "flatten"
    target = list(draw(st.permutations(shape)))
    target[draw(st.integers(0, len(target) - 1))] = -1
    return shape, {"shape": target}, "reshape"


@settings(max_examples=60, deadline=None)
@given(spec=reshapes())
def test_flatten_and_reshape_backward_is_the_inverse_reshape(
    spec: tuple[Shape, Attrs, str],
) -> None:
    shape, attrs, op = spec
    x = np.arange(float(math.prod(shape))).reshape(shape)
    out, cache = fn(op, "forward")(x, **attrs)
    assert out.shape == fn(op, "shape")(shape, **attrs)
    np.testing.assert_array_equal(out.ravel(), x.ravel())  # C order, nothing moved
    (dx,) = fn(op, "backward")(out, cache)
    np.testing.assert_array_equal(dx, x)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(5, 3), (4, 2, 3), (2, 3, 2, 4)]),
    seed=st.integers(0, 2**32 - 1),
    shift=st.floats(-1e6, 1e6),
)
def test_batchnorm_ignores_a_per_channel_shift(shape: Shape, seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    moved = x + shift * np.arange(1, shape[1] + 1).reshape(1, -1, *([1] * (len(shape) - 2)))
    out, _ = conv.batchnorm_forward(x, gamma, beta)
    out_moved, _ = conv.batchnorm_forward(moved, gamma, beta)
    np.testing.assert_allclose(out_moved, out, atol=1e-9 * (1 + abs(shift)))


# --- stable numerics --------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e150])
def test_batchnorm_is_scale_free_without_overflow_at_extreme_magnitudes(scale: float) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 2, 3, 3))
    gamma, beta = np.array([1.5, -2.0]), np.array([0.5, 0.0])
    dout = rng.standard_normal(x.shape)
    out, (dx, dgamma, dbeta) = run("batchnorm", (x * scale, gamma, beta), dout, eps=0.0)
    ref, (dx_ref, dgamma_ref, _) = run("batchnorm", (x, gamma, beta), dout, eps=0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)  # no warning, no inf
    np.testing.assert_allclose(dx * scale, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(dbeta, dout.sum(axis=(0, 2, 3)))


def test_batchnorm_of_values_near_the_largest_float_stays_finite() -> None:
    x = np.array([[1.5e308], [-1.5e308], [1.0e308], [0.0]])  # centred: within the range
    out, (dx, _, _) = run(
        "batchnorm", (x, np.ones(1), np.zeros(1)), np.array([[1.0], [0], [0], [0]])
    )
    assert np.isfinite(out).all() and np.isfinite(dx).all()
    np.testing.assert_allclose(out.mean(), 0.0, atol=1e-15)
    np.testing.assert_allclose(out.var(), 1.0, rtol=1e-12)


def test_nan_and_inf_propagate_as_data() -> None:
    x = np.zeros((1, 2, 4, 4))
    x[0, 0, 0, 0] = np.nan
    x[0, 1, 3, 3] = np.inf
    with np.errstate(all="ignore"):  # as the graph runs every op
        out, (dx, dW, _) = run("conv2d", (x, np.ones((1, 2, 2, 2)), np.zeros(1)))
        assert np.isnan(out[0, 0, 0, 0]) and out[0, 0, 2, 2] == np.inf
        assert np.isfinite(out[0, 0, 1, 1]) and np.isnan(dW).any()
        assert np.isfinite(dx).all()
        out, _ = run("avgpool2d", (x,))
        assert np.isnan(out[0, 0, 0, 0]) and out[0, 1, 1, 1] == np.inf
        assert np.isfinite(out[0, 0, 1, 1])
        out, (dx, _, _) = run("batchnorm", (x, np.ones(2), np.zeros(2)))
        assert np.isnan(out[0, 0]).all() and np.isnan(out[0, 1]).all()
        out, _ = run("batchnorm_eval", (x, *[np.ones(2)] * 4))
        assert np.isnan(out[0, 0, 0, 0]) and np.isfinite(out[0, 0, 1, 1])
    # a negative running variance is data too, even outside the graph's errstate
    out, (_, _, _, _, dvar) = run(
        "batchnorm_eval", (np.ones((2, 1)), *[np.ones(1)] * 3, -np.ones(1))
    )
    assert np.isnan(out).all() and np.isnan(dvar).all()


EMPTY_CASES: list[tuple[str, tuple[Shape, ...], Attrs]] = [
    ("conv2d", ((0, 3, 5, 5), (4, 3, 3, 3), (4,)), {}),
    ("conv2d", ((2, 3, 5, 5), (0, 3, 3, 3), (0,)), {}),
    ("conv2d", ((2, 0, 5, 5), (4, 0, 3, 3), (4,)), {"padding": 1}),
    ("maxpool2d", ((0, 3, 4, 4),), {}),
    ("maxpool2d", ((2, 0, 4, 4),), {"kernel": 3, "stride": 1, "padding": 1}),
    ("avgpool2d", ((0, 3, 4, 4),), {"padding": 1}),
    ("batchnorm", ((4, 0, 3, 3), (0,), (0,)), {}),
    ("batchnorm_eval", ((0, 3), (3,), (3,), (3,), (3,)), {}),
    ("flatten", ((0, 3, 2),), {}),
    ("reshape", ((0, 3),), {"shape": [3, 0]}),
]


@pytest.mark.parametrize(("op", "shapes", "attrs"), EMPTY_CASES)
def test_empty_batches_and_channels_give_empty_answers(
    op: str, shapes: tuple[Shape, ...], attrs: Attrs
) -> None:
    out, grads = run(op, [np.ones(shape) for shape in shapes], **attrs)
    assert out.shape == fn(op, "shape")(*shapes, **attrs)
    assert [g.shape for g in grads] == list(shapes)


# --- PyTorch's answers (tests/fixtures/oracle/ops) --------------------------------------

FIXTURE_FILES = sorted(FIXTURES.glob("*.npz"))


def draw_oracle_input(rng: np.random.Generator, shape: Shape, kind: str) -> Array:
    """bench/oracle/ops.py's rule, written again here (a test never imports torch's side)."""
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "positive":
        return rng.uniform(0.5, 2.0, shape)
    assert kind == "ties", kind
    return rng.integers(-2, 3, shape).astype(np.float64)


def test_pytorch_fixtures_cover_every_op() -> None:
    ops = {str(np.load(path)["op"]) for path in FIXTURE_FILES}
    assert ops == set(OPS), "run `make oracle ORACLE_ARGS=ops` and commit its output"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda path: path.stem)
def test_forward_and_every_gradient_match_pytorch(path: Path) -> None:
    fixture = np.load(path)
    op, attrs = str(fixture["op"]), json.loads(str(fixture["attrs"]))
    shapes, kinds = json.loads(str(fixture["shapes"])), json.loads(str(fixture["kinds"]))
    rng = np.random.default_rng(int(fixture["seed"]))
    operands = [draw_oracle_input(rng, tuple(s), k) for s, k in zip(shapes, kinds, strict=True)]
    np.testing.assert_allclose(
        [v.sum() for v in operands],
        fixture["input_sums"],
        rtol=1e-14,
        err_msg="NumPy drew other inputs than the oracle did",
    )
    out, cache = fn(op, "forward")(*operands, **attrs)
    dout = rng.standard_normal(out.shape)
    grads = fn(op, "backward")(dout, cache)
    answers = [("out", out)] + [(f"grad_{k}", g) for k, g in enumerate(grads)]
    assert len(grads) == len(operands) == sum(key.startswith("grad_") for key in fixture.files)
    for key, ours in answers:
        torch_answer = fixture[key]
        assert ours.shape == torch_answer.shape, key
        scale = float(np.max(np.abs(torch_answer), initial=0.0))
        np.testing.assert_allclose(ours, torch_answer, rtol=1e-10, atol=1e-10 * scale, err_msg=key)


# --- float32 ----------------------------------------------------------------------------

FLOAT32_CASES = [
    case
    for case in GRAD_CASES
    if case.op != "maxpool2d" or case.attrs  # one maxpool of each kind is enough
]


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda case: case.id)
def test_float32_stays_float32_and_agrees_with_float64(case: GradCase) -> None:
    rng = np.random.default_rng(11)
    operands = draw_operands(case, rng)
    out64, cache64 = fn(case.op, "forward")(*operands, **case.attrs)
    dout = rng.standard_normal(out64.shape)
    grads64 = fn(case.op, "backward")(dout, cache64)
    out32, cache32 = fn(case.op, "forward")(*(v.astype(np.float32) for v in operands), **case.attrs)
    grads32 = fn(case.op, "backward")(dout.astype(np.float32), cache32)
    for name, got, want in [("out", out32, out64)] + [
        (f"d{k}", g32, g64) for k, (g32, g64) in enumerate(zip(grads32, grads64, strict=True))
    ]:
        assert got.dtype == np.float32, name
        scale = float(np.max(np.abs(want), initial=1.0))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


# --- shape errors -----------------------------------------------------------------------

X, W3, B = (2, 3, 5, 5), (4, 3, 3, 3), (4,)  # a valid conv2d: x, W, b
CONV = (X, W3, B)


def _err(op: str, shapes: tuple[Shape, ...], attrs: Attrs, message: str) -> Any:
    return pytest.param(op, shapes, attrs, message, id=message[:60])


SHAPE_ERRORS = [
    _err("conv2d", ((2, 3, 5), W3, B), {}, "conv2d: x must be (N, C, H, W), got shape [2, 3, 5]"),
    _err("conv2d", (X, (4, 3, 3), B), {}, "W must be (F, C, kh, kw), got shape [4, 3, 3]"),
    _err(
        "conv2d",
        (X, (4, 2, 3, 3), B),
        {},
        "W has 2 input channels (shape [4, 2, 3, 3]) but x has 3 (shape [2, 3, 5, 5])",
    ),
    _err("conv2d", (X, W3, (3,)), {}, "b must be (F,) = [4], one per filter of W; got shape [3]"),
    _err("conv2d", (X, W3, (4, 1)), {}, "b must be (F,) = [4], one per filter of W"),
    _err(
        "conv2d",
        ((2, 3, 2, 5), W3, B),
        {},
        "kernel 3x3 is larger than the padded input 2x5 (input 2x5, padding [0, 0])",
    ),
    _err(
        "conv2d",
        ((2, 3, 1, 1), (4, 3, 4, 4), B),
        {"padding": 1},
        "kernel 4x4 is larger than the padded input 3x3 (input 1x1, padding [1, 1])",
    ),
    _err("conv2d", (X, (4, 3, 0, 3), B), {}, "kernel must be at least 1 on each axis, got [0, 3]"),
    _err(
        "conv2d", CONV, {"stride": 0}, "conv2d: stride must be at least 1 on each axis, got [0, 0]"
    ),
    _err(
        "conv2d", CONV, {"stride": [1, -2]}, "stride must be at least 1 on each axis, got [1, -2]"
    ),
    _err("conv2d", CONV, {"padding": -1}, "padding must be 0 or more on each axis, got [-1, -1]"),
    _err(
        "conv2d",
        CONV,
        {"padding": [1, 2, 3]},
        "conv2d: padding must be an int or a pair [height, width] of ints, got [1, 2, 3]",
    ),
    _err(
        "conv2d", CONV, {"stride": 1.5}, "conv2d: stride must be an int or a pair [height, width]"
    ),
    _err("conv2d", CONV, {"stride": True}, "stride must be an int or a pair [height, width]"),
    _err("maxpool2d", ((2, 3, 5),), {}, "maxpool2d: x must be (N, C, H, W), got shape [2, 3, 5]"),
    _err("maxpool2d", (X,), {"kernel": 0}, "maxpool2d: kernel must be at least 1 on each axis"),
    _err("maxpool2d", (X,), {"kernel": 6}, "maxpool2d: kernel 6x6 is larger than the padded input"),
    _err(
        "maxpool2d",
        (X,),
        {"kernel": 3, "padding": 2},
        "padding [2, 2] must be at most half the kernel [3, 3] on each axis",
    ),
    _err("maxpool2d", (X,), {"stride": 0}, "maxpool2d: stride must be at least 1 on each axis"),
    _err(
        "avgpool2d",
        ((2, 3, 1, 5),),
        {"kernel": [2, 1]},
        "avgpool2d: kernel 2x1 is larger than the padded input 1x5",
    ),
    _err("avgpool2d", (X,), {"padding": -1}, "avgpool2d: padding must be 0 or more on each axis"),
    _err(
        "avgpool2d",
        (X,),
        {"count_include_pad": 1},
        "count_include_pad must be true or false, got 1",
    ),
    _err(
        "batchnorm",
        ((4,), (4,), (4,)),
        {},
        "batchnorm: x must be (N, C) or (N, C, H, W) (channels on axis 1), got shape [4]",
    ),
    _err(
        "batchnorm",
        ((2, 3, 4, 4), (4,), (3,)),
        {},
        "gamma must be (C,) = [3], one per channel of x (shape [2, 3, 4, 4]); got shape [4]",
    ),
    _err("batchnorm", ((2, 3), (3,), (3, 1)), {}, "batchnorm: beta must be (C,) = [3]"),
    _err(
        "batchnorm",
        ((1, 3), (3,), (3,)),
        {},
        "needs more than one value per channel for its batch statistics; x of shape [1, 3] has 1",
    ),
    _err("batchnorm", ((1, 3, 1, 1), (3,), (3,)), {}, "x of shape [1, 3, 1, 1] has 1"),
    _err(
        "batchnorm",
        ((2, 3), (3,), (3,)),
        {"eps": -1.0},
        "batchnorm: eps must be a finite number >= 0, got -1.0",
    ),
    _err(
        "batchnorm_eval",
        ((2, 3), (3,), (3,), (3,), (2,)),
        {},
        "batchnorm_eval: running_var must be (C,) = [3]",
    ),
    _err("batchnorm_eval", ((2, 3), (3,), (3,), (4,), (3,)), {}, "running_mean must be (C,) = [3]"),
    _err(
        "batchnorm_eval",
        ((2, 3), (3,), (3,), (3,), (3,)),
        {"eps": math.nan},
        "eps must be a finite number >= 0, got nan",
    ),
    _err(
        "flatten",
        ((2, 3, 4),),
        {"axis": 4},
        "flatten: axis must be an int in [-3, 3] for x of shape [2, 3, 4], got 4",
    ),
    _err("flatten", ((2, 3, 4),), {"axis": -4}, "axis must be an int in [-3, 3]"),
    _err(
        "reshape",
        ((2, 3, 4),),
        {"shape": [5, -1]},
        "x with shape [2, 3, 4] (24 elements) into [5, -1]: 24 is not a multiple of 5",
    ),
    _err("reshape", ((2, 3),), {"shape": [4, 2]}, "into [4, 2] (8 elements): the sizes differ"),
    _err(
        "reshape",
        ((2, 3),),
        {"shape": [-1, -1]},
        "reshape: at most one size may be -1 (inferred), got [-1, -1]",
    ),
    _err("reshape", ((2, 3),), {"shape": [2, -3]}, "sizes must be -1 or at least 0, got [2, -3]"),
    _err(
        "reshape",
        ((2, 3),),
        {"shape": [0, -1]},
        "into [0, -1]: -1 cannot be inferred beside a size of 0",
    ),
    _err("reshape", ((2, 3),), {"shape": "6"}, "reshape: shape must be a list of ints, got '6'"),
    _err("reshape", ((2, 3),), {"shape": [6.0]}, "shape must be a list of ints, got [6.0]"),
]


@pytest.mark.parametrize(("op", "shapes", "attrs", "message"), SHAPE_ERRORS)
def test_shape_errors_say_what_is_wrong(
    op: str, shapes: tuple[Shape, ...], attrs: Attrs, message: str
) -> None:
    with pytest.raises(ShapeError, match=re.escape(message)):
        fn(op, "shape")(*shapes, **attrs)
    operands = [np.zeros(shape) for shape in shapes]
    with pytest.raises(ShapeError, match=re.escape(message)):  # forward checks the same
        fn(op, "forward")(*operands, **attrs)


# --- work and memory estimates ----------------------------------------------------------


def test_conv2d_flops_count_three_products_bias_and_col2im() -> None:
    # x (2, 3, 8, 8), W (4, 3, 3, 3), pad 1: out (2, 4, 8, 8); K = 27, 512 outputs
    flops = conv.conv2d_flops([(2, 3, 8, 8), (4, 3, 3, 3), (4,)], (2, 4, 8, 8), padding=1)
    assert flops == 6 * 27 * 512 + 2 * 512 + 2 * 27 * 64


SCRATCH_CASES: list[tuple[str, tuple[Shape, ...], Attrs, float]] = [
    ("conv2d", ((8, 3, 16, 16), (8, 3, 3, 3), (8,)), {}, 1.0),
    ("conv2d", ((8, 16, 16, 16), (32, 16, 3, 3), (32,)), {"padding": 1}, 1.0),
    ("conv2d", ((8, 4, 17, 16), (4, 4, 1, 1), (4,)), {"padding": 2, "stride": 3}, 1.0),
    ("maxpool2d", ((8, 16, 16, 16),), {}, 1.0),
    ("maxpool2d", ((8, 16, 16, 16),), {"kernel": 3, "stride": 1, "padding": 1}, 1.0),
    (
        "avgpool2d",
        ((8, 16, 16, 16),),
        {"kernel": 3, "stride": 1, "padding": 1, "count_include_pad": False},
        1.0,
    ),
    ("batchnorm", ((8, 16, 16, 16), (16,), (16,)), {}, 1.0),
    ("batchnorm", ((8, 16, 16, 16), (16,), (16,)), {}, 1e300),  # the scaled pass
    ("batchnorm_eval", ((8, 16, 16, 16), (16,), (16,), (16,), (16,)), {}, 1.0),
    ("flatten", ((8, 16, 16, 16),), {}, 1.0),
    ("reshape", ((8, 16, 16, 16),), {"shape": [-1, 256]}, 1.0),
]


@pytest.mark.parametrize(
    ("op", "shapes", "attrs", "scale"), SCRATCH_CASES, ids=[f"{c[0]}{c[2]}" for c in SCRATCH_CASES]
)
def test_scratch_estimate_covers_what_forward_and_backward_allocate(
    op: str, shapes: tuple[Shape, ...], attrs: Attrs, scale: float
) -> None:
    """NumPy reports its buffers to tracemalloc: the peak beyond the output and the gradients
    stays within the estimate (elements of 8 bytes)."""
    rng = np.random.default_rng(3)
    operands = [rng.uniform(0.5, 2.0, shape) * scale for shape in shapes]
    out_shape = fn(op, "shape")(*shapes, **attrs)
    dout = rng.standard_normal(out_shape)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out, cache = fn(op, "forward")(*operands, **attrs)
        grads = fn(op, "backward")(dout, cache)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert out.shape == out_shape and len(grads) == len(operands)
    own = 8 * (math.prod(out_shape) + sum(math.prod(shape) for shape in shapes))
    estimate = 8 * fn(op, "scratch")(shapes, out_shape, **attrs)
    assert peak - own <= estimate
