"""Every converter of onnx_import.converters, on a one-node (or two-node) model built with
onnx.helper: the lowered forward against a NumPy formula written here from the ONNX
operator's definition, and every gradient (the batch's and each initializer's) against
centred differences of the same program (engine.gradcheck), under an mse loss on random
targets. One table, `CASES`, covers every op type of `CONVERTERS` (a test says so); the
converters' refusals follow, one each."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_ops import ref_conv2d, ref_pool  # the op table's references, by definition

from gradiag.engine.errors import EngineError, ShapeError
from gradiag.engine.gradcheck import GradcheckOptions, gradcheck
from gradiag.engine.network import Batch
from gradiag.onnx_import.converters import CONVERTERS
from gradiag.onnx_import.frontend import DiagnosedModel, OnnxOptions, diagnose_model
from gradiag.onnx_import.model import ModelError

Array = np.ndarray[Any, np.dtype[Any]]
RNG = np.random.default_rng(21)


def model_bytes(
    nodes: Sequence[onnx.NodeProto],
    x_shape: Sequence[int],
    out_shape: Sequence[int] | None = None,
    initializers: dict[str, Array] | None = None,
    opset: int = 17,
    output: str = "y",
) -> bytes:
    """A model with input `x` (float64), output `y`, and these initializers."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, list(x_shape))],
        [helper.make_tensor_value_info(output, TensorProto.DOUBLE, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return bytes(model.SerializeToString())


def run(data: bytes, x: Array, loss: str = "mse") -> DiagnosedModel:
    """The model on x under `loss` (mse: random targets of the output's shape)."""
    options = OnnxOptions(loss=loss, gradients=True)
    probe = diagnose_model(data, Batch(x, None), OnnxOptions(loss="sum"))
    out = probe.result.value(probe.result.program.node_ids().index(probe.lowered.scores))
    y = RNG.standard_normal(out.shape) if loss == "mse" else None
    return diagnose_model(data, Batch(x, y), options)


def output_of(done: DiagnosedModel) -> Array:
    return done.result.value(done.result.program.node_ids().index(done.lowered.scores))


@dataclass(frozen=True)
class Case:
    """One op type: its nodes, input shape, initializers and opset, and the formula."""

    op: str
    nodes: list[onnx.NodeProto]
    x_shape: tuple[int, ...]
    reference: Callable[..., Array]  # (x, **initializers) -> y
    initializers: dict[str, Array] = field(default_factory=dict)
    opset: int = 17
    id: str = ""
    x: Callable[[tuple[int, ...]], Array] = lambda shape: RNG.standard_normal(shape)


def node(op: str, inputs: list[str], output: str = "y", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=f"the_{op}", **attrs)


def normal(*shape: int) -> Array:
    return RNG.standard_normal(shape)


def ref_batchnorm(x: Array, s: Array, b: Array, mean: Array, var: Array, train: bool) -> Array:
    view = (1, -1, 1, 1)
    if train:
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    xhat = (x - mean.reshape(view)) / np.sqrt(var.reshape(view) + 1e-5)
    return s.reshape(view) * xhat + b.reshape(view)


def softmax(x: Array, axis: int) -> Array:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def int64(values: list[int]) -> Array:
    return np.array(values, np.int64)


IMAGE = (2, 3, 6, 6)
BN = {"s": normal(3), "b": normal(3), "m": normal(3), "v": RNG.uniform(0.5, 2.0, 3)}

CASES = [
    Case("Relu", [node("Relu", ["x"])], (4, 5), lambda x: np.maximum(x, 0)),
    Case("LeakyRelu", [node("LeakyRelu", ["x"], alpha=0.2)], (4, 5),
         lambda x: np.where(x > 0, x, 0.2 * x)),
    Case("Sigmoid", [node("Sigmoid", ["x"])], (4, 5), lambda x: 1 / (1 + np.exp(-x))),
    Case("Tanh", [node("Tanh", ["x"])], (4, 5), np.tanh),
    Case("Softmax", [node("Softmax", ["x"], axis=1)], (3, 4, 2), lambda x: softmax(x, 1)),
    Case("LogSoftmax", [node("LogSoftmax", ["x"])], (3, 4), lambda x: np.log(softmax(x, -1))),
    Case("Identity", [node("Identity", ["x"])], (2, 3), lambda x: x),
    Case("Dropout", [node("Dropout", ["x", "ratio"])], (2, 3), lambda x, ratio: x,
         {"ratio": np.array(0.5)}),
    Case("Add", [node("Add", ["x", "b"])], (4, 3), lambda x, b: x + b, {"b": normal(3)}),
    Case("Sub", [node("Sub", ["b", "x"])], (4, 3), lambda x, b: b - x, {"b": normal(4, 1)}),
    Case("Mul", [node("Mul", ["x", "w"])], (2, 3, 4), lambda x, w: x * w, {"w": normal(3, 1)}),
    Case("Div", [node("Div", ["x", "w"])], (4, 3), lambda x, w: x / w,
         {"w": RNG.uniform(1.0, 2.0, 3)}),
    Case("MatMul", [node("MatMul", ["x", "W"])], (4, 5), lambda x, W: x @ W, {"W": normal(5, 3)}),
    Case("Gemm", [node("Gemm", ["x", "W", "b"], transB=1)], (4, 5),
         lambda x, W, b: x @ W.T + b, {"W": normal(3, 5), "b": normal(3)}, id="affine"),
    Case("Gemm", [node("Gemm", ["x", "W", "C"], transA=1, alpha=0.5, beta=2.0)], (5, 4),
         lambda x, W, C: 0.5 * x.T @ W + 2.0 * C, {"W": normal(5, 3), "C": normal(1, 3)},
         id="general"),
    Case("Gemm", [node("Gemm", ["x", "W"])], (4, 5), lambda x, W: x @ W, {"W": normal(5, 2)},
         id="no_C"),
    Case("Conv", [node("Conv", ["x", "W", "b"], pads=[1, 1, 1, 1], strides=[2, 2])], IMAGE,
         lambda x, W, b: ref_conv2d(x, W, b, stride=[2, 2], padding=[1, 1]),
         {"W": normal(4, 3, 3, 3), "b": normal(4)}),
    Case("Conv", [node("Conv", ["x", "W"], auto_pad="SAME_UPPER")], IMAGE,
         lambda x, W: ref_conv2d(x, W, np.zeros(2), stride=[1, 1], padding=[1, 1]),
         {"W": normal(2, 3, 3, 3)}, id="same_no_bias"),
    Case("MaxPool", [node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                          pads=[1, 1, 1, 1])], IMAGE,
         lambda x: ref_pool(x, average=False, kernel=[3, 3], stride=[2, 2], padding=[1, 1])),
    Case("AveragePool", [node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
         IMAGE, lambda x: ref_pool(x, average=True, kernel=[3, 3], stride=[1, 1], padding=[1, 1],
                                   count_include_pad=False)),
    Case("GlobalAveragePool", [node("GlobalAveragePool", ["x"])], IMAGE,
         lambda x: x.mean(axis=(2, 3), keepdims=True)),
    Case("BatchNormalization", [node("BatchNormalization", ["x", "s", "b", "m", "v"])], IMAGE,
         lambda x, s, b, m, v: ref_batchnorm(x, s, b, m, v, train=False), BN, id="eval"),
    Case("BatchNormalization", [node("BatchNormalization", ["x", "s", "b", "m", "v"],
                                     training_mode=1)], IMAGE,
         lambda x, s, b, m, v: ref_batchnorm(x, s, b, m, v, train=True), BN, id="train"),
    Case("Flatten", [node("Flatten", ["x"], axis=2)], (2, 3, 4, 2),
         lambda x: x.reshape(6, 8)),
    Case("Reshape", [node("Reshape", ["x", "shape"])], (2, 3, 4),
         lambda x, shape: x.reshape(2, 4, 3), {"shape": int64([0, -1, 3])}),
    Case("Transpose", [node("Transpose", ["x"], perm=[1, 2, 0])], (2, 3, 4),
         lambda x: x.transpose(1, 2, 0)),
    Case("Constant", [node("Constant", [], "c", value=numpy_helper.from_array(normal(3))),
                      node("Constant", [], "s", value_ints=[3, 4]),
                      node("Add", ["x", "c"], "xc"), node("Reshape", ["xc", "s"])],
         (4, 3), lambda x: x + 0, id="float_and_int"),
    Case("ReduceMean", [node("ReduceMean", ["x"], axes=[1, 2], keepdims=0)], (2, 3, 4),
         lambda x: x.mean(axis=(1, 2))),
    Case("ReduceMean", [node("ReduceMean", ["x", "axes"])], (2, 3, 4),
         lambda x, axes: x.mean(axis=-1, keepdims=True), {"axes": int64([-1])}, opset=18,
         id="axes_input"),
    Case("ReduceSum", [node("ReduceSum", ["x", "axes"], keepdims=1)], (2, 3, 4),
         lambda x, axes: x.sum(axis=0, keepdims=True), {"axes": int64([0])}),
    Case("ReduceSum", [node("ReduceSum", ["x"], keepdims=0)], (2, 3),
         lambda x: np.asarray(x.sum()).reshape(()), id="all_axes"),
]  # fmt: skip


def case_id(case: Case) -> str:
    return f"{case.op}-{case.id}" if case.id else case.op


def test_the_cases_cover_every_converter() -> None:
    assert {case.op for case in CASES} == set(CONVERTERS)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_converter_matches_the_onnx_formula_and_centred_differences(case: Case) -> None:
    x = case.x(case.x_shape)
    data = model_bytes(case.nodes, case.x_shape, None, case.initializers, case.opset)
    loss = "mse" if case.id != "all_axes" else "sum"  # a scalar output: no target shape
    done = run(data, x, loss)
    if case.op == "Constant":  # the Constant's float value is the second addend
        c = numpy_helper.to_array(case.nodes[0].attribute[0].t)
        expected = (x + c).reshape(3, 4)
    else:
        expected = case.reference(x, **case.initializers)
    np.testing.assert_allclose(output_of(done), expected, rtol=1e-12, atol=1e-12)
    check = gradcheck(done.result, None, GradcheckOptions(step=1e-5, tolerance=1e-6))
    floats = [k for k, v in case.initializers.items() if v.dtype.kind == "f"]
    assert {n.id for n in check.nodes} == {"x", *floats}
    assert check.passed, [(n.id, n.max_relative_error) for n in check.nodes]
    assert all(n.checked > 0 for n in check.nodes)


def test_a_train_mode_batchnorm_leaves_the_running_statistics_a_zero_gradient() -> None:
    (case,) = [c for c in CASES if c.id == "train"]
    data = model_bytes(case.nodes, case.x_shape, None, case.initializers)
    done = run(data, normal(*case.x_shape))
    ids = done.result.program.node_ids()
    for name in ("m", "v"):
        grad = done.result.grad(ids.index(name))
        assert grad is not None and not np.any(grad)
    assert np.any(done.result.grad(ids.index("s")))


def test_gemm_with_unit_scales_is_one_affine_and_keeps_the_weight_layout() -> None:
    """torch's Linear (transB=1): one affine node on the weight's transpose, the gradient
    reported in the weight's own (out, in) layout."""
    (case,) = [c for c in CASES if c.id == "affine"]
    data = model_bytes(case.nodes, case.x_shape, None, case.initializers)
    x = normal(*case.x_shape)
    done = run(data, x, "sum")
    ops = [spec.op for spec in done.lowered.nodes]
    assert ops.count("affine") == 1 and "matmul" not in ops
    ids = done.result.program.node_ids()
    dW = done.result.grad(ids.index("W"))
    assert dW is not None and dW.shape == (3, 5)
    np.testing.assert_allclose(dW, np.ones((4, 3)).T @ x, rtol=1e-14)  # d sum(x W^T) / dW


def test_reshape_zero_copies_the_dimension_unless_allowzero() -> None:
    shape = {"shape": int64([0, 12])}
    data = model_bytes([node("Reshape", ["x", "shape"])], (2, 3, 4), None, shape)
    assert output_of(run(data, normal(2, 3, 4), "sum")).shape == (2, 12)
    allow = model_bytes([node("Reshape", ["x", "shape"], allowzero=1)], (2, 3, 4), None, shape)
    with pytest.raises(EngineError, match="the_Reshape"):
        run(allow, normal(2, 3, 4), "sum")


def test_a_float_attribute_is_read_as_the_decimal_the_exporter_was_given() -> None:
    """epsilon is stored as float32 9.99999975e-06; PyTorch used 1e-5, and so does gradiag."""
    n = node("LeakyRelu", ["x"], alpha=0.1)
    assert n.attribute[0].f != 0.1  # the float32 the file holds
    done = run(model_bytes([n], (2, 2)), np.full((2, 2), -1.0), "sum")
    assert output_of(done).tolist() == [[-0.1, -0.1], [-0.1, -0.1]]


# --- refusals: each a ModelError (or ShapeError) at the node -----------------------------

REFUSED = [
    ([node("Conv", ["x", "W"], group=3)], {"W": normal(3, 1, 3, 3)}, "group"),
    ([node("Conv", ["x", "W"], dilations=[2, 2])], {"W": normal(2, 3, 3, 3)}, "dilations"),
    ([node("Conv", ["x", "W"], pads=[1, 0, 0, 1])], {"W": normal(2, 3, 3, 3)}, "symmetric"),
    ([node("Conv", ["x", "W"], auto_pad="SAME_UPPER")], {"W": normal(2, 3, 2, 2)}, "symmetric"),
    ([node("Conv", ["x", "W"], kernel_shape=[2, 2])], {"W": normal(2, 3, 3, 3)}, "kernel_shape"),
    ([node("Conv", ["x", "W"])], {"W": normal(2, 3, 3)}, "W must be"),
    ([node("Conv", ["x", "W"], strides=[0, 1])], {"W": normal(2, 3, 3, 3)}, "strides"),
    ([node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)], {}, "ceil_mode"),
    ([node("MaxPool", ["x"])], {}, "kernel_shape"),
    ([node("AveragePool", ["x"], kernel_shape=[3, 3], auto_pad="WHATEVER")], {}, "auto_pad"),
    ([node("Reshape", ["x", "s"])], {"s": normal(2)}, "constant"),
    ([node("Dropout", ["x", "r", "t"])], {"r": np.array(0.5), "t": np.array(1, np.int64)},
     "training_mode"),
    ([node("Add", ["x", "missing"])], {}, "cannot be read"),
    ([node("Relu", ["x"], "y"), node("Add", ["y", "i"], "z")], {"i": int64([1])}, "integer"),
    ([node("Constant", [], "y", value_string="hello")], {}, "only one of"),
    ([node("GlobalAveragePool", ["x"])], {}, "spatial"),
    ([node("Gemm", ["x", "W"])], {"W": normal(2, 2, 2)}, "matrix"),
    ([node("MatMul", ["x", "W"])], {"W": normal(7, 3)}, "matmul"),
]  # fmt: skip


@pytest.mark.parametrize(("nodes", "inits", "words"), REFUSED, ids=lambda v: None)
def test_a_node_the_engine_cannot_compute_is_refused_at_that_node(
    nodes: list[onnx.NodeProto], inits: dict[str, Array], words: str
) -> None:
    x_shape = (2, 3, 5, 5) if nodes[0].op_type in ("Conv", "MaxPool", "AveragePool") else (2, 3)
    out = nodes[-1].output[0]
    data = model_bytes(nodes, x_shape, None, inits, output=out)
    with pytest.raises((ModelError, ShapeError)) as caught:
        run(data, normal(*x_shape), "sum")
    err = caught.value
    assert words in err.message
    k = next(i for i, n in enumerate(nodes) if n.name == err.node) if err.node else None
    assert err.node is not None and k is not None
    assert tuple(err.loc[:4]) == ("model", "graph", "node", k)


def test_a_nameless_node_is_named_by_its_op_type_and_index() -> None:
    nameless = helper.make_node("Relu", ["x"], ["h"])
    bad = helper.make_node("Reshape", ["h", "s"], ["y"])
    data = model_bytes([nameless, bad], (2, 3), None, {"s": normal(2)})
    with pytest.raises(ModelError) as caught:
        run(data, normal(2, 3), "sum")
    assert caught.value.node == "Reshape#1"
    assert math.isfinite(0.0)


# --- hostile attributes: refused (an EngineError, a 422), never an exception of another kind --

ATTRIBUTE_NAMES = (
    "alpha", "beta", "axis", "axes", "perm", "pads", "strides", "kernel_shape", "dilations",
    "group", "auto_pad", "ceil_mode", "count_include_pad", "epsilon", "training_mode",
    "transA", "transB", "keepdims", "allowzero", "noop_with_empty_axes", "value_ints",
)  # fmt: skip
HOSTILE_VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.lists(st.integers(-10, 10**12), min_size=1, max_size=6),
    st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=3),
    st.sampled_from(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER", "", "\x00"]),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_any_attribute_of_any_type_is_lowered_or_refused(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CASES), label="case")
    nodes = []
    for original in case.nodes:
        changed = onnx.NodeProto()
        changed.CopyFrom(original)
        for name in data.draw(st.lists(st.sampled_from(ATTRIBUTE_NAMES), max_size=3)):
            kept = [a for a in changed.attribute if a.name != name]
            del changed.attribute[:]
            changed.attribute.extend(kept)
            changed.attribute.append(helper.make_attribute(name, data.draw(HOSTILE_VALUES)))
        nodes.append(changed)
    data_bytes = model_bytes(nodes, case.x_shape, None, case.initializers, case.opset)
    with contextlib.suppress(EngineError):
        diagnose_model(data_bytes, Batch(case.x(case.x_shape), None), OnnxOptions(loss="sum"))


def test_a_node_without_output_or_reassigning_a_tensor_is_refused() -> None:
    silent = helper.make_node("Relu", ["x"], [], name="silent")
    data = model_bytes([silent, node("Relu", ["x"])], (2, 3))
    with pytest.raises(ModelError, match="no output"):
        run(data, normal(2, 3), "sum")
    again = node("Relu", ["x"], "W")  # W is an initializer already
    data = model_bytes([again, node("Add", ["W", "x"])], (2, 3), None, {"W": normal(2, 3)})
    with pytest.raises(ModelError, match="already a tensor"):
        run(data, normal(2, 3), "sum")
