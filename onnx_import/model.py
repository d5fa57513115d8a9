"""An ONNX file read into plain Python: the protobuf parsed by the `onnx` package (never
executed: no reference evaluator, no runtime), checked, and described by small dataclasses.

What is refused here, before any tensor is converted (each a `ModelError`, 422, located at
its place in the model: `("model", "graph", "node", k)`, `("model", "graph",
"initializer", k)`, ...): an opset of the default domain below 13, more nodes than
`max_nodes`, initializers stored as external data (the service reads one file, never a
path named inside it), sparse initializers, data types other than float32/float64 and
int32/int64, and initializers whose dims (read from the protobuf, before any conversion)
hold more elements than the limits allow. Bytes that do not decode as an ONNX model at all
are a `NotOnnxError` (400).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from gradiag.engine.errors import EngineError, Loc, check_limits
from gradiag.engine.ops import Array, Shape

MIN_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")

# The data types converted, each with its NumPy dtype (little-endian, as ONNX's raw_data is
# stored) and the typed field that holds the values when raw_data is empty.
TENSOR_TYPES: Mapping[int, tuple[str, str]] = {
    onnx.TensorProto.FLOAT: ("<f4", "float_data"),
    onnx.TensorProto.DOUBLE: ("<f8", "double_data"),
    onnx.TensorProto.INT64: ("<i8", "int64_data"),
    onnx.TensorProto.INT32: ("<i4", "int32_data"),
}
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


class ModelError(EngineError):
    """A model the front end cannot take: the service answers 422."""


class NotOnnxError(ModelError):
    """Bytes that do not decode as an ONNX model (no graph): the service answers 400, as it
    answers malformed JSON."""


# An attribute's expected type, from the type of the default a converter gives for it
ATTRIBUTE_KINDS: Mapping[type, int] = {
    float: onnx.AttributeProto.FLOAT,
    int: onnx.AttributeProto.INT,
    str: onnx.AttributeProto.STRING,
    list: onnx.AttributeProto.INTS,
}


@dataclass(frozen=True)
class OnnxNode:
    """One node of the graph. `name` is the node's own name, or `<op_type>#<index>` when the
    exporter left it empty; `op_type` is qualified by its domain outside the default one."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]  # "" for an optional input left out
    outputs: tuple[str, ...]
    attributes: Mapping[str, onnx.AttributeProto] = field(default_factory=dict)

    @property
    def loc(self) -> Loc:
        return ("model", "graph", "node", self.index)

    def attr(self, name: str, default: Any = None, kind: int | None = None) -> Any:
        """An attribute's value as Python (ints, floats, str, lists, a TensorProto), of the
        type `kind` (an AttributeProto type; default: the default's type). A float
        attribute is stored as a float32: it is read as the shortest decimal that float32
        rounds to it (epsilon 9.99999975e-06 is the 1e-5 the exporter was given, as PyTorch
        used it), so that float64 results match the framework's, not float32's rounding."""
        proto = self.attributes.get(name)
        if proto is None:
            return default
        want = kind if kind is not None else ATTRIBUTE_KINDS.get(type(default))
        if want is not None and proto.type != want:
            have, need = (onnx.AttributeProto.AttributeType.Name(t) for t in (proto.type, want))
            raise ModelError(
                f"node {self.name!r} ({self.op_type}): attribute {name} must be of type {need}, "
                f"not {have}",
                loc=(*self.loc, "attribute", name),
                node=self.name,
            )
        value = helper.get_attribute_value(proto)
        if proto.type == onnx.AttributeProto.FLOAT:
            return decimal_float(value)
        if proto.type == onnx.AttributeProto.FLOATS:
            return [decimal_float(v) for v in value]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def decimal_float(value: float) -> float:
    """The shortest decimal that float32 rounds to `value` (NumPy's float32 repr)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: its name, element type and shape (None for a dimension
    that is symbolic or unknown)."""

    name: str
    elem_type: int
    shape: tuple[int | None, ...] | None  # None: no shape recorded

    def fits(self, shape: Shape) -> bool:
        if self.shape is None:
            return True
        if len(shape) != len(self.shape):
            return False
        return all(want is None or want == got for want, got in zip(self.shape, shape, strict=True))

    def shown(self) -> str:
        if self.shape is None:
            return "(any shape)"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Initializer:
    """A stored tensor: its place among the graph's initializers, and its proto (converted
    only once the limits have passed)."""

    index: int
    proto: onnx.TensorProto

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def loc(self) -> Loc:
        return ("model", "graph", "initializer", self.index)

    @property
    def shape(self) -> Shape:
        return tuple(int(d) for d in self.proto.dims)

    @property
    def is_float(self) -> bool:
        return self.proto.data_type in FLOAT_TYPES


@dataclass(frozen=True)
class OnnxModel:
    opset: int
    ir_version: int
    producer: str
    graph_name: str
    inputs: list[ValueInfo]  # the graph inputs that are not initializers
    outputs: list[ValueInfo]
    initializers: list[Initializer]
    nodes: list[OnnxNode]


def read_model(
    data: bytes,
    *,
    max_nodes: int = 0,
    max_tensor_elements: int = 0,
    max_total_elements: int = 0,
) -> OnnxModel:
    """Parse and check the bytes of an .onnx file (module docstring). Nothing is converted
    yet; `initializer_array` does that, one initializer at a time."""
    proto = _parse(data)
    opset = _default_opset(proto)
    graph = proto.graph
    check_limits(
        [("max_nodes", max_nodes, len(graph.node), "the model's node count is")],
        loc=("model", "graph", "node"),
    )
    if len(graph.sparse_initializer):
        raise ModelError(
            "sparse initializers are not supported; export dense ones",
            loc=("model", "graph", "sparse_initializer", 0),
        )
    initializers = [Initializer(k, t) for k, t in enumerate(graph.initializer)]
    _check_initializers(initializers, max_tensor_elements, max_total_elements)
    stored = {init.name for init in initializers}
    return OnnxModel(
        opset=opset,
        ir_version=int(proto.ir_version),
        producer=" ".join(p for p in (proto.producer_name, proto.producer_version) if p),
        graph_name=graph.name,
        inputs=[_value_info(v) for v in graph.input if v.name not in stored],
        outputs=[_value_info(v) for v in graph.output],
        initializers=initializers,
        nodes=[_node(k, n) for k, n in enumerate(graph.node)],
    )


def _parse(data: bytes) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as err:
        raise NotOnnxError(
            f"the model is not an ONNX file (protobuf: {err}); send the .onnx file's bytes, whole",
            loc=("model",),
        ) from None
    if not proto.HasField("graph") or not len(proto.graph.node):
        raise NotOnnxError(
            "the model decodes to no ONNX graph (no nodes): it is not an .onnx file, or it "
            "was cut short",
            loc=("model",),
        )
    return proto


def _default_opset(proto: onnx.ModelProto) -> int:
    for k, entry in enumerate(proto.opset_import):
        if entry.domain in DEFAULT_DOMAINS:
            if entry.version < MIN_OPSET:
                raise ModelError(
                    f"the model uses opset {entry.version}; opsets {MIN_OPSET} and later are "
                    f"supported: export again with opset_version={MIN_OPSET} or later",
                    loc=("model", "opset_import", k),
                )
            return int(entry.version)
    raise ModelError(
        "the model imports no opset of the default ONNX domain", loc=("model", "opset_import")
    )


def _node(index: int, proto: onnx.NodeProto) -> OnnxNode:
    domain = proto.domain if proto.domain not in DEFAULT_DOMAINS else ""
    op_type = f"{domain}.{proto.op_type}" if domain else proto.op_type
    return OnnxNode(
        index=index,
        name=proto.name or f"{op_type}#{index}",
        op_type=op_type,
        inputs=tuple(proto.input),
        outputs=tuple(proto.output),
        attributes={a.name: a for a in proto.attribute},
    )


def _value_info(proto: onnx.ValueInfoProto) -> ValueInfo:
    tensor = proto.type.tensor_type
    shape: tuple[int | None, ...] | None = None
    if tensor.HasField("shape"):
        shape = tuple(
            int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor.shape.dim
        )
    return ValueInfo(proto.name, int(tensor.elem_type), shape)


def type_name(data_type: int) -> str:
    try:
        return str(onnx.TensorProto.DataType.Name(data_type))
    except ValueError:
        return str(data_type)


def check_tensor(proto: onnx.TensorProto, what: str, loc: Loc, node: str | None = None) -> None:
    """A stored tensor the front end can convert: kept in the file, of a supported type, with
    dims >= 0."""
    if proto.data_location == onnx.TensorProto.EXTERNAL or len(proto.external_data):
        raise ModelError(
            f"{what} keeps its data in an external file; models with external data are "
            "refused (the service reads one file, never a path named inside it): save the "
            "model with its weights inside (onnx.save(model, path, "
            "save_as_external_data=False))",
            loc=loc,
            node=node,
        )
    if proto.data_type not in TENSOR_TYPES:
        raise ModelError(
            f"{what} is of data type {type_name(proto.data_type)}; supported: FLOAT, DOUBLE "
            "(parameters), INT64, INT32 (constants such as shapes)",
            loc=loc,
            node=node,
        )
    if any(d < 0 for d in proto.dims):
        raise ModelError(f"{what} has negative dims {list(proto.dims)}", loc=loc, node=node)


def _check_initializers(
    initializers: Sequence[Initializer], max_tensor: int, max_total: int
) -> None:
    """Types, storage and sizes of every initializer, from the protobuf's dims alone."""
    total = 0
    for init in initializers:
        what = f"initializer {init.name!r}"
        check_tensor(init.proto, what, init.loc, init.name)
        elements = math.prod(init.shape)
        total += elements
        check_limits(
            [
                ("max_tensor_elements", max_tensor, elements, f"{what} holds elements:"),
                ("max_total_elements", max_total, total, "the initializers hold elements:"),
            ],
            loc=init.loc,
            node=init.name,
        )


def tensor_array(proto: onnx.TensorProto, what: str, loc: Loc, node: str | None = None) -> Array:
    """A checked tensor's values as a new array of its own dtype and dims (raw_data, else the
    typed field); a byte or value count that does not fit the dims is a ModelError."""
    check_tensor(proto, what, loc, node)
    dtype, typed = TENSOR_TYPES[proto.data_type]
    shape = tuple(int(d) for d in proto.dims)
    count = math.prod(shape)
    if proto.HasField("raw_data"):
        raw = proto.raw_data
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise ModelError(
                f"{what} holds {len(raw)} bytes; its dims {list(shape)} need "
                f"{count * np.dtype(dtype).itemsize}",
                loc=loc,
                node=node,
            )
        values = np.frombuffer(raw, dtype)
    else:
        stored = getattr(proto, typed)
        if len(stored) != count:
            raise ModelError(
                f"{what} holds {len(stored)} values; its dims {list(shape)} need {count}",
                loc=loc,
                node=node,
            )
        values = np.asarray(stored, dtype)
    return values.astype(np.dtype(dtype).newbyteorder("="), copy=True).reshape(shape)


def initializer_array(init: Initializer) -> Array:
    return tensor_array(init.proto, f"initializer {init.name!r}", init.loc, init.name)
