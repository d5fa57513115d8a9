"""The graph front end: a validated wire request becomes the engine's `NodeSpec`s."""

from __future__ import annotations

from engine import NodeSpec, Thresholds
from engine.tensors import to_array
from schemas.common import Thresholds as WireThresholds
from schemas.graph import GraphRequest, LeafNode


def graph_nodes(request: GraphRequest) -> list[NodeSpec]:
    specs = []
    for k, node in enumerate(request.nodes):
        loc = ("nodes", k)
        if isinstance(node, LeafNode):
            value = to_array(node.value, (*loc, "value"), node=node.id)
            specs.append(NodeSpec(node.id, node.op, value=value, loc=loc))
        else:
            attrs = node.attrs.model_dump(exclude_defaults=True) if hasattr(node, "attrs") else {}
            specs.append(NodeSpec(node.id, node.op, tuple(node.inputs), attrs, loc=loc))
    return specs


def engine_thresholds(wire: WireThresholds) -> Thresholds:
    return Thresholds(**wire.model_dump())
