"""POST /v1/graph: the request (a tagged union of node shapes) and the response."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from schemas.common import Health, NodeId, Tensor, Thresholds, WireModel

# The op tags per node shape. A test checks these lists against the engine's op table.
LEAF_OPS = ("input", "param", "const")
UNARY_OPS = (
    "neg", "exp", "log", "sqrt", "square", "abs", "reciprocal", "relu", "sigmoid", "tanh",
)  # fmt: skip
BINARY_OPS = ("add", "sub", "mul", "div", "pow", "max", "min", "matmul")
LOSS_OPS = ("mse", "softmax_cross_entropy", "svm_hinge")
REDUCE_OPS = ("sum", "mean")
OTHER_OPS = ("leaky_relu", "transpose")
ALL_OPS = LEAF_OPS + UNARY_OPS + BINARY_OPS + LOSS_OPS + REDUCE_OPS + OTHER_OPS

Axis = int | list[int]


class LeafNode(WireModel):
    """`input` (gets a gradient), `param` (gets one and counts as a parameter), `const`."""

    id: NodeId
    op: Literal["input", "param", "const"]
    value: Tensor


class UnaryNode(WireModel):
    id: NodeId
    op: Literal[UNARY_OPS]  # type: ignore[valid-type]
    inputs: Annotated[list[NodeId], Field(min_length=1, max_length=1)]


class BinaryNode(WireModel):
    """Elementwise ops broadcast as NumPy does; order matters for sub, div, pow, matmul."""

    id: NodeId
    op: Literal[BINARY_OPS]  # type: ignore[valid-type]
    inputs: Annotated[list[NodeId], Field(min_length=2, max_length=2)]


class LossNode(WireModel):
    """(scores, targets) -> scalar. Class losses take scores (N, C) and labels (N,)."""

    id: NodeId
    op: Literal[LOSS_OPS]  # type: ignore[valid-type]
    inputs: Annotated[list[NodeId], Field(min_length=2, max_length=2)]


class ReduceAttrs(WireModel):
    axis: Axis | None = Field(None, description="the axes to reduce (default: all)")
    keepdims: bool = False


class ReduceNode(WireModel):
    id: NodeId
    op: Literal[REDUCE_OPS]  # type: ignore[valid-type]
    inputs: Annotated[list[NodeId], Field(min_length=1, max_length=1)]
    attrs: ReduceAttrs = ReduceAttrs()


class LeakyReluAttrs(WireModel):
    alpha: float = Field(0.01, description="the slope for x <= 0")


class LeakyReluNode(WireModel):
    id: NodeId
    op: Literal["leaky_relu"]
    inputs: Annotated[list[NodeId], Field(min_length=1, max_length=1)]
    attrs: LeakyReluAttrs = LeakyReluAttrs()


class TransposeAttrs(WireModel):
    axes: list[int] | None = Field(
        None, description="a permutation of the axes (default: reversed)"
    )


class TransposeNode(WireModel):
    id: NodeId
    op: Literal["transpose"]
    inputs: Annotated[list[NodeId], Field(min_length=1, max_length=1)]
    attrs: TransposeAttrs = TransposeAttrs()


Node = Annotated[
    LeafNode | UnaryNode | BinaryNode | LossNode | ReduceNode | LeakyReluNode | TransposeNode,
    Field(discriminator="op"),
]


class GraphRequest(WireModel):
    """A computational graph. Nodes may come in any order; the graph must be acyclic."""

    nodes: Annotated[list[Node], Field(min_length=1)]
    output: NodeId = Field(description="the id of the node whose gradient is taken")
    output_grad: Tensor | None = Field(
        None, description="upstream gradient at the output (default: all ones)"
    )
    gradcheck: bool = Field(False, description="also compare every gradient numerically")
    thresholds: Thresholds = Thresholds()


# --- response --------------------------------------------------------------------------


class OutputReport(BaseModel):
    id: str
    value: Tensor
    shape: list[int]


class NodeReport(BaseModel):
    op: str
    shape: list[int]
    value: Tensor
    grad: Tensor | None = Field(None, description="d(output)/d(node); absent for const nodes")


class Parameters(BaseModel):
    tensors: int = Field(description="param nodes")
    total: int = Field(description="elements in param nodes (a param used twice counts once)")


class ReluStats(BaseModel):
    nodes: int
    elements: int
    dead_elements: int
    dead_fraction: float


class SaturationStats(BaseModel):
    nodes: int
    elements: int
    saturated_elements: int
    saturated_fraction: float


class Diagnostics(BaseModel):
    relu: ReluStats
    sigmoid: SaturationStats
    tanh: SaturationStats
    nonfinite_nodes: list[str] = Field(
        description="nodes whose value or gradient holds NaN/Infinity, in topological order"
    )


class GraphResponse(BaseModel):
    output: OutputReport
    nodes: dict[str, NodeReport] = Field(description="every node, in topological order")
    parameters: Parameters
    diagnostics: Diagnostics
    health: Health
