"""A read model lowered to the engine's `NodeSpec`s: the batch, the initializers, one converter
per node (onnx_import.converters), then the loss on the model's output.

Engine ids are the ONNX names: the graph input (an `input` node fed the batch), every float
initializer (a `param`, in its own shape and layout, so its gradient is reported under its
ONNX name as it is stored), every node's first output; `loss` is the loss and `batch.y` the
targets (a `const`). Integer initializers and Constants are read at lowering time
(Reshape's shape, axes) and are not engine nodes. Lowering runs on a zero-stride placeholder
batch (no memory): the compiler then checks every size limit before the real batch is used
(`with_leaves`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradiag.engine.compiler import Limits, NodeSpec
from gradiag.engine.errors import Loc, ShapeError
from gradiag.engine.network import CLASS_LOSSES, LOSS_OPS
from gradiag.engine.ops import OPS, Array, Shape
from gradiag.onnx_import.context import NO_LIMITS, Lowering
from gradiag.onnx_import.converters import CONVERTERS, ROLES
from gradiag.onnx_import.model import (
    FLOAT_TYPES,
    ModelError,
    OnnxModel,
    OnnxNode,
    ValueInfo,
    initializer_array,
    type_name,
)

LOSS = "loss"
TARGETS = "batch.y"


class UnsupportedOpsError(ModelError):
    """The model uses op types without a converter: `nodes` maps each to the nodes that use
    it, in graph order (`unsupported`: to their names)."""

    def __init__(self, nodes: Mapping[str, list[OnnxNode]]) -> None:
        self.nodes = dict(nodes)
        self.unsupported = {op: [node.name for node in used] for op, used in self.nodes.items()}
        listed = "; ".join(
            f"{op} ({'node' if len(names) == 1 else 'nodes'} {', '.join(map(repr, names))})"
            for op, names in self.unsupported.items()
        )
        first = next(iter(self.nodes.values()))[0]
        super().__init__(
            f"the model uses op types gradiag does not support: {listed}. Supported: "
            f"{', '.join(sorted(CONVERTERS))}",
            loc=first.loc,
            node=first.name,
        )


def check_supported(model: OnnxModel) -> None:
    """Every op type without a converter, refused at once with the nodes using it."""
    found: dict[str, list[OnnxNode]] = {}
    for node in model.nodes:
        if node.op_type not in CONVERTERS:
            found.setdefault(node.op_type, []).append(node)
    if found:
        raise UnsupportedOpsError(found)


def pick(infos: list[ValueInfo], name: str | None, what: str, field: str) -> ValueInfo:
    """The graph input (or output) `name`, or the only one when no name is given."""
    names = [info.name for info in infos]
    loc: Loc = ("request", field)
    if name is None:
        if len(infos) != 1:
            raise ModelError(
                f"the model has {len(infos)} {what}s ({', '.join(map(repr, names))}): say "
                f"which one with `{field}`",
                loc=loc,
            )
        return infos[0]
    if name not in names:
        raise ModelError(
            f"{name!r} is not an {what} of the model; its {what}s: {', '.join(map(repr, names))}",
            loc=loc,
        )
    return infos[names.index(name)]


def check_batch_shape(source: ValueInfo, shape: Shape, loc: Loc = ("batch", "x")) -> None:
    """The batch must have the shape the graph input declares (symbolic dimensions: any)."""
    if source.elem_type not in FLOAT_TYPES:
        raise ModelError(
            f"the model's input {source.name!r} is of type {type_name(source.elem_type)}; "
            "gradiag feeds floating-point inputs",
            loc=("request", "input"),
            node=source.name,
        )
    if not source.fits(shape) or not shape or shape[0] < 1:
        raise ShapeError(
            f"the batch x has shape {list(shape)}; the model's input {source.name!r} takes "
            f"{source.shown()}",
            loc=loc,
            node=source.name,
        )


@dataclass(frozen=True)
class LayerNodes:
    """An ONNX node the report describes as a layer: one with weights (float initializer
    operands) or an activation (an op with a gate: relu, leaky_relu, sigmoid, tanh)."""

    index: int  # 1-based, in graph order
    node: OnnxNode
    output: str  # the engine id of its (first) output
    op: str  # the engine op that computes the output
    pre: str | None  # an activation's input: the pre-activation
    params: Mapping[str, str]  # role (W, b, gamma, ...) -> initializer name

    @property
    def activation(self) -> str | None:
        return self.op if self.pre is not None else None


@dataclass
class Lowered:
    nodes: list[NodeSpec]
    source: ValueInfo  # the graph input the batch feeds
    scores: str  # the model output that feeds the loss
    loss: str
    shapes: dict[str, Shape]
    layers: list[LayerNodes]
    params: dict[str, Shape]  # the float initializers, in the model's order
    roles: dict[str, str]  # initializer -> the role it plays first (absent: none)
    owner: dict[str, str] = field(default_factory=dict)  # engine id -> ONNX node or leaf name

    @property
    def targets_shape(self) -> Shape | None:
        return self.shapes.get(TARGETS)


def lower_model(
    model: OnnxModel,
    source: ValueInfo,
    x_shape: Shape,
    *,
    loss: str,
    output: str | None = None,
    dtype: np.dtype[Any] | type = np.float64,
    limits: Limits = NO_LIMITS,
) -> Lowered:
    """The model as engine nodes on a placeholder batch of `x_shape` (module docstring)."""
    ctx = Lowering(np.dtype(dtype), limits)
    _check_reserved(model)
    owner: dict[str, str] = {}
    ctx.leaf(source.name, "input", _placeholder(x_shape, ctx.dtype), ("batch", "x"))
    for other in model.inputs:
        if other.name != source.name:
            ctx.unlowered[other.name] = "it is a graph input the batch does not feed"
    params: dict[str, Shape] = {}
    for init in model.initializers:
        if init.is_float:
            ctx.leaf(init.name, "param", np.asarray(initializer_array(init), ctx.dtype), init.loc)
            ctx.params.add(init.name)
            params[init.name] = init.shape
        else:
            ctx.ints[init.name] = initializer_array(init)
    owner.update((name, name) for name in ctx.shapes)
    layers: list[LayerNodes] = []
    roles: dict[str, str] = {}
    for node in model.nodes:
        first = len(ctx.nodes)
        ctx.start(node)
        CONVERTERS[node.op_type](ctx)
        ctx.finish()
        owner.update((spec.id, node.name) for spec in ctx.nodes[first:])
        layer = _layer(ctx, node, len(ctx.nodes) > first, len(layers) + 1)
        if layer is not None:
            layers.append(layer)
            for role, name in layer.params.items():
                roles.setdefault(name, role)
    scores = pick(model.outputs, output, "output", "output").name
    _loss_nodes(ctx, scores, loss)
    owner.update({TARGETS: TARGETS, LOSS: LOSS})
    return Lowered(ctx.nodes, source, scores, loss, ctx.shapes, layers, params, roles, owner)


def _check_reserved(model: OnnxModel) -> None:
    names = {init.name for init in model.initializers} | {i.name for i in model.inputs}
    for node in model.nodes:
        names.update(node.outputs)
        for reserved in (LOSS, TARGETS):
            if reserved in node.outputs:
                raise ModelError(
                    f"node {node.name!r} names its output {reserved!r}, a name the report "
                    "keeps for the loss and its targets; rename the tensor",
                    loc=node.loc,
                    node=node.name,
                )
    for reserved in (LOSS, TARGETS):
        if reserved in names:
            raise ModelError(
                f"the model has a tensor named {reserved!r}, a name the report keeps for the "
                "loss and its targets; rename the tensor",
                loc=("model", "graph"),
            )


def _placeholder(shape: Shape, dtype: np.dtype[Any]) -> Array:
    """Zeros of any shape as a zero-stride view: no memory."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def _layer(ctx: Lowering, node: OnnxNode, emitted: bool, index: int) -> LayerNodes | None:
    """The node as a layer of the report, or None (no weights, no activation)."""
    if not emitted or not node.outputs or node.outputs[0] not in ctx.shapes:
        return None
    spec = ctx.nodes[-1]
    gated = OPS[spec.op].gate is not None if spec.op in OPS else False
    roles = ROLES.get(node.op_type, ())
    params: dict[str, str] = {}
    for k, name in enumerate(node.inputs):
        if name in ctx.params:
            role = roles[k] if k < len(roles) else None
            params.setdefault(role or f"input{k}", name)
    if not gated and not params:
        return None
    pre = spec.inputs[0] if gated else None
    return LayerNodes(index, node, node.outputs[0], spec.op, pre, params)


def _loss_nodes(ctx: Lowering, scores: str, loss: str) -> None:
    """The targets (a placeholder const of the shape the loss takes) and the loss node."""
    if scores not in ctx.shapes:
        raise ModelError(
            f"the model's output {scores!r} is not computed by any node", loc=("model", "graph")
        )
    shape = ctx.shapes[scores]
    loc: Loc = ("request", "loss")
    if loss != "sum" and len(shape) < 1:
        raise ShapeError(f"the {loss} loss takes scores (N, ...); the output {scores!r} is a "
                         "scalar", loc=loc)  # fmt: skip
    inputs: tuple[str, ...] = (scores,)
    if loss != "sum":
        targets = shape[:1] if loss in CLASS_LOSSES else shape
        ctx.nodes.append(NodeSpec(TARGETS, "const", value=_placeholder(targets, ctx.dtype),
                                  loc=("batch", "y")))  # fmt: skip
        ctx.shapes[TARGETS] = targets
        inputs = (scores, TARGETS)
    ctx.nodes.append(NodeSpec(LOSS, LOSS_OPS[loss], inputs, loc=loc))
    ctx.shapes[LOSS] = ()
