"""One converter per ONNX op type: each lowers the node being lowered (`ctx.current`) onto
the engine's ops, and the table `CONVERTERS` is the only place that says which op types the
front end takes. An op type without a row is refused, with every other such op type, before
anything is computed (`lower.check_supported`).

What each op type lowers to (docs/onnx.md has the same table):

    Relu, LeakyRelu, Sigmoid, Tanh   relu, leaky_relu(alpha), sigmoid, tanh
    Softmax, LogSoftmax              softmax, log_softmax along `axis` (opset 13 semantics)
    Identity, Dropout                identity (Dropout: inference; training_mode true refused)
    Add, Sub, Mul, Div, MatMul       add, sub, mul, div, matmul (NumPy's broadcasting = ONNX's)
    Gemm                             [transpose A/B] affine(A, B, C) when alpha = beta = 1 and C
                                     is (N,); else matmul, then mul by alpha, add beta * C
    Conv                             conv2d (2-D, group 1, no dilation, symmetric pads; no B:
                                     a zero bias)
    MaxPool, AveragePool             maxpool2d, avgpool2d(count_include_pad) (2-D, symmetric
                                     pads, no dilation; ceil_mode only where it changes nothing)
    GlobalAveragePool                mean over the spatial axes, keepdims
    BatchNormalization               batchnorm_eval(x, scale, B, mean, var) (training_mode 0);
                                     batchnorm(x, scale, B), batch statistics (training_mode 1)
    Flatten                          flatten(axis)
    Reshape                          reshape to the constant shape, ONNX's 0 ("copy this
                                     dimension") resolved here unless allowzero
    Transpose                        transpose(perm)
    Constant                         a const node (float) or an integer constant (read here)
    ReduceMean, ReduceSum            mean, sum over `axes` (attribute or constant input),
                                     keepdims; no axes: all (or identity, noop_with_empty_axes)

`ROLES` names, per op type, what its float initializer operands are for the report (W, b,
gamma, beta, running statistics), as /v1/network names a layer's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from gradiag.onnx_import.context import Lowering
from gradiag.onnx_import.model import tensor_array

Converter = Callable[[Lowering], None]
INTS = onnx.AttributeProto.INTS


def unary(op: str) -> Converter:
    """An elementwise op of one input, no attributes."""

    def convert(ctx: Lowering) -> None:
        ctx.emit(op, [ctx.tensor(0)])

    return convert


def binary(op: str) -> Converter:
    """add, sub, mul, div, matmul: the engine broadcasts (and unbroadcasts) as ONNX does."""

    def convert(ctx: Lowering) -> None:
        ctx.emit(op, [ctx.tensor(0), ctx.tensor(1)])

    return convert


def leaky_relu(ctx: Lowering) -> None:
    ctx.emit("leaky_relu", [ctx.tensor(0)], {"alpha": float(ctx.attr("alpha", 0.01))})


def softmax(op: str) -> Converter:
    def convert(ctx: Lowering) -> None:
        ctx.emit(op, [ctx.tensor(0)], {"axis": int(ctx.attr("axis", -1))})

    return convert


def dropout(ctx: Lowering) -> None:
    """Inference: the identity. A training_mode input that is (or may be) true is refused."""
    if ctx.has_input(2):
        training = ctx.integers(2, "Dropout's training_mode")
        if np.any(training):
            ctx.refuse("training_mode is true: dropout draws a random mask; export the model "
                       "in eval mode", "input", 2)  # fmt: skip
    ctx.emit("identity", [ctx.tensor(0)])


def gemm(ctx: Lowering) -> None:
    """Y = alpha * A' @ B' + beta * C, A' = A.T with transA, B' = B.T with transB (torch's
    Linear: transB = 1, B the weight (out, in) in its own layout)."""
    a, b, c = ctx.tensor(0), ctx.tensor(1), ctx.optional(2)
    for k, operand in enumerate((a, b)):
        if len(ctx.shape(operand)) != 2:
            ctx.refuse(f"input {k} must be a matrix, got shape {list(ctx.shape(operand))}")
    if ctx.attr("transA", 0):
        a = ctx.emit("transpose", [a])
    if ctx.attr("transB", 0):
        b = ctx.emit("transpose", [b])
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    if c is not None and alpha == beta == 1.0 and ctx.shape(c) == ctx.shape(b)[1:]:
        ctx.emit("affine", [a, b, c])  # one op, the bias added in place: /v1/network's layer
        return
    product = ctx.emit("matmul", [a, b])
    if alpha != 1.0:
        product = ctx.emit("mul", [product, ctx.constant("alpha", alpha)])
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = ctx.emit("mul", [c, ctx.constant("beta", beta)])
        ctx.emit("add", [product, c])


def _dilation_one(ctx: Lowering) -> None:
    if any(d != 1 for d in ctx.attr("dilations", [1, 1])):
        ctx.refuse(f"dilations {ctx.attr('dilations')} are not supported (only 1)", "attribute")


def _padding(
    ctx: Lowering, size_in: tuple[int, ...], kernel: list[int], stride: list[int]
) -> list[int]:
    """[ph, pw] from `pads` ([top, left, bottom, right]) or `auto_pad`; the engine pads both
    sides of an axis alike, so asymmetric padding is refused."""
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0, 0]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [
            max((math.ceil(n / s) - 1) * s + k - n, 0)
            for n, k, s in zip(size_in, kernel, stride, strict=True)
        ]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    elif auto == "NOTSET":
        pads = list(ctx.attr("pads", [0, 0, 0, 0]))
    else:
        ctx.refuse(f"auto_pad {auto!r} is not an ONNX value", "attribute")
    if len(pads) != 4 or pads[:2] != pads[2:]:
        ctx.refuse(
            f"pads {pads} are not symmetric (top = bottom, left = right): not supported",
            "attribute",
        )
    return pads[:2]


def _image(ctx: Lowering, x: str) -> tuple[int, int]:
    shape = ctx.shape(x)
    if len(shape) != 4:
        ctx.refuse(f"only 2-D windows (an input N, C, H, W) are supported; the input has shape "
                   f"{list(shape)}")  # fmt: skip
    return shape[2], shape[3]


def conv(ctx: Lowering) -> None:
    x, w = ctx.tensor(0), ctx.tensor(1)
    size_in = _image(ctx, x)
    if len(ctx.shape(w)) != 4:
        ctx.refuse(f"W must be (F, C, kh, kw), got shape {list(ctx.shape(w))}", "input", 1)
    filters, _, *kernel = ctx.shape(w)
    if ctx.attr("group", 1) != 1:
        ctx.refuse(f"group {ctx.attr('group')} is not supported (grouped or depthwise)")
    _dilation_one(ctx)
    if list(ctx.attr("kernel_shape", kernel)) != kernel:
        ctx.refuse(f"kernel_shape {ctx.attr('kernel_shape')} is not W's {kernel}", "attribute")
    stride = ctx.pair_attr("strides", 1, minimum=1)
    attrs = {"stride": stride, "padding": _padding(ctx, size_in, kernel, stride)}
    b = ctx.optional(2) or ctx.constant("zero_bias", np.zeros(filters))
    ctx.emit("conv2d", [x, w, b], attrs)


def pool(op: str) -> Converter:
    """MaxPool (padding never wins) and AveragePool (count_include_pad, default 0 in ONNX)."""

    def convert(ctx: Lowering) -> None:
        x = ctx.tensor(0)
        size_in = _image(ctx, x)
        kernel = ctx.pair_attr("kernel_shape", 0, minimum=1)
        stride = ctx.pair_attr("strides", 1, minimum=1)  # ONNX's default is 1, not the kernel
        _dilation_one(ctx)
        padding = _padding(ctx, size_in, kernel, stride)
        if ctx.attr("ceil_mode", 0) and any(
            (n + 2 * p - k) % s for n, p, k, s in zip(size_in, padding, kernel, stride, strict=True)
        ):
            ctx.refuse("ceil_mode 1 changes the output size here: not supported", "attribute")
        attrs: dict[str, Any] = {"kernel": kernel, "stride": stride, "padding": padding}
        if op == "avgpool2d":
            attrs["count_include_pad"] = bool(ctx.attr("count_include_pad", 0))
        ctx.emit(op, [x], attrs)

    return convert


def global_average_pool(ctx: Lowering) -> None:
    x = ctx.tensor(0)
    rank = len(ctx.shape(x))
    if rank < 3:
        ctx.refuse(f"the input needs spatial axes (N, C, ...), got shape {list(ctx.shape(x))}")
    ctx.emit("mean", [x], {"axis": list(range(2, rank)), "keepdims": True})


def batch_normalization(ctx: Lowering) -> None:
    """training_mode 1 (an export in train mode): the batch's own statistics, as the engine's
    `batchnorm`; the running mean and variance (initializers the output does not read) get
    a zero gradient. Otherwise the running statistics, as parameters."""
    x, scale, bias, mean, var = (ctx.tensor(k) for k in range(5))
    eps = float(ctx.attr("epsilon", 1e-5))
    if ctx.attr("training_mode", 0):
        ctx.emit("batchnorm", [x, scale, bias], {"eps": eps})
    else:
        ctx.emit("batchnorm_eval", [x, scale, bias, mean, var], {"eps": eps})


def flatten(ctx: Lowering) -> None:
    ctx.emit("flatten", [ctx.tensor(0)], {"axis": int(ctx.attr("axis", 1))})


def reshape(ctx: Lowering) -> None:
    """The shape is a constant (shapes are static here): ONNX's 0 copies the input's
    dimension at that index (unless allowzero), resolved before the engine sees it."""
    x = ctx.tensor(0)
    target = ctx.integers(1, "Reshape's shape")
    shape_in = ctx.shape(x)
    if target.ndim != 1:
        ctx.refuse(f"the shape must be a list of ints, got an array of shape {list(target.shape)}")
    copy = not ctx.attr("allowzero", 0)
    dims = [int(d) for d in target.tolist()]
    for k, d in enumerate(dims):
        if d == 0 and copy:
            if k >= len(shape_in):
                ctx.refuse(f"shape {dims} copies dimension {k}; the input has {len(shape_in)}")
            dims[k] = shape_in[k]
    ctx.emit("reshape", [x], {"shape": dims})


def transpose(ctx: Lowering) -> None:
    perm = ctx.attr("perm", kind=INTS)
    ctx.emit("transpose", [ctx.tensor(0)], {"axes": None if perm is None else list(perm)})


# Constant's value attributes other than `value` (a tensor), each as an array
_CONSTANT_VALUES: Mapping[str, tuple[int, Callable[[object], np.ndarray]]] = {
    "value_float": (onnx.AttributeProto.FLOAT, lambda v: np.asarray(v, np.float64)),
    "value_floats": (onnx.AttributeProto.FLOATS, lambda v: np.asarray(v, np.float64)),
    "value_int": (onnx.AttributeProto.INT, lambda v: np.asarray(v, np.int64)),
    "value_ints": (INTS, lambda v: np.asarray(v, np.int64)),
}


def constant(ctx: Lowering) -> None:
    """A float value is a const node (no gradient); an integer one is kept for the ops that
    read constants (Reshape's shape, axes)."""
    node = ctx.current
    given = list(node.attributes)
    if len(given) != 1 or given[0] not in ("value", *_CONSTANT_VALUES):
        ctx.refuse(f"attributes {given}: only one of value, value_float(s), value_int(s) is "
                   "supported", "attribute")  # fmt: skip
    name = given[0]
    if name == "value":
        proto = ctx.attr("value", kind=onnx.AttributeProto.TENSOR)
        ctx.check_elements(math.prod(proto.dims), f"Constant node {node.name!r}", node.loc)
        value = tensor_array(proto, f"Constant node {node.name!r}'s value",
                             (*node.loc, "attribute", "value"), node.name)  # fmt: skip
    else:
        kind, convert = _CONSTANT_VALUES[name]
        value = convert(ctx.attr(name, kind=kind))
    if value.dtype.kind == "f":
        ctx.leaf(node.outputs[0], "const", value.astype(ctx.dtype), node.loc)
    else:
        ctx.ints[node.outputs[0]] = value


def reduce(op: str) -> Converter:
    """ReduceMean, ReduceSum: `axes` as an attribute (ReduceMean before opset 18) or as a
    constant input (ReduceSum from 13, ReduceMean from 18)."""

    def convert(ctx: Lowering) -> None:
        x = ctx.tensor(0)
        axes = ctx.attr("axes", kind=INTS)
        if axes is None and ctx.has_input(1):
            axes = ctx.integers(1, "axes").reshape(-1).tolist()
        if not axes and ctx.attr("noop_with_empty_axes", 0):
            ctx.emit("identity", [x])
            return
        attrs = {"axis": None if not axes else [int(a) for a in axes]}
        ctx.emit(op, [x], {**attrs, "keepdims": bool(ctx.attr("keepdims", 1))})

    return convert


CONVERTERS: dict[str, Converter] = {
    "Relu": unary("relu"),
    "LeakyRelu": leaky_relu,
    "Sigmoid": unary("sigmoid"),
    "Tanh": unary("tanh"),
    "Softmax": softmax("softmax"),
    "LogSoftmax": softmax("log_softmax"),
    "Identity": unary("identity"),
    "Dropout": dropout,
    "Add": binary("add"),
    "Sub": binary("sub"),
    "Mul": binary("mul"),
    "Div": binary("div"),
    "MatMul": binary("matmul"),
    "Gemm": gemm,
    "Conv": conv,
    "MaxPool": pool("maxpool2d"),
    "AveragePool": pool("avgpool2d"),
    "GlobalAveragePool": global_average_pool,
    "BatchNormalization": batch_normalization,
    "Flatten": flatten,
    "Reshape": reshape,
    "Transpose": transpose,
    "Constant": constant,
    "ReduceMean": reduce("mean"),
    "ReduceSum": reduce("sum"),
}

# What each float initializer operand is for, by input position (None: not a parameter).
ROLES: dict[str, tuple[str | None, ...]] = {
    "Gemm": (None, "W", "b"),
    "MatMul": ("W", "W"),
    "Conv": (None, "W", "b"),
    "BatchNormalization": (None, "gamma", "beta", "running_mean", "running_var"),
    "Add": ("b", "b"),
    "Sub": ("b", "b"),
    "Mul": ("W", "W"),
    "Div": ("W", "W"),
}
# The op types whose W makes units (neurons): dense units and conv filters
NEURON_OPS = ("Gemm", "MatMul", "Conv")
