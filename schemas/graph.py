"""POST /v1/graph: the request (a tagged union of node shapes) and the response.

The node models are made from the engine's op table (`gradiag.engine.ops.OPS`), never listed
here: the ops without attrs by arity (`UnaryNode`, `BinaryNode`, ...), each op with attrs
(or ops sharing the same attrs, as sum and mean) with its own model and an attrs model whose
fields are the table's `Attr`s, with the forward's defaults. A new op row is a new tag.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    create_model,
    with_config,
)
from typing_extensions import TypedDict

from gradiag.engine.gradcheck import GradcheckOptions as EngineGradcheckOptions
from gradiag.engine.ops import LEAF_OPS as ENGINE_LEAF_OPS
from gradiag.engine.ops import OPS, Op
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

LEAF_OPS = tuple(ENGINE_LEAF_OPS)
ALL_OPS = LEAF_OPS + tuple(OPS)
GRADCHECK = EngineGradcheckOptions()  # the engine's defaults
ARITY_WORDS = {1: "Unary", 2: "Binary", 3: "Ternary", 4: "Quaternary", 5: "Quinary"}


# Nodes are TypedDicts, not models: a 100k-node body validates ~2.5x faster into dicts than
# into a model instance per node, and the service reads them as columns anyway.
WIRE = ConfigDict(strict=True, extra="forbid")


@with_config(WIRE)
class LeafNode(TypedDict):
    """`input` (gets a gradient), `param` (gets one and counts as a parameter), `const`."""

    id: NodeId
    op: Literal["input", "param", "const"]
    value: Tensor


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _typed_dict(name: str, doc: str, fields: dict[str, Any]) -> Any:
    typed = TypedDict(name, fields)  # type: ignore[misc]
    typed.__doc__ = doc
    return with_config(WIRE)(typed)


def _wire_kind(kind: Any) -> Any:
    """An attr's type on the wire: its lists stop at the first bad item (FAIL_FAST)."""
    if get_origin(kind) is list:
        return Annotated[kind, FAIL_FAST]
    if get_origin(kind) in (Union, types.UnionType):
        return Union[tuple(_wire_kind(arg) for arg in get_args(kind))]  # noqa: UP007
    return kind


def _attrs_dict(name: str, op: Op) -> Any:
    """An op's attrs: every one optional; an absent one takes the forward's default."""
    defaults = op.attr_defaults()
    fields = {
        attr: NotRequired[
            Annotated[
                _wire_kind(spec.kind),
                Field(description=f"{spec.doc} (default {defaults[attr]!r})"),
            ]
        ]
        for attr, spec in op.attrs.items()
    }
    return _typed_dict(name, f"The settings of `{op.name}`.", fields)


def _node_dict(ops: list[Op]) -> Any:
    """The node shape of ops with the same arity and attrs."""
    first, names = ops[0], tuple(op.name for op in ops)
    stem = "".join(map(_camel, names)) if first.attrs else ARITY_WORDS[first.arity]
    fields: dict[str, Any] = {
        "id": NodeId,
        "op": Literal[names],
        "inputs": Annotated[
            list[NodeId],
            Field(
                min_length=first.arity,
                max_length=first.arity,
                description="the operand ids, in order",
            ),
        ],
    }
    if first.attrs:
        fields["attrs"] = NotRequired[_attrs_dict(f"{stem}Attrs", first)]
    meanings = "; ".join(f"`{op.name}`: {op.meaning}" for op in ops)
    return _typed_dict(f"{stem}Node", meanings, fields)


def _op_node_dicts() -> list[Any]:
    groups: dict[tuple[Any, ...], list[Op]] = {}
    for op in OPS.values():
        key = (op.arity, tuple((name, repr(spec.kind)) for name, spec in op.attrs.items()))
        groups.setdefault(key, []).append(op)
    return [_node_dict(ops) for ops in groups.values()]


NODE_SHAPES: tuple[Any, ...] = (LeafNode, *_op_node_dicts())

if TYPE_CHECKING:
    Node = dict[str, Any]
else:
    Node = Annotated[Union[NODE_SHAPES], Field(discriminator="op")]  # noqa: UP007


class GradcheckOptions(WireModel):
    """`"gradcheck": true` uses these defaults; an object sets any of them."""

    step: float = Field(GRADCHECK.step, gt=0.0, le=1.0, description="h of the centred difference")
    tolerance: float = Field(
        GRADCHECK.tolerance,
        ge=0.0,
        description="passed when the largest relative error is at most this",
    )
    max_elements_per_node: int = Field(
        GRADCHECK.max_elements_per_node,
        ge=1,
        le=100_000,
        description="elements checked per leaf (a seeded sample beyond)",
    )
    max_evaluations: int = Field(
        GRADCHECK.max_evaluations,
        ge=2,
        le=100_000,
        description="forward passes overall (two per element)",
    )
    seed: int = Field(GRADCHECK.seed, ge=0, le=2**32 - 1, description="seeds the element sample")


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


class RunOptions(WireModel):
    """What every /v1/graph body may ask for beside its graph."""

    gradcheck: Gradcheck = False
    thresholds: Thresholds = Thresholds()
    batch_axis: int = Field(
        0,
        ge=0,
        le=31,
        description="the axis of an activation node (rank >= 2) that indexes the examples; "
        "the other positions are its units (rank 2) or the axis after it its channels",
    )
    explain: bool = Field(
        False,
        description="add `explanation` (leaves ranked by gradient) and, in `nodes`, each "
        "node's `role`, `inputs` and `local_grad`",
    )


class GraphRequest(RunOptions):
    """A computational graph. Nodes may come in any order; the graph must be acyclic."""

    nodes: Annotated[list[Node], Field(min_length=1), FAIL_FAST]
    output: NodeId = Field(description="the id of the node whose gradient is taken")
    output_grad: Tensor | None = Field(
        None, description="upstream gradient at the output (default: all ones)"
    )
    report: Layout = "nodes"
    tensors: Tensors = "full"


class ExpressionRequest(RunOptions):
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
    report: Layout = "nodes"
    tensors: Tensors = "full"


def _column_attrs() -> type[WireModel]:
    """Every attr of every op, optional: the attrs of a columns row (its op's only)."""
    fields: dict[str, Any] = {}
    for op in OPS.values():
        for name, spec in op.attrs.items():
            kind = _wire_kind(spec.kind)
            kind = kind if name not in fields else fields[name][0] | kind
            fields[name] = (kind | None, Field(None, description=f"{op.name}: {spec.doc}"))
    return create_model(
        "ColumnAttrs",
        __base__=WireModel,
        __doc__="An op's settings on a columns row: the same names as the nodes form's `attrs`.",
        **fields,
    )


if TYPE_CHECKING:
    ColumnAttrs = WireModel
else:
    ColumnAttrs = _column_attrs()


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


class ColumnsRequest(RunOptions):
    """The table body for big scalar graphs: columns in, columns out (see docs/api.md)."""

    columns: GraphColumns
    output: Annotated[int, Field(ge=0)] | NodeId | None = Field(
        None, description="the output node: a row number or an id (default: the last row)"
    )
    output_grad: Number | None = Field(
        None, description="upstream gradient at the output (default: 1)"
    )
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
    role: str | None = Field(
        None, description="with `explain`: how the op routes gradient (CS231n's gate words)"
    )
    inputs: list[str] | None = Field(
        None,
        description="with `explain`: the operand ids, in order (absent for leaves): the edges",
    )
    local_grad: dict[str, Number] | None = Field(
        None,
        description="with `explain`, scalar nodes: d(node)/d(operand) by operand id (an "
        "operand used twice gets the sum)",
    )


class Parameters(BaseModel):
    tensors: int = Field(description="param nodes")
    total: int = Field(description="elements in param nodes (a param used twice counts once)")


class ReluStats(BaseModel):
    nodes: int
    elements: int
    dead_elements: int = Field(description="elements whose input is <= 0 (inactive)")
    dead_fraction: float
    units: int = Field(0, description="units of the nodes with a batch axis (rank >= 2)")
    dead_units: int = Field(0, description="units whose input is <= 0 on every example")
    dead_unit_fraction: float = 0.0
    margin_nodes: int = Field(
        0,
        description="relu nodes with no op with weights after them on any path to the "
        "output (a hinge's max(0, .)): counted, not graded",
    )


class SaturationStats(BaseModel):
    nodes: int
    elements: int
    saturated_elements: int
    saturated_fraction: float
    units: int = Field(0, description="units of the nodes with a batch axis (rank >= 2)")
    saturated_units: int = Field(0, description="units saturated on every example")
    saturated_unit_fraction: float = 0.0


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
