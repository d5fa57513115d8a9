"""POST /v1/graph: the request (a tagged union of node shapes) and the response."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, RootModel, Tag

from gradiag.schemas.common import (
    FAIL_FAST,
    Health,
    NodeId,
    Number,
    Tensor,
    Tensors,
    TensorSummary,
    Thresholds,
    WireModel,
)

# The op tags per node shape. A test checks these lists against the engine's op table.
LEAF_OPS = ("input", "param", "const")
UNARY_OPS = (
    "identity", "neg", "exp", "log", "sqrt", "square", "abs", "reciprocal", "relu", "sigmoid",
    "tanh",
)  # fmt: skip
BINARY_OPS = ("add", "sub", "mul", "div", "pow", "max", "min", "matmul")
LOSS_OPS = ("mse", "softmax_cross_entropy", "svm_hinge")
REDUCE_OPS = ("sum", "mean")
TERNARY_OPS = ("affine",)
OTHER_OPS = ("leaky_relu", "transpose")
ALL_OPS = LEAF_OPS + UNARY_OPS + BINARY_OPS + TERNARY_OPS + LOSS_OPS + REDUCE_OPS + OTHER_OPS

Axis = int | Annotated[list[int], FAIL_FAST]


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


class AffineNode(WireModel):
    """x (N, D) @ W (D, M) + b (M,): a fully-connected layer as one node (CS231n's affine)."""

    id: NodeId
    op: Literal[TERNARY_OPS]  # type: ignore[valid-type]
    inputs: Annotated[list[NodeId], Field(min_length=3, max_length=3)]


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
    axes: Annotated[list[int], FAIL_FAST] | None = Field(
        None, description="a permutation of the axes (default: reversed)"
    )


class TransposeNode(WireModel):
    id: NodeId
    op: Literal["transpose"]
    inputs: Annotated[list[NodeId], Field(min_length=1, max_length=1)]
    attrs: TransposeAttrs = TransposeAttrs()


Node = Annotated[
    LeafNode
    | UnaryNode
    | BinaryNode
    | AffineNode
    | LossNode
    | ReduceNode
    | LeakyReluNode
    | TransposeNode,
    Field(discriminator="op"),
]


class GradcheckOptions(WireModel):
    """`"gradcheck": true` uses these defaults; an object sets any of them."""

    step: float = Field(1e-5, gt=0.0, le=1.0, description="h of the centred difference")
    tolerance: float = Field(
        1e-6, ge=0.0, description="passed when the largest relative error is at most this"
    )
    max_elements_per_node: int = Field(
        64, ge=1, le=100_000, description="elements checked per leaf (a seeded sample beyond)"
    )
    max_evaluations: int = Field(
        4096, ge=2, le=100_000, description="forward passes overall (two per element)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the element sample")


Gradcheck = Annotated[
    bool | GradcheckOptions,
    Field(description="compare every gradient with a centred difference: true, or options"),
]


Layout = Annotated[
    Literal["nodes", "columns"],
    Field(
        description="the answer's form: `nodes` (an object per node id) or `columns` "
        "(`columns.value`/`columns.grad` lists, row i for node i)"
    ),
]


class GraphRequest(WireModel):
    """A computational graph. Nodes may come in any order; the graph must be acyclic."""

    nodes: Annotated[list[Node], Field(min_length=1), FAIL_FAST]
    output: NodeId = Field(description="the id of the node whose gradient is taken")
    output_grad: Tensor | None = Field(
        None, description="upstream gradient at the output (default: all ones)"
    )
    gradcheck: Gradcheck = False
    thresholds: Thresholds = Thresholds()
    explain: bool = Field(False, description="add `explanation`: leaves ranked by gradient")
    report: Layout = "nodes"
    tensors: Tensors = "full"


class ExpressionRequest(WireModel):
    """The alternative body: an expression parsed (never evaluated) into a graph."""

    expression: str = Field(
        description="numbers, names (keys of `values`), + - * / ** @, unary - and +, "
        "parentheses and catalogue ops by name: sigmoid(w0*x0 + w1*x1 + w2)"
    )
    values: Annotated[dict[NodeId, Tensor], FAIL_FAST] = Field(
        default_factory=dict, description="every name is an `input` node with that id"
    )
    output_grad: Tensor | None = Field(
        None, description="upstream gradient at the output (default: all ones)"
    )
    gradcheck: Gradcheck = False
    thresholds: Thresholds = Thresholds()
    explain: bool = Field(False, description="add `explanation`: leaves ranked by gradient")
    report: Layout = "nodes"
    tensors: Tensors = "full"


class ColumnAttrs(WireModel):
    """An op's settings on a columns row: the same names as the nodes form's `attrs`."""

    alpha: float | None = Field(None, description="leaky_relu: the slope for x <= 0")
    axis: Axis | None = Field(None, description="sum, mean: the axes to reduce")
    keepdims: bool | None = None
    axes: Annotated[list[int], FAIL_FAST] | None = Field(
        None, description="transpose: a permutation of the axes"
    )


# --- packed columns: a binary array in base64 inside the JSON (as Plotly's typed arrays) ---

VALUE_DTYPES = ("float64", "float32")
ROW_DTYPES = ("int8", "int16", "int32", "int64")
CODE_DTYPES = ("uint8", "uint16", "uint32", *ROW_DTYPES)
PACKED_DTYPES = (*VALUE_DTYPES, *CODE_DTYPES)
DTYPE_TEXT = "the element type, a NumPy dtype name (each column takes some of them)"
BASE64_TEXT = (
    "the array's bytes, little-endian (as numpy.ndarray.tobytes() writes them on x86), in "
    "standard base64 with padding (RFC 4648 section 4)"
)


class PackedArray(WireModel):
    """A column as a binary array: `dtype` names the element type, `base64` the bytes.
    Its length is the byte count over the element size."""

    dtype: Literal[PACKED_DTYPES] = Field(description=DTYPE_TEXT)  # type: ignore[valid-type]
    base64: str = Field(description=BASE64_TEXT)


class PackedValues(PackedArray):
    """`columns.value` packed: NaN on every op row (a float array has no null)."""

    dtype: Literal[VALUE_DTYPES] = Field(description=DTYPE_TEXT)  # type: ignore[valid-type]


class PackedRows(PackedArray):
    """One `columns.inputs` list packed: operand row numbers, -1 for none."""

    dtype: Literal[ROW_DTYPES] = Field(description=DTYPE_TEXT)  # type: ignore[valid-type]


class PackedCodes(PackedArray):
    """The op codes of a `PackedOps`: each row's index into `names`."""

    dtype: Literal[CODE_DTYPES] = Field(description=DTYPE_TEXT)  # type: ignore[valid-type]


class PackedOps(WireModel):
    """The op column as a legend and codes: row i's op is `names[codes[i]]`."""

    names: Annotated[list[Literal[ALL_OPS]], Field(min_length=1), FAIL_FAST]  # type: ignore[valid-type]
    codes: PackedCodes | Annotated[list[Annotated[int, Field(ge=0, le=2**63 - 1)]], FAIL_FAST] = (
        Field(description="one index into `names` per row, packed or as a list")
    )


class GraphColumns(WireModel):
    """A scalar graph as a table: row i of every column is node i. Rows are in topological
    order (every operand's row is smaller than its user's), as a micrograd-style `build_topo`
    writes them; every leaf value is one number. `op`, each `inputs` list and `value` may be
    packed (`PackedArray`): a binary array in base64, no JSON number or string per row."""

    op: Annotated[list[Literal[ALL_OPS]], Field(min_length=1), FAIL_FAST] | PackedOps = Field(  # type: ignore[valid-type]
        description="one op per row; or packed, as `names` and one code per row",
    )
    inputs: list[Annotated[list[int], FAIL_FAST] | PackedRows] = Field(
        default_factory=list,
        max_length=3,
        description="one list per operand position, each as long as `op`: inputs[k][i] is the "
        "row of node i's k-th operand, -1 where node i has fewer (leaves: -1 everywhere); "
        "each list may be packed",
    )
    value: Annotated[list[Number | None], FAIL_FAST] | PackedValues = Field(
        description="each leaf row's number (input, param, const); null on op rows; packed: "
        "NaN on op rows (a packed leaf may be NaN too)",
    )
    id: Annotated[list[NodeId], FAIL_FAST] | None = Field(
        None, description='the node ids (default: the row numbers as strings, "0", "1", ...)'
    )
    attrs: Annotated[list[ColumnAttrs | None], FAIL_FAST] | None = Field(
        None, description="each row's op settings, or null (default: none anywhere)"
    )


class ColumnsRequest(WireModel):
    """The table body for big scalar graphs: columns in, columns out (see docs/api.md)."""

    columns: GraphColumns
    output: Annotated[int, Field(ge=0)] | NodeId | None = Field(
        None, description="the output node: a row number or an id (default: the last row)"
    )
    output_grad: Number | None = Field(
        None, description="upstream gradient at the output (default: 1)"
    )
    gradcheck: Gradcheck = False
    thresholds: Thresholds = Thresholds()
    explain: bool = Field(False, description="add `explanation`: leaves ranked by gradient")
    report: Layout = "columns"
    tensors: Tensors = "full"
    encoding: Literal["lists", "packed"] = Field(
        "lists",
        description='how the answer writes `columns.value` and `columns.grad`: "lists" (JSON '
        'numbers) or "packed" (a float64 `PackedArray` each; a const row\'s gradient is NaN). '
        '"packed" needs `report: "columns"`',
    )


BODY_TAGS = ("graph", "expression", "columns")


def body_kind(body: Any) -> str:
    """A body with an "expression" key is an expression, one with "columns" a table;
    anything else is a graph (`nodes`)."""
    if isinstance(body, dict):
        for tag in ("expression", "columns"):
            if tag in body:
                return tag
        return "graph"
    if isinstance(body, ExpressionRequest):
        return "expression"
    return "columns" if isinstance(body, ColumnsRequest) else "graph"


class GraphBody(
    RootModel[
        Annotated[
            Annotated[GraphRequest, Tag("graph")]
            | Annotated[ExpressionRequest, Tag("expression")]
            | Annotated[ColumnsRequest, Tag("columns")],
            Discriminator(body_kind),
        ]
    ]
):
    """POST /v1/graph: a graph (`nodes`), an expression (`expression`) or a table
    (`columns`)."""


# --- response --------------------------------------------------------------------------


class OutputReport(BaseModel):
    id: str
    value: Tensor | TensorSummary
    shape: list[int]


class NodeReport(BaseModel):
    op: str
    shape: list[int]
    value: Tensor | TensorSummary
    grad: Tensor | TensorSummary | None = Field(
        None, description="d(output)/d(node); absent for const nodes"
    )
    role: str = Field(description="how the op routes gradient (CS231n's gate words); leaf")
    inputs: list[str] | None = Field(
        None, description="the operand ids, in order (absent for leaves): the graph's edges"
    )
    local_grad: dict[str, Number] | None = Field(
        None,
        description="scalar nodes: d(node)/d(operand) by operand id (an operand used twice "
        "gets the sum)",
    )


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


class KinkReport(BaseModel):
    element: list[int] = Field(description="the leaf element that was perturbed")
    at: str = Field(description="the kink node whose operand crossed its kink or tie")
    op: str
    at_element: list[int]
    analytic: Number
    numerical: Number
    relative_error: Number


class NodeGradcheck(BaseModel):
    max_relative_error: Number = Field(description="over checked elements without a kink")
    verdict: Literal["good", "ok for kinks", "uncomfortable", "wrong"]
    elements: int
    checked: int = Field(description="elements compared (kink crossings included)")
    worst_element: list[int] | None
    kink_crossings: int
    kinks: list[KinkReport] = Field(description="the first few kink crossings")
    undefined: int = Field(description="elements whose perturbed forward failed (labels)")


class GradcheckReport(BaseModel):
    passed: bool
    max_relative_error: Number
    per_node: dict[str, Number] = Field(description="leaf id -> its largest relative error")
    verdict: Literal["good", "ok for kinks", "uncomfortable", "wrong"]
    kink_crossings: int
    nodes: dict[str, NodeGradcheck]
    step: float
    tolerance: float
    evaluations: int = Field(description="forward passes run")
    complete: bool = Field(description="false when max_evaluations cut the sample short")


class LeafExplanation(BaseModel):
    id: str
    shape: list[int]
    grad: Number = Field(description="the gradient (a tensor: its largest-magnitude element)")
    magnitude: Number = Field(description="|grad| (a tensor: the gradient's norm)")
    element: list[int]
    sentence: str


class Explanation(BaseModel):
    leaves: list[LeafExplanation] = Field(description="input and param leaves, by |gradient|")


class ColumnsReport(BaseModel):
    """Every node as columns (`report: "columns"`), row i for node i: a columns body's own
    rows; otherwise the topological order, with `id`."""

    id: list[str] | None = Field(
        None, description="the node ids (absent for a columns body without an `id` column)"
    )
    shape: list[list[int]] | None = Field(None, description="only when a node is a tensor")
    value: list[Tensor | TensorSummary] | PackedArray = Field(
        description='in row order; with `encoding: "packed"` a float64 `PackedArray`'
    )
    grad: list[Tensor | TensorSummary | None] | PackedArray = Field(
        description='d(output)/d(node); null for const rows; with `encoding: "packed"` a '
        "float64 `PackedArray`, NaN on const rows"
    )


class GraphResponse(BaseModel):
    output: OutputReport
    nodes: dict[str, NodeReport] | None = Field(
        None, description='every node, in topological order (`report: "nodes"`, the default)'
    )
    columns: ColumnsReport | None = Field(
        None, description='every node as columns (`report: "columns"`; a columns body\'s default)'
    )
    parameters: Parameters
    diagnostics: Diagnostics
    health: Health
    gradcheck: GradcheckReport | None = Field(None, description="with `gradcheck`")
    explanation: Explanation | None = Field(None, description="with `explain: true`")
