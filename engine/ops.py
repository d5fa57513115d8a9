"""The op table: every op's forward and backward, side by side, and all an op's meta.

Each op is a pair of functions in the style of the CS231n `layers.py`:

    out, cache = <op>_forward(*operands, **attrs)
    d_operands = <op>_backward(dout, cache)  # one gradient per operand (None: none)

`dout` has the shape of `out`. A backward may return a gradient with the *broadcast* shape of
the op; the executor sums it back to each operand's shape (`unbroadcast`), so the ops stay as
short as their formulas. No backward writes into `dout`: gradients may be shared between
nodes (a fork hands the same array to both operands).

At kinks the rules follow PyTorch so results can be checked against it: relu'(0) = 0,
abs'(0) = 0, leaky_relu'(0) = alpha, and a tie in max/min splits the gradient equally.
relu(NaN) is NaN, as in PyTorch, and a gradient a gate blocks stays 0 even when it is inf.

`OPS` is the only place that knows what an op does: its arity, its attrs (their types and
meanings; defaults are the forward's own keyword defaults), its shape rule, its cost, its
kink (for gradcheck), how it routes gradient (the lecture's gate words), and how the executor
may run it. The wire schemas, `GET /v1/ops`, gradcheck and the executor all read it; adding
an op is one `Op(...)` row here plus its row in the tests' gradient-check table.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gradiag.engine import conv

# re-exported: most modules take the array types from here, with the ops
from gradiag.engine.arrays import SMALL as SMALL
from gradiag.engine.arrays import Array as Array
from gradiag.engine.arrays import Shape as Shape
from gradiag.engine.arrays import all_finite as all_finite
from gradiag.engine.errors import ShapeError, ValueDomainError

Cache = Any
Grads = tuple[Array | None, ...]
Needs = tuple[bool, ...]
# Where a centred difference is not a derivative: the sign of operand 0 ("x": relu, abs) or
# of operand 0 - operand 1 ("a-b": a max/min tie).
Kink = Literal["x", "a-b"]
# How an activation's units go bad: "dies" (relu: its input <= 0 blocks the gradient),
# "leaks" (leaky_relu: the same test, but alpha still passes), "saturates" (its output
# within eps of one of its `bounds`).
Gate = Literal["dies", "leaks", "saturates"]


def elementwise_flops(ins: Sequence[Shape], out: Shape, **attrs: Any) -> int:
    """One operation per output element (the default cost)."""
    return math.prod(out)


def no_scratch(ins: Sequence[Shape], out: Shape, **attrs: Any) -> int:
    """Elements an op allocates beyond its output: none for most ops."""
    return 0


@dataclass(frozen=True)
class Attr:
    """One setting of an op: its type as the wire takes it (a Python annotation the schemas
    turn into a field) and its meaning. The default is the forward's keyword default."""

    kind: Any
    doc: str


@dataclass(frozen=True)
class Op:
    """One entry of the table. `shape` infers the output shape before anything is computed,
    so that shape errors and size limits are found before a large allocation."""

    name: str
    arity: int
    meaning: str
    forward: Callable[..., tuple[Array, Cache]]
    backward: Callable[..., Grads]  # (dout, cache), or (dout, cache, needs) with takes_needs
    shape: Callable[..., Shape]
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    # How the op routes gradient, in the CS231n notes' words (used to explain gates).
    role: str = ""
    # Floating-point operations of forward + backward, from operand and output shapes.
    flops: Callable[..., int] = elementwise_flops
    # Elements of temporaries beyond the output (im2col's columns), for the memory estimate.
    scratch: Callable[..., int] = no_scratch
    # Where a centred difference crosses a kink (gradcheck leaves such elements out).
    kink: Kink | None = None
    # Forward and backward work element by element (no axes, no reductions), so the executor
    # may run many same-op scalar nodes of a topological level as one call on 1-D arrays.
    batches: bool = False
    # The backward returns `dout * d` per operand, `d` made from the cache alone: then for a
    # finite g, backward(g) is g times backward(1) (relu's np.where may give +0 where the
    # product gives -0, which adds the same), and the executor takes those derivatives once
    # for all batched nodes and multiplies. div, log, sqrt and reciprocal divide or scale
    # twice (g / b, -g * out * out): their derivative as one number can underflow (-1/x^2 at
    # x = 1e200) or overflow (1/x at a subnormal x) where the product would not.
    scales: bool = False
    # The backward takes a third argument `needs` (one bool per operand) and returns None for
    # an operand that needs no gradient (a const, a batch nobody reads the gradient of), so
    # the executor skips work like matmul's d(input), a full matmul of its own.
    takes_needs: bool = False
    # The op has weights among its operands (matmul, affine): a relu feeding one, on some
    # path to the output, is a hidden unit; one that does not is a margin (a hinge's max).
    weighted: bool = False
    # An activation's diagnostics: how its units go bad, and a saturating one's bounds.
    gate: Gate | None = None
    bounds: tuple[float, float] | None = None

    def attr_defaults(self) -> dict[str, Any]:
        """Each attr's default: the forward's own keyword default."""
        params = inspect.signature(self.forward).parameters
        return {name: params[name].default for name in self.attrs}


# --- shape rules ------------------------------------------------------------------------


def same_shape(x: Shape, **attrs: Any) -> Shape:
    """Elementwise unary ops; their attrs (leaky_relu's alpha) do not change the shape."""
    return x


def broadcast_shape(a: Shape, b: Shape) -> Shape:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise ShapeError(f"shapes {list(a)} and {list(b)} do not broadcast") from None


def _normalize_axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < ndim:
            raise ShapeError(f"axis {ax} is out of range for a tensor of rank {ndim}")
    normalized = tuple(sorted(ax % ndim for ax in axes)) if ndim else ()
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"axis {list(axes)} names an axis twice")
    return normalized


def reduce_shape(
    x: Shape, axis: int | Sequence[int] | None = None, keepdims: bool = False
) -> Shape:
    axes = _normalize_axes(axis, len(x))
    if keepdims:
        return tuple(1 if i in axes else n for i, n in enumerate(x))
    return tuple(n for i, n in enumerate(x) if i not in axes)


def _transpose_axes(ndim: int, axes: Sequence[int] | None) -> tuple[int, ...]:
    if axes is None:
        return tuple(reversed(range(ndim)))
    in_range = all(-ndim <= ax < ndim for ax in axes)
    if not in_range or sorted(ax % ndim for ax in axes) != list(range(ndim)):
        raise ShapeError(f"axes {list(axes)} is not a permutation of the {ndim} axes")
    return tuple(ax % ndim for ax in axes)


def transpose_shape(x: Shape, axes: Sequence[int] | None = None) -> Shape:
    return tuple(x[i] for i in _transpose_axes(len(x), axes))


def affine_shape(x: Shape, W: Shape, b: Shape) -> Shape:
    """x (N, D), W (D, M), b (M,) -> (N, M)."""
    if len(x) != 2:
        raise ShapeError(f"x must be a matrix (N, D), got shape {list(x)}")
    if len(W) != 2 or W[0] != x[1]:
        raise ShapeError(
            f"W must be (D, M) with D = {x[1]}, the columns of x {list(x)}; got shape {list(W)}"
        )
    if b != W[1:]:
        raise ShapeError(
            f"b must be (M,) = {list(W[1:])}, one per column of W; got shape {list(b)}"
        )
    return (x[0], W[1])


def affine_flops(ins: Sequence[Shape], out: Shape, **attrs: Any) -> int:
    return (2 * ins[0][1] + 1) * math.prod(out)  # the matmul, then one add per output


def matmul_shape(a: Shape, b: Shape) -> Shape:
    """NumPy's matmul rules: 1-D operands are promoted to a row (a) or a column (b)."""
    if not a or not b:
        raise ShapeError("matmul needs operands of rank 1 or more, not scalars")
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ShapeError(f"matmul of {list(a)} and {list(b)}: inner sizes {a2[-1]} != {b2[-2]}")
    batch = broadcast_shape(a2[:-2], b2[:-2])
    out = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def matmul_flops(ins: Sequence[Shape], out: Shape, **attrs: Any) -> int:
    inner = ins[0][-1]
    return 2 * inner * max(1, math.prod(out))


def scalar_loss_shape(scores: Shape, targets: Shape) -> Shape:
    broadcast_shape(scores, targets)
    return ()


def class_loss_shape(scores: Shape, labels: Shape) -> Shape:
    if len(scores) != 2:
        raise ShapeError(f"scores must be (N, C), got {list(scores)}")
    if labels != scores[:1]:
        raise ShapeError(f"labels must be (N,) = {[scores[0]]}, one per row, got {list(labels)}")
    if scores[1] == 0:
        raise ShapeError("scores need at least one class")
    return ()


# --- elementwise binary ops -------------------------------------------------------------


def add_forward(a: Array, b: Array) -> tuple[Array, Cache]:
    return a + b, None


def add_backward(dout: Array, cache: Cache) -> Grads:
    return dout, dout


def sub_forward(a: Array, b: Array) -> tuple[Array, Cache]:
    return a - b, None


def sub_backward(dout: Array, cache: Cache) -> Grads:
    return dout, -dout


def mul_forward(a: Array, b: Array) -> tuple[Array, Cache]:
    return a * b, (a, b)


def mul_backward(dout: Array, cache: Cache) -> Grads:
    a, b = cache
    return dout * b, dout * a


def div_forward(a: Array, b: Array) -> tuple[Array, Cache]:
    out = a / b
    return out, (b, out)


def div_backward(dout: Array, cache: Cache) -> Grads:
    b, out = cache
    da = dout / b
    return da, -da * out


def pow_forward(base: Array, exponent: Array) -> tuple[Array, Cache]:
    out = base**exponent
    return out, (base, exponent, out)


def pow_backward(dout: Array, cache: Cache) -> Grads:
    base, exponent, out = cache
    # PyTorch: d/dbase is 0 where exponent == 0; d/dexponent is 0 where base == 0, exponent >= 0.
    dbase = np.where(exponent == 0, 0.0, exponent * base ** (exponent - 1))
    dexponent = np.where((base == 0) & (exponent >= 0), 0.0, out * np.log(base))
    return dout * dbase, dout * dexponent


def _pick_forward(a: Array, b: Array, larger: bool) -> tuple[Array, Cache]:
    wins = a > b if larger else a < b
    ties = a == b
    # The winner takes the gradient; a tie splits it equally (PyTorch's maximum/minimum).
    share_a = np.where(wins, 1.0, np.where(ties, 0.5, 0.0)).astype(np.result_type(a, b), copy=False)
    return (np.maximum(a, b) if larger else np.minimum(a, b)), share_a


def max_forward(a: Array, b: Array) -> tuple[Array, Cache]:
    return _pick_forward(a, b, larger=True)


def min_forward(a: Array, b: Array) -> tuple[Array, Cache]:
    return _pick_forward(a, b, larger=False)


def pick_backward(dout: Array, share_a: Cache) -> Grads:
    return dout * share_a, dout * (1.0 - share_a)


# --- elementwise unary ops --------------------------------------------------------------


def identity_forward(x: Array) -> tuple[Array, Cache]:
    return x, None


def identity_backward(dout: Array, cache: Cache) -> Grads:
    return (dout,)


def neg_forward(x: Array) -> tuple[Array, Cache]:
    return -x, None


def neg_backward(dout: Array, cache: Cache) -> Grads:
    return (-dout,)


def exp_forward(x: Array) -> tuple[Array, Cache]:
    out = np.exp(x)
    return out, out


def exp_backward(dout: Array, out: Cache) -> Grads:
    return (dout * out,)


def log_forward(x: Array) -> tuple[Array, Cache]:
    return np.log(x), x


def log_backward(dout: Array, x: Cache) -> Grads:
    return (dout / x,)


def sqrt_forward(x: Array) -> tuple[Array, Cache]:
    out = np.sqrt(x)
    return out, out


def sqrt_backward(dout: Array, out: Cache) -> Grads:
    return (dout * 0.5 / out,)


def square_forward(x: Array) -> tuple[Array, Cache]:
    return x * x, x


def square_backward(dout: Array, x: Cache) -> Grads:
    # dout * d, as PyTorch: (dout * 2.0) * x overflowed for dout > max / 2 where the product
    # is finite; 2.0 * x overflows only for |x| > max / 2, where x * x is inf already
    return (dout * (2.0 * x),)


def abs_forward(x: Array) -> tuple[Array, Cache]:
    return np.abs(x), x


def abs_backward(dout: Array, x: Cache) -> Grads:
    return (dout * np.sign(x),)  # sign(0) = 0: abs'(0) = 0


def reciprocal_forward(x: Array) -> tuple[Array, Cache]:
    out = 1.0 / x
    return out, out


def reciprocal_backward(dout: Array, out: Cache) -> Grads:
    return (-dout * out * out,)


def relu_forward(x: Array) -> tuple[Array, Cache]:
    # np.maximum, not np.where on the mask: ~8x faster on a random mask (no branches), and NaN
    # propagates as in PyTorch. The output is the cache: backward reads where it is > 0.
    out = np.maximum(x, 0.0)
    return out, out


def relu_backward(dout: Array, out: Cache) -> Grads:
    passes = out > 0  # relu'(0) = 0; a NaN passes no gradient
    if dout.size <= SMALL:  # one call; the multiply below needs its finiteness check too
        return (np.where(passes, dout, 0.0),)
    dx = dout * passes
    if not all_finite(dx):  # inf * 0 is NaN: a blocked inf or NaN upstream must give 0
        dx = np.where(passes, dout, 0.0).astype(dout.dtype, copy=False)
    return (dx,)


def leaky_relu_forward(x: Array, alpha: float = 0.01) -> tuple[Array, Cache]:
    slope = np.array(x > 0, dtype=x.dtype)  # 1 where x > 0, else 0 (leaky_relu'(0) = alpha)
    if 0 <= alpha <= 1:  # max(mask, alpha) is exactly 1 or alpha, ~6x faster than np.where
        np.maximum(slope, alpha, out=slope)
    else:
        slope = np.where(slope > 0, 1.0, alpha).astype(x.dtype, copy=False)
    return x * slope, slope


def leaky_relu_backward(dout: Array, slope: Cache) -> Grads:
    return (dout * slope,)


def sigmoid_forward(x: Array) -> tuple[Array, Cache]:
    # exp(-|x|) never overflows; 1 / (1 + e) for x >= 0 and e / (1 + e) below are the stable
    # forms. One division with the numerator picked by a maximum (e <= 1, so max(e, 1) is 1
    # and max(e, 0) is e), not np.where over both quotients: the same numbers, ~40% faster.
    e = np.exp(-np.abs(x))
    out = (np.maximum(e, x >= 0) / (1.0 + e)).astype(x.dtype, copy=False)
    return out, out


def sigmoid_backward(dout: Array, out: Cache) -> Grads:
    return (dout * (out * (1.0 - out)),)


def tanh_forward(x: Array) -> tuple[Array, Cache]:
    out = np.tanh(x)
    return out, out


def tanh_backward(dout: Array, out: Cache) -> Grads:
    return (dout * (1.0 - out * out),)


# --- linear algebra and reductions ------------------------------------------------------


def matmul_forward(a: Array, b: Array) -> tuple[Array, Cache]:
    return np.matmul(a, b), (a, b)


def matmul_backward(dout: Array, cache: Cache, needs: Needs = (True, True)) -> Grads:
    """a: (..., n, k) or (k,); b: (..., k, m) or (k,); dout: the matmul's output shape.

    1-D operands are promoted as NumPy promotes them, the 2-D rule is applied
    (da = dout @ b.T, db = a.T @ dout), and the promotion is undone. An operand whose
    `needs` is False gets None and costs nothing."""
    a, b = cache
    a2 = a[np.newaxis, :] if a.ndim == 1 else a
    b2 = b[:, np.newaxis] if b.ndim == 1 else b
    dout2 = dout
    if b.ndim == 1:
        dout2 = dout2[..., np.newaxis]
    if a.ndim == 1:
        dout2 = dout2[..., np.newaxis, :]
    da = db = None
    if needs[0]:
        da = unbroadcast(np.matmul(dout2, np.swapaxes(b2, -1, -2)), a2.shape).reshape(a.shape)
    if needs[1]:
        db = unbroadcast(np.matmul(np.swapaxes(a2, -1, -2), dout2), b2.shape).reshape(b.shape)
    return da, db


def affine_forward(x: Array, W: Array, b: Array) -> tuple[Array, Cache]:
    """x: (N, D); W: (D, M); b: (M,) -> out (N, M) = x @ W + b (CS231n's affine layer)."""
    out = np.matmul(x, W)
    out += b  # in place: the matmul's output is fresh, so the bias costs no second (N, M)
    return out, (x, W)


def affine_backward(dout: Array, cache: Cache, needs: Needs = (True, True, True)) -> Grads:
    """dout: (N, M) -> dx (N, D) = dout @ W.T, dW (D, M) = x.T @ dout, db (M,) = dout summed
    over the rows. An operand whose `needs` is False gets None: the input batch's dx is a
    full (N, M) x (M, D) matmul that nobody reads unless the report returns it."""
    x, W = cache
    dx = np.matmul(dout, W.T) if needs[0] else None
    dW = np.matmul(x.T, dout) if needs[1] else None
    db = dout.sum(axis=0) if needs[2] else None
    return dx, dW, db


def unbroadcast(grad: Array, shape: Shape) -> Array:
    """Sum a gradient of a broadcast shape back to the operand's `shape`: the leading axes
    broadcasting added, and the axes it stretched from 1."""
    grad = np.asarray(grad)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return np.broadcast_to(grad, shape) if grad.shape != shape else grad


def transpose_forward(x: Array, axes: Sequence[int] | None = None) -> tuple[Array, Cache]:
    order = _transpose_axes(x.ndim, axes)
    return np.transpose(x, order), order


def transpose_backward(dout: Array, order: Cache) -> Grads:
    return (np.transpose(dout, np.argsort(order)),)


def sum_forward(
    x: Array, axis: int | Sequence[int] | None = None, keepdims: bool = False
) -> tuple[Array, Cache]:
    axes = _normalize_axes(axis, x.ndim)
    return np.sum(x, axis=axes, keepdims=keepdims), (x.shape, axes, keepdims)


def sum_backward(dout: Array, cache: Cache) -> Grads:
    shape, axes, keepdims = cache
    if not keepdims:
        dout = np.expand_dims(dout, axes)
    return (np.broadcast_to(dout, shape),)


def mean_forward(
    x: Array, axis: int | Sequence[int] | None = None, keepdims: bool = False
) -> tuple[Array, Cache]:
    axes = _normalize_axes(axis, x.ndim)
    count = math.prod(x.shape[i] for i in axes)
    return np.sum(x, axis=axes, keepdims=keepdims) / count, (x.shape, axes, keepdims, count)


def mean_backward(dout: Array, cache: Cache) -> Grads:
    shape, axes, keepdims, count = cache
    (dx,) = sum_backward(dout, (shape, axes, keepdims))
    assert dx is not None
    return (dx / count,)


# --- softmax along one axis --------------------------------------------------------------


def softmax_shape(x: Shape, axis: int = -1) -> Shape:
    """x of rank >= 1 -> x's shape; `axis` in [-rank, rank) and not of size 0."""
    if not x:
        raise ShapeError("softmax needs a tensor of rank 1 or more, not a scalar")
    (ax,) = _normalize_axes(axis, len(x))
    if x[ax] == 0:
        raise ShapeError(f"softmax along axis {axis} of size 0 (shape {list(x)})")
    return x


def softmax_forward(x: Array, axis: int = -1) -> tuple[Array, Cache]:
    """x: any shape (rank >= 1) -> exp(x) / sum(exp(x)) along `axis`, with the max shifted
    out (no overflow). The output is the cache: backward needs nothing else."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    out = e / np.sum(e, axis=axis, keepdims=True)
    return out, (out, axis)


def softmax_backward(dout: Array, cache: Cache) -> Grads:
    """dx = s * (dout - sum(dout * s)) along the axis (the softmax Jacobian, applied)."""
    s, axis = cache
    return (s * (dout - np.sum(dout * s, axis=axis, keepdims=True)),)


def log_softmax_forward(x: Array, axis: int = -1) -> tuple[Array, Cache]:
    """x: any shape (rank >= 1) -> x - log(sum(exp(x))) along `axis`, the max shifted out."""
    shifted = x - np.max(x, axis=axis, keepdims=True)
    out = shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    return out, (out, axis)


def log_softmax_backward(dout: Array, cache: Cache) -> Grads:
    """dx = dout - softmax * sum(dout) along the axis (softmax = exp of the output)."""
    out, axis = cache
    return (dout - np.exp(out) * np.sum(dout, axis=axis, keepdims=True),)


def softmax_flops(ins: Sequence[Shape], out: Shape, axis: int = -1) -> int:
    """Forward: max, shift, exp, sum, divide; backward: a product, a sum and two passes."""
    return 9 * math.prod(out)


def softmax_scratch(ins: Sequence[Shape], out: Shape, axis: int = -1) -> int:
    """The shifted copy (or exp) beside the output, and one product in backward."""
    return 2 * math.prod(out)


# --- losses: (scores, targets) -> scalar ------------------------------------------------


def mse_forward(scores: Array, targets: Array) -> tuple[Array, Cache]:
    """Mean over all elements of (scores - targets)^2."""
    diff = scores - targets
    return np.mean(diff * diff), diff


def mse_backward(dout: Array, diff: Cache) -> Grads:
    dscores = dout * (2.0 / diff.size) * diff
    return dscores, -dscores


def bad_class_label(labels: Array, classes: int) -> int | None:
    """The index of the first label that is not an integer class in [0, classes), or None."""
    with np.errstate(invalid="ignore"):
        good = np.isfinite(labels) & (labels == np.round(labels)) & (labels >= 0)
        good &= labels < classes
    return None if good.all() else int(np.argmin(good))


def _class_labels(scores: Array, labels: Array) -> Array:
    """The labels as class indices. A label is good when its cast to an integer gives it
    back and lands in [0, classes) (a negative one wraps to a huge unsigned value); the
    first bad one is found only when there is one."""
    classes = scores.shape[1]
    with np.errstate(invalid="ignore"):  # NaN and inf cast to some integer: != the label
        y = labels.astype(np.intp)
        good = (y == labels) & (y.view(np.uintp) < classes)
    if not np.logical_and.reduce(good, axis=None):
        bad = bad_class_label(labels, classes)
        assert bad is not None
        raise ValueDomainError(
            f"label {float(labels[bad])!r} at row {bad} is not an integer class in [0, {classes})"
        )
    return y


def softmax_cross_entropy_forward(scores: Array, labels: Array) -> tuple[Array, Cache]:
    """scores: (N, C); labels: (N,) integer classes. Mean over rows of -log softmax[label]:
    log softmax = shifted - log(sum(exp(shifted))), shifted = scores - their row's max."""
    y = _class_labels(scores, labels)
    rows = np.arange(scores.shape[0])
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    log_probs = shifted[rows, y] - np.log(sums[:, 0])  # only the labels' entries
    loss = -np.mean(log_probs)
    exp /= sums  # the softmax, for the backward
    return loss, (exp, rows, y)


def softmax_cross_entropy_backward(dout: Array, cache: Cache) -> Grads:
    probs, rows, y = cache
    dscores = probs.copy()
    dscores[rows, y] -= 1.0
    return dout * dscores / len(rows), None


def svm_hinge_forward(scores: Array, labels: Array) -> tuple[Array, Cache]:
    """scores: (N, C); labels: (N,). Mean over rows of sum_{j != y} max(0, s_j - s_y + 1).
    With one class (C = 1) the binary hinge: labels in {-1, +1}, mean of max(0, 1 - y s)
    (micrograd's demo loss)."""
    if scores.shape[1] == 1:
        return binary_hinge_forward(scores, labels)
    y = _class_labels(scores, labels)
    rows = np.arange(scores.shape[0])
    margins = np.maximum(0.0, scores - scores[rows, y][:, np.newaxis] + 1.0)
    margins[rows, y] = 0.0
    return np.sum(margins) / scores.shape[0], (margins > 0, rows, y)  # margin 0: no gradient


def svm_hinge_backward(dout: Array, cache: Cache) -> Grads:
    if len(cache) == 2:
        return binary_hinge_backward(dout, cache)
    positive, rows, y = cache
    dscores = positive.astype(dout.dtype)
    dscores[rows, y] = -np.sum(positive, axis=1)
    return dout * dscores / len(rows), None


def binary_hinge_forward(scores: Array, labels: Array) -> tuple[Array, Cache]:
    """scores: (N, 1); labels: (N,) in {-1, +1}. Mean over rows of max(0, 1 - y s)."""
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~((labels == 1) | (labels == -1)))
    if bad.size:
        row = int(bad[0])
        raise ValueDomainError(
            f"label {float(labels[row])!r} at row {row} is not -1 or +1 (one output: the "
            "binary hinge)"
        )
    margins = 1.0 - labels * scores[:, 0]
    loss = np.asarray(np.mean(np.maximum(0.0, margins)))
    return loss, (margins > 0, labels)  # margin 0: no gradient


def binary_hinge_backward(dout: Array, cache: Cache) -> Grads:
    violated, labels = cache
    dscores = np.where(violated, -labels, 0.0)[:, np.newaxis] / len(labels)
    return (dout * dscores).astype(labels.dtype, copy=False), None


def logits_loss_shape(scores: Shape, targets: Shape) -> Shape:
    """Targets of the scores' shape, or (N,) for scores (N, 1)."""
    if targets != scores and not (len(scores) == 2 and scores[1] == 1 and targets == scores[:1]):
        raise ShapeError(
            f"targets must have the scores' shape {list(scores)} (or (N,) for one unit), "
            f"got {list(targets)}"
        )
    return ()


def bce_with_logits_forward(scores: Array, targets: Array) -> tuple[Array, Cache]:
    """Binary cross-entropy on raw scores, mean over elements, computed stably:
    max(s, 0) - s y + log(1 + exp(-|s|))."""
    y = targets.reshape(scores.shape)
    losses = np.maximum(scores, 0.0) - scores * y + np.log1p(np.exp(-np.abs(scores)))
    return np.mean(losses), (scores, y, targets.shape)


def bce_with_logits_backward(dout: Array, cache: Cache) -> Grads:
    """d/ds = (sigmoid(s) - y) / n; d/dy = -s / n."""
    scores, y, target_shape = cache
    s, _ = sigmoid_forward(scores)
    dscores = dout * (s - y) / scores.size
    dtargets = (dout * -scores / scores.size).reshape(target_shape)
    return dscores, dtargets


# --- the table --------------------------------------------------------------------------

_DISTRIBUTES = "add gate: distributes the gradient unchanged to every input"
_SWAPS = "mul gate: scales each input's gradient by the other input (swap)"
_ROUTES = "max gate: routes the whole gradient to the larger input (a tie splits it)"
_LOCAL = "scales the gradient by its local derivative"
_AXIS = Attr(int | list[int] | None, "the axes to reduce (default: all)")
_KEEPDIMS = Attr(bool, "keep reduced axes with size 1")
_PAIR = int | list[int]
_SOFTMAX_AXIS = Attr(int, "the axis the probabilities sum to 1 along")

_TABLE: list[Op] = [
    Op("add", 2, "a + b (broadcasting)", add_forward, add_backward, broadcast_shape,
       role=_DISTRIBUTES, batches=True, scales=True),
    Op("sub", 2, "a - b (broadcasting)", sub_forward, sub_backward, broadcast_shape,
       role="sub gate: passes the gradient to a unchanged and negated to b", batches=True,
       scales=True),
    Op("mul", 2, "a * b elementwise (broadcasting)", mul_forward, mul_backward, broadcast_shape,
       role=_SWAPS, batches=True, scales=True),
    Op("div", 2, "a / b (broadcasting)", div_forward, div_backward, broadcast_shape,
       role="div gate: da = g / b, db = -g * a / b^2", batches=True),
    Op("pow", 2, "base ** exponent (broadcasting)", pow_forward, pow_backward, broadcast_shape,
       role=_LOCAL, batches=True),
    Op("max", 2, "elementwise maximum of a and b", max_forward, pick_backward, broadcast_shape,
       role=_ROUTES, kink="a-b", batches=True, scales=True),
    Op("min", 2, "elementwise minimum of a and b", min_forward, pick_backward, broadcast_shape,
       role="min gate: routes the whole gradient to the smaller input (a tie splits it)",
       kink="a-b", batches=True, scales=True),
    Op("identity", 1, "x unchanged (a linear layer's activation)", identity_forward,
       identity_backward, same_shape, role="passes the gradient through unchanged",
       batches=True, scales=True),
    Op("neg", 1, "-x", neg_forward, neg_backward, same_shape, role="negates the gradient",
       batches=True, scales=True),
    Op("exp", 1, "e ** x", exp_forward, exp_backward, same_shape, role=_LOCAL, batches=True,
       scales=True),
    Op("log", 1, "natural logarithm", log_forward, log_backward, same_shape, role=_LOCAL,
       batches=True),
    Op("sqrt", 1, "square root", sqrt_forward, sqrt_backward, same_shape, role=_LOCAL,
       batches=True),
    Op("square", 1, "x * x", square_forward, square_backward, same_shape, role=_LOCAL,
       batches=True, scales=True),
    Op("abs", 1, "|x| (abs'(0) = 0)", abs_forward, abs_backward, same_shape, role=_LOCAL,
       kink="x", batches=True, scales=True),
    Op("reciprocal", 1, "1 / x", reciprocal_forward, reciprocal_backward, same_shape,
       role=_LOCAL, batches=True),
    Op("relu", 1, "max(0, x) (relu'(0) = 0)", relu_forward, relu_backward, same_shape,
       role="relu gate: passes the gradient where x > 0 and blocks it elsewhere", kink="x",
       batches=True, scales=True, gate="dies"),
    Op("leaky_relu", 1, "x if x > 0 else alpha * x", leaky_relu_forward, leaky_relu_backward,
       same_shape, attrs={"alpha": Attr(float, "the slope for x <= 0")},
       role="passes the gradient where x > 0 and scales it by alpha elsewhere", kink="x",
       batches=True, scales=True, gate="leaks"),
    Op("sigmoid", 1, "1 / (1 + e^-x), computed stably", sigmoid_forward, sigmoid_backward,
       same_shape, role="sigmoid gate: scales the gradient by s * (1 - s)", batches=True,
       scales=True, gate="saturates", bounds=(0.0, 1.0)),
    Op("tanh", 1, "hyperbolic tangent", tanh_forward, tanh_backward, same_shape,
       role="tanh gate: scales the gradient by 1 - t^2", batches=True, scales=True,
       gate="saturates", bounds=(-1.0, 1.0)),
    Op("matmul", 2, "matrix product a @ b (NumPy rules)", matmul_forward, matmul_backward,
       matmul_shape, flops=matmul_flops,
       role="matmul gate: da = g @ b.T, db = a.T @ g (each input scaled by the other: swap)",
       takes_needs=True, weighted=True),
    Op("affine", 3, "x @ W + b: x (N, D), W (D, M), b (M,) added to every row (a layer)",
       affine_forward, affine_backward, affine_shape, flops=affine_flops,
       role="affine gate: dx = g @ W.T, dW = x.T @ g, db = g summed over the rows",
       takes_needs=True, weighted=True),
    Op("transpose", 1, "reverses the axes (or permutes them by attrs.axes)", transpose_forward,
       transpose_backward, transpose_shape,
       attrs={"axes": Attr(list[int] | None, "a permutation of the axes (default: reversed)")},
       role="transposes the gradient back"),
    Op("sum", 1, "sum over attrs.axis (all axes by default)", sum_forward, sum_backward,
       reduce_shape, attrs={"axis": _AXIS, "keepdims": _KEEPDIMS},
       role="sum gate: copies the gradient to every summed element"),
    Op("mean", 1, "mean over attrs.axis (all axes by default)", mean_forward, mean_backward,
       reduce_shape, attrs={"axis": _AXIS, "keepdims": _KEEPDIMS},
       role="mean gate: copies the gradient / count to every averaged element"),
    Op("softmax", 1, "exp(x) / sum(exp(x)) along attrs.axis (default the last), stably",
       softmax_forward, softmax_backward, softmax_shape, attrs={"axis": _SOFTMAX_AXIS},
       flops=softmax_flops, scratch=softmax_scratch,
       role="softmax gate: dx = s * (g - sum(g * s)) along the axis"),
    Op("log_softmax", 1, "x - log(sum(exp(x))) along attrs.axis (default the last), stably",
       log_softmax_forward, log_softmax_backward, softmax_shape, attrs={"axis": _SOFTMAX_AXIS},
       flops=softmax_flops, scratch=softmax_scratch,
       role="log-softmax gate: dx = g - softmax * sum(g) along the axis"),
    Op("mse", 2, "loss: mean over all elements of (scores - targets)^2", mse_forward,
       mse_backward, scalar_loss_shape, role="loss: d/dscores = 2 (scores - targets) / n"),
    Op("softmax_cross_entropy", 2,
       "loss: mean over rows of -log softmax(scores)[label]; labels (N,) integer classes",
       softmax_cross_entropy_forward, softmax_cross_entropy_backward, class_loss_shape,
       role="loss: d/dscores = (softmax - onehot) / N; labels get no gradient"),
    Op("svm_hinge", 2,
       "loss: mean over rows of sum over wrong classes of max(0, s_j - s_label + 1); with "
       "one class, the binary hinge mean(max(0, 1 - y s)), labels in {-1, +1}",
       svm_hinge_forward, svm_hinge_backward, class_loss_shape,
       role="loss: +1 per violated margin, -count at the label, / N; labels get no gradient"),
    Op("conv2d", 3, "2-D cross-correlation x (N, C, H, W) with W (F, C, kh, kw) plus b (F,), "
       "NCHW as PyTorch", conv.conv2d_forward, conv.conv2d_backward, conv.conv2d_shape,
       attrs={"stride": Attr(_PAIR, "the filter's step: an int or [sh, sw]"),
              "padding": Attr(_PAIR, "zeros on each side of H and W: an int or [ph, pw]")},
       flops=conv.conv2d_flops, scratch=conv.conv2d_scratch, takes_needs=True, weighted=True,
       role="conv gate: dx = the filters slid back over the gradient, dW = the gradient "
       "against the input windows, db = the gradient summed per filter"),
    Op("maxpool2d", 1, "the maximum of each kh x kw window of x (N, C, H, W)",
       conv.maxpool2d_forward, conv.maxpool2d_backward, conv.maxpool2d_shape,
       attrs={"kernel": Attr(_PAIR, "the window: an int or [kh, kw]"),
              "stride": Attr(_PAIR | None, "the window's step (default: the kernel)"),
              "padding": Attr(_PAIR, "cells of -inf on each side of H and W")},
       flops=conv.maxpool2d_flops, scratch=conv.maxpool2d_scratch,
       role="max gate: routes each window's gradient to its first maximum"),
    Op("avgpool2d", 1, "the mean of each kh x kw window of x (N, C, H, W)",
       conv.avgpool2d_forward, conv.avgpool2d_backward, conv.avgpool2d_shape,
       attrs={"kernel": Attr(_PAIR, "the window: an int or [kh, kw]"),
              "stride": Attr(_PAIR | None, "the window's step (default: the kernel)"),
              "padding": Attr(_PAIR, "cells of zero on each side of H and W"),
              "count_include_pad": Attr(bool, "divide by kh*kw where a window covers padding "
                                        "too (PyTorch); false: by its real cells (ONNX)")},
       flops=conv.avgpool2d_flops, scratch=conv.avgpool2d_scratch,
       role="mean gate: shares each window's gradient equally among its cells"),
    Op("batchnorm", 3, "train mode: x (N, C) or (N, C, H, W) normalised per channel with "
       "the batch's mean and biased variance, then gamma * xhat + beta",
       conv.batchnorm_forward, conv.batchnorm_backward, conv.batchnorm_shape,
       attrs={"eps": Attr(float, "added to the batch variance")},
       flops=conv.batchnorm_flops, scratch=conv.batchnorm_scratch,
       role="normalisation gate: removes the gradient's per-channel mean and its component "
       "along xhat, scaled by gamma / std"),
    Op("batchnorm_eval", 5, "eval mode: x normalised per channel with running_mean and "
       "running_var (the 4th and 5th inputs), then gamma * xhat + beta",
       conv.batchnorm_eval_forward, conv.batchnorm_eval_backward, conv.batchnorm_eval_shape,
       attrs={"eps": Attr(float, "added to running_var")},
       flops=conv.batchnorm_eval_flops, scratch=conv.batchnorm_eval_scratch,
       role="scales the gradient by gamma / std per channel"),
    Op("flatten", 1, "x as a matrix: the axes before attrs.axis become the rows, the rest "
       "the columns (C, H, W order)", conv.flatten_forward, conv.flatten_backward,
       conv.flatten_shape, attrs={"axis": Attr(int, "the first axis of the columns")},
       flops=conv.flatten_flops, scratch=conv.flatten_scratch,
       role="reshapes the gradient back"),
    Op("reshape", 1, "x with the same elements in attrs.shape (C order, one -1 inferred)",
       conv.reshape_forward, conv.reshape_backward, conv.reshape_shape,
       attrs={"shape": Attr(list[int], "the new shape; one entry may be -1")},
       flops=conv.reshape_flops, scratch=conv.reshape_scratch,
       role="reshapes the gradient back"),
    Op("bce_with_logits", 2,
       "loss: mean over elements of binary cross-entropy on raw scores; targets in [0, 1], "
       "the scores' shape or (N,) for one unit",
       bce_with_logits_forward, bce_with_logits_backward, logits_loss_shape,
       role="loss: d/dscores = (sigmoid(scores) - targets) / n"),
]  # fmt: skip

OPS: dict[str, Op] = {op.name: op for op in _TABLE}

# Leaves hold a value instead of computing one. Only `const` gets no gradient.
LEAF_OPS: dict[str, str] = {
    "input": "a variable: gets a gradient",
    "param": "a learnable variable: gets a gradient and counts in `parameters`",
    "const": "a constant: no gradient",
}
MAX_ARITY = max(op.arity for op in _TABLE)
