"""What a converter writes into: the engine nodes lowered so far, their shapes, and the
integer constants (Reshape shapes, axes) that are read at lowering time, never computed.

A converter turns the node being lowered (`ctx.current`) into engine nodes with `emit`. Its
engine ids are the ONNX tensor names: the node's first output is the id of the last node the
converter emits (`finish` renames it), and any nodes before it get helper ids
`<output>::<k>.<op>`, which no exporter writes. Shapes are static (the batch is known), so
each emitted node's shape comes from the op table's shape rule at once: a shape error names
the ONNX node, before anything is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from gradiag.engine.compiler import Limits, NodeSpec
from gradiag.engine.errors import Loc, ShapeError, check_limits
from gradiag.engine.ops import OPS, Array, Shape
from gradiag.onnx_import.model import ModelError, OnnxNode

NO_LIMITS = Limits()


class Lowering:
    """The engine graph of a model, built node by node (module docstring)."""

    def __init__(self, dtype: np.dtype[Any], limits: Limits = NO_LIMITS) -> None:
        self.dtype = dtype
        self.limits = limits
        self.nodes: list[NodeSpec] = []
        self.shapes: dict[str, Shape] = {}  # every engine node's shape, by id
        self.ints: dict[str, Array] = {}  # integer constants, by ONNX tensor name
        self.params: set[str] = set()  # the float initializers' names
        self.unlowered: dict[str, str] = {}  # outputs left out, with the reason
        self._current: OnnxNode | None = None
        self._first = 0  # the first of the current node's engine nodes

    # --- the node being lowered ---------------------------------------------------------

    @property
    def current(self) -> OnnxNode:
        assert self._current is not None, "a converter runs inside lower_node"
        return self._current

    def start(self, node: OnnxNode) -> None:
        self._current, self._first = node, len(self.nodes)
        out = node.outputs[0] if node.outputs else ""
        if not out:
            self.refuse("the node has no output")
        if out in self.shapes or out in self.ints:
            self.refuse(f"its output {out!r} is already a tensor of the graph (ONNX assigns "
                        "each tensor once)")  # fmt: skip

    def finish(self) -> None:
        """The node's first output names its last engine node (or an integer constant);
        its other outputs are not lowered, and a node that reads one is told why."""
        node = self.current
        out = node.outputs[0] if node.outputs else ""
        if out and out not in self.shapes and out not in self.ints:
            if len(self.nodes) == self._first:
                self.refuse("produced no value")  # a converter's own mistake
            last = self.nodes[-1]
            self.shapes[out] = self.shapes.pop(last.id)
            last.id = out
        for extra in node.outputs[1:]:
            if extra:
                self.unlowered[extra] = (
                    f"it is output {node.outputs.index(extra)} of {node.op_type} node "
                    f"{node.name!r}, which gradiag does not compute (only the first output)"
                )
        self._current = None

    def refuse(self, message: str, *field: str | int) -> NoReturn:
        node = self.current
        raise ModelError(
            f"node {node.name!r} ({node.op_type}): {message}",
            loc=(*node.loc, *field),
            node=node.name,
        )

    def attr(self, name: str, default: Any = None, kind: int | None = None) -> Any:
        """The current node's attribute `name`, checked to be of the default's type (or
        `kind`): a wrong type is refused at the attribute."""
        return self.current.attr(name, default, kind)

    def pair_attr(self, name: str, default: int, *, minimum: int = 0) -> list[int]:
        """A per-axis attribute of a 2-D window (strides, kernel_shape): two ints."""
        value = list(self.attr(name, [default, default]))
        if len(value) != 2 or not all(isinstance(v, int) and v >= minimum for v in value):
            self.refuse(
                f"{name} must hold two ints >= {minimum} (a 2-D window), got {value}", "attribute"
            )
        return value

    # --- operands -------------------------------------------------------------------------

    def has_input(self, k: int) -> bool:
        inputs = self.current.inputs
        return k < len(inputs) and bool(inputs[k])

    def tensor(self, k: int) -> str:
        """The engine id of float input k (an initializer, the batch, a node's output)."""
        name = self._input_name(k)
        if name in self.ints:
            self.refuse(
                f"input {k} ({name!r}) is an integer tensor; gradiag computes in floating "
                "point (integers are constants: shapes, axes)",
                "input",
                k,
            )
        return name

    def optional(self, k: int) -> str | None:
        return self.tensor(k) if self.has_input(k) else None

    def integers(self, k: int, what: str) -> Array:
        """Integer input k, a constant (an integer initializer or Constant node)."""
        name = self._input_name(k)
        if name not in self.ints:
            self.refuse(
                f"{what} (input {k}, {name!r}) must be a constant: an integer initializer or "
                "the output of a Constant node",
                "input",
                k,
            )
        return self.ints[name]

    def _input_name(self, k: int) -> str:
        if not self.has_input(k):
            self.refuse(f"input {k} is missing", "input")
        name = self.current.inputs[k]
        if name not in self.shapes and name not in self.ints:
            why = self.unlowered.get(name, "no node before it produces it, and it is not an "
                                      "initializer or the graph's input")  # fmt: skip
            self.refuse(f"input {k} ({name!r}) cannot be read: {why}", "input", k)
        return name

    def shape(self, engine_id: str) -> Shape:
        return self.shapes[engine_id]

    # --- building -------------------------------------------------------------------------

    def emit(self, op: str, inputs: Sequence[str], attrs: dict[str, Any] | None = None) -> str:
        """One engine node of the current ONNX node; its id (a helper id until `finish`)."""
        node = self.current
        attrs = attrs or {}
        node_id = f"{node.outputs[0]}::{len(self.nodes) - self._first}.{op}"
        try:
            shape = OPS[op].shape(*(self.shapes[i] for i in inputs), **attrs)
        except ShapeError as err:
            self.refuse(err.message)
        self._append(NodeSpec(node_id, op, tuple(inputs), attrs, loc=node.loc), shape)
        return node_id

    def constant(self, suffix: str, value: Any) -> str:
        """A const engine node (no gradient) beside the current node: a scale, a zero bias."""
        node = self.current
        node_id = f"{node.outputs[0]}::{suffix}"
        array = np.asarray(value, self.dtype)
        self._append(NodeSpec(node_id, "const", value=array, loc=node.loc), array.shape)
        return node_id

    def leaf(self, node_id: str, op: str, value: Array, loc: Loc) -> None:
        """A leaf of the model: the batch (`input`), an initializer (`param`), a Constant."""
        self.check_elements(value.size, repr(node_id), loc)
        self._append(NodeSpec(node_id, op, value=value, loc=loc), value.shape)

    def check_elements(self, count: int, what: str, loc: Loc) -> None:
        """One tensor's elements against max_tensor_elements, before it is converted."""
        check_limits(
            [("max_tensor_elements", self.limits.max_tensor_elements, count,
              f"{what} holds elements:")],
            loc=loc,
        )  # fmt: skip

    def _append(self, spec: NodeSpec, shape: Shape) -> None:
        self.nodes.append(spec)
        self.shapes[spec.id] = tuple(shape)
