"""The one compiler: every body (graph JSON, expression, table, network) becomes a `Program`.

A front end hands over a `Table`, row i for node i in request order: the op of each row, its
operands (row numbers, or ids to resolve), leaf values, ids, attrs and where each row sits in
the request (`Locs`, for errors). `compile_table` checks everything a graph can get wrong, in
one place and in this order, naming the node and field at fault: the node count, ops and
arity, attrs, unique ids and references, the output, cycles, shapes and the size limits.
Rows keep the request's order when it is topological (every operand before its user);
otherwise they are renumbered in Kahn's order, ties in request order. Then the executor's
walk is planned once (`engine.plan`). Nothing large is allocated before the limits pass, and
nothing here recurses, so depth is bounded by the node limit, not the stack.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from gradiag.engine.errors import GraphError, Loc, ShapeError, check_limits
from gradiag.engine.ops import LEAF_OPS, OPS, Array, Shape
from gradiag.engine.plan import Plan, first_seen_codes, make_plan

NO_ATTRS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Limits:
    """Refuse a graph before anything large is allocated. 0 means no limit."""

    max_nodes: int = 0
    max_tensor_elements: int = 0
    max_total_elements: int = 0
    max_flops: int = 0
    max_scratch_elements: int = 0  # the temporary buffer one op allocates (conv's im2col)


class Locs(Protocol):
    """Where a request row sits in the request: `at(row, *field)` is the loc of that field
    of that row (no field: the row itself)."""

    def at(self, row: int, *field: str | int) -> Loc: ...


@dataclass(frozen=True)
class RowLocs:
    """A list of nodes: `("nodes", row, *field)`."""

    prefix: Loc = ("nodes",)

    def at(self, row: int, *field: str | int) -> Loc:
        return (*self.prefix, row, *field)


@dataclass(frozen=True)
class ColumnLocs:
    """A table of columns: the cell `("columns", field, row)`, the row's `op` cell when no
    field is named. `inputs` is a list of columns: operand k of a row is the cell
    `("columns", "inputs", k, row)`, and the row's operands as a whole are `inputs`."""

    def at(self, row: int, *field: str | int) -> Loc:
        name, *rest = field or ("op",)
        if name == "inputs":
            return ("columns", "inputs", *rest, row) if rest else ("columns", "inputs")
        return ("columns", name, row, *rest)


@dataclass(frozen=True)
class ListLocs:
    """Each row's own loc, as a front end gave it (`NodeSpec.loc`)."""

    locs: Sequence[Loc]

    def at(self, row: int, *field: str | int) -> Loc:
        return (*self.locs[row], *field)


@dataclass
class Table:
    """A graph as a front end hands it to `compile_table`: row i is node i, in request order.

    `names`/`codes`: row i's op is `names[codes[i]]` (leaf ops included). Operands are either
    `operands`, (k, n) row numbers with -1 for none (k >= the largest arity), or
    `references`, each row's
    operand ids. A leaf's value is in `scalars` (a float per row; only leaf rows are read)
    unless it is a tensor, in `tensors` by row. Front ends check that leaves have a value."""

    names: list[str]
    codes: Array
    scalars: Array
    tensors: dict[int, Array]
    locs: Locs
    operands: Array | None = None
    references: Sequence[Sequence[str]] | None = None
    ids: Sequence[str] | None = None
    attrs: Sequence[Mapping[str, Any] | None] | None = None

    def __len__(self) -> int:
        return int(self.codes.size)


@dataclass(frozen=True)
class Program:
    """Nodes numbered 0..n-1 in topological order, as columns: each row's op (`names`,
    `codes`), its operand rows, attrs, shape and (leaves) value, and the executor's plan."""

    ids: list[str] | None  # None: row i is called "i" (a table without an id column)
    names: list[str]
    codes: Array  # (n,) row i's op is names[codes[i]]
    operands: Array  # (k, n): row i's k-th operand row, -1 for none (k: the most operands)
    arity: Array  # (n,) operands of row i (0 for leaves)
    attrs: Sequence[Mapping[str, Any]]
    shapes: list[Shape]
    ranks: Array  # (n,) len(shapes[i]): 0 for a scalar node
    scalars: Array  # (n,) the value of each scalar leaf, in the program's dtype
    tensors: dict[int, Array]  # the value of each tensor leaf
    locs: Locs
    source: Array | None  # row i's request row (None: the same)
    output: int
    dtype: np.dtype[Any]
    flops: int
    elements: int  # of all nodes' values
    scratch: int  # the most temporary elements one op allocates
    plan: Plan
    # Nodes whose gradient nobody reads (network mode's input batch X): backward neither
    # computes nor passes it on, and reports None for them, as for a const.
    no_grad: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return int(self.codes.size)

    def op(self, i: int) -> str:
        return self.names[int(self.codes[i])]

    def ops(self) -> list[str]:
        """Every row's op name, in row order."""
        return list(map(self.names.__getitem__, self.codes.tolist()))

    def node_id(self, i: int) -> str:
        return str(i) if self.ids is None else self.ids[i]

    def node_ids(self, rows: Sequence[int] | Array | None = None) -> list[str]:
        """The ids of `rows` (default: every row, in order)."""
        if rows is None:
            return list(map(str, range(len(self)))) if self.ids is None else list(self.ids)
        picked = rows.tolist() if isinstance(rows, np.ndarray) else list(rows)
        if self.ids is None:
            return list(map(str, picked))
        return list(map(self.ids.__getitem__, picked))

    def loc(self, i: int, *field: str | int) -> Loc:
        return self.locs.at(i if self.source is None else int(self.source[i]), *field)

    def rows_of(self, *ops: str) -> Array:
        """The rows of these ops, ascending."""
        wanted = [k for k, name in enumerate(self.names) if name in ops]
        return np.flatnonzero(np.isin(self.codes, wanted))

    def inputs(self, i: int) -> list[int]:
        """Row i's operand rows, in order."""
        return [int(j) for j in self.operands[: self.arity[i], i]]

    def has_grad(self, i: int) -> bool:
        return self.op(i) != "const" and i not in self.no_grad


def compile_table(
    table: Table,
    output: int | str,
    *,
    limits: Limits = Limits(),
    dtype: np.dtype[Any] | type = np.float64,
    no_grad: frozenset[str] = frozenset(),
    in_order: bool = False,
) -> Program:
    """Check a table and make it a program (see the module's docstring for the order).
    `in_order`: rows out of topological order are an error rather than sorted (a columns
    body promises its rows are)."""
    n = len(table)
    check_node_count(n, limits, loc=table.locs.at(0)[:-1])
    if n == 0:
        raise GraphError("the graph has no nodes", loc=table.locs.at(0)[:-1])
    _check_ops(table)
    arity = np.array([OPS[name].arity if name in OPS else 0 for name in table.names], np.intp)
    arity = arity[table.codes]
    index = _check_ids(table)
    operands = table.operands
    if operands is None:
        assert table.references is not None
        operands = _resolve(table, index, arity)
    else:
        _check_operands(table, operands, arity)
    attrs = _check_attrs(table)
    out = _output_row(table, output, index)
    order = _topological_order(table, operands, arity, in_order)
    ids = None if table.ids is None else list(table.ids)
    codes, scalars, tensors, source = table.codes, table.scalars, table.tensors, None
    if order is not None:
        source = order
        position = np.empty(n, np.intp)
        position[order] = np.arange(n)
        operands = np.where(operands >= 0, position[np.maximum(operands, 0)], -1)[:, order]
        codes, arity, scalars = codes[order], arity[order], scalars[order]
        attrs = [attrs[k] for k in order.tolist()]
        ids = None if ids is None else [ids[k] for k in order.tolist()]
        tensors = {int(position[k]): v for k, v in tensors.items()}
        out = int(position[out])
    dtype = np.dtype(dtype)
    tensors = {i: np.asarray(v, dtype) for i, v in tensors.items()}
    sizes = _infer_shapes(table, codes, arity, operands, attrs, tensors, source, limits, ids)
    shapes, flops, elements, scratch, scalar = sizes
    ranks = _ranks(shapes) if tensors else np.zeros(n, np.intp)  # scalars make scalars
    with_attrs = table.attrs is not None and any(table.attrs)
    no_grad_rows = frozenset(index_of(ids, name, n) for name in no_grad)
    graded = ~np.isin(codes, [k for k, name in enumerate(table.names) if name == "const"])
    graded[list(no_grad_rows)] = False
    plan = make_plan(table.names, codes, attrs, operands, scalar, graded, with_attrs=with_attrs)
    return Program(
        ids=ids,
        names=table.names,
        codes=codes,
        operands=operands,
        arity=arity,
        attrs=attrs,
        shapes=shapes,
        ranks=ranks,
        scalars=scalars.astype(dtype, copy=False),
        tensors=tensors,
        locs=table.locs,
        source=source,
        output=out,
        dtype=dtype,
        flops=flops,
        elements=elements,
        scratch=scratch,
        plan=plan,
        no_grad=no_grad_rows,
    )


def check_node_count(n: int, limits: Limits, *, loc: Loc) -> None:
    """The node limit, before any per-node work."""
    check_limits([("max_nodes", limits.max_nodes, n, "the graph's node count is")], loc=loc)


def index_of(ids: Sequence[str] | None, name: str, n: int) -> int:
    """The row of an id (a table without ids: its row number)."""
    if ids is None:
        return int(name) if name.isdigit() and int(name) < n else -1
    return list(ids).index(name)


def _name(table: Table, row: int) -> str:
    """How a message names a request row: its id, else its row number."""
    return f"node {table.ids[row]!r}" if table.ids is not None else f"row {row}"


def _node(table: Table, row: int) -> str | None:
    return None if table.ids is None else table.ids[row]


def _check_ops(table: Table) -> None:
    for k, name in enumerate(table.names):
        if name not in OPS and name not in LEAF_OPS:
            row = int(np.argmax(table.codes == k))
            raise GraphError(
                f"{_name(table, row)}: unknown op {name!r}",
                loc=table.locs.at(row, "op"),
                node=_node(table, row),
            )


def _check_ids(table: Table) -> dict[str, int] | None:
    """{id: row} when the table has ids; a duplicate id is an error at its second row."""
    if table.ids is None:
        return None
    index = dict(zip(table.ids, range(len(table.ids)), strict=True))
    if len(index) == len(table.ids):
        return index
    first: dict[str, int] = {}
    for row, node_id in enumerate(table.ids):
        if node_id in first:
            raise GraphError(
                f"duplicate id {node_id!r}: rows {first[node_id]} and {row} both use it",
                loc=table.locs.at(row, "id"),
                node=node_id,
            )
        first[node_id] = row
    raise AssertionError("unreachable: a duplicate was counted")


def _resolve(table: Table, index: dict[str, int] | None, arity: Array) -> Array:
    """The (k, n) operand rows of `references` (each row's operand ids): every id
    looked up in one C-level map; NumPy spreads them into columns. An unknown id or a
    wrong count is an error at the row's `inputs`."""
    references = table.references
    assert references is not None and index is not None
    counts = np.fromiter(map(len, references), np.intp, len(references))
    wrong = np.flatnonzero(counts != arity)
    if wrong.size:
        row = int(wrong[0])
        _arity_error(table, row, int(arity[row]), int(counts[row]))
    try:
        named = np.fromiter(map(index.__getitem__, chain.from_iterable(references)), np.intp)
    except KeyError:
        for row, refs in enumerate(references):
            for k, ref in enumerate(refs):
                if ref not in index:
                    raise GraphError(
                        f"{_name(table, row)}: input {ref!r} is not the id of any node",
                        loc=table.locs.at(row, "inputs", k),
                        node=_node(table, row),
                    ) from None
        raise
    flat = np.append(named, -1)  # the -1 a missing operand reads
    starts = np.cumsum(counts) - counts
    return np.stack(
        [
            flat[np.where(counts > k, starts + k, flat.size - 1)]
            for k in range(max(int(counts.max(initial=0)), 1))
        ]
    )


def _arity_error(table: Table, row: int, want: int, got: int) -> None:
    op = table.names[int(table.codes[row])]
    if op in LEAF_OPS:
        message = f"{_name(table, row)}: a {op} node carries a value and no inputs"
    else:
        message = f"{_name(table, row)}: {op} takes {want} input(s), got {got}"
    raise GraphError(message, loc=table.locs.at(row, "inputs"), node=_node(table, row))


def _check_operands(table: Table, operands: Array, arity: Array) -> None:
    """Given operand rows: in range, filling the first positions, as many as the op takes."""
    n = len(table)
    present = operands >= 0
    bad = (operands < -1) | (operands >= n)
    if bad.any():
        k, row = (int(x) for x in np.argwhere(bad)[0])
        raise GraphError(
            f"{_name(table, row)}: input {k} is {operands[k, row]}; an operand is a row "
            "number, or -1 for none",
            loc=table.locs.at(row, "inputs", k),
            node=_node(table, row),
        )
    count = present.sum(axis=0)
    wrong = np.flatnonzero(count != arity)
    if wrong.size:
        row = int(wrong[0])
        _arity_error(table, row, int(arity[row]), int(count[row]))
    gap = present[1:] & ~present[:-1]
    if gap.any():
        k, row = (int(x) for x in np.argwhere(gap)[0])
        raise GraphError(
            f"{_name(table, row)}: input {k + 1} is {operands[k + 1, row]}; operands fill the "
            "first positions: -1 only after the last one",
            loc=table.locs.at(row, "inputs", k + 1),
            node=_node(table, row),
        )


def _check_attrs(table: Table) -> list[Mapping[str, Any]]:
    """Each row's attrs (NO_ATTRS for none); an attr its op does not have is an error."""
    n = len(table)
    rows: list[Mapping[str, Any]] = [NO_ATTRS] * n
    for row, given in enumerate(table.attrs or ()):
        if not given:
            continue
        op = table.names[int(table.codes[row])]
        known = OPS[op].attrs if op in OPS else {}
        for name in given:
            if name not in known:
                raise GraphError(
                    f"{_name(table, row)}: {op} has no attribute {name!r}",
                    loc=table.locs.at(row, "attrs", name),
                    node=_node(table, row),
                )
        rows[row] = dict(given)
    return rows


def _output_row(table: Table, output: int | str, index: dict[str, int] | None) -> int:
    n = len(table)
    if isinstance(output, int):
        if not 0 <= output < n:
            raise GraphError(f"output row {output} is not a row (0..{n - 1})", loc=("output",))
        return output
    row = index.get(output) if index is not None else None
    if row is None and index is None and output.isascii() and output.isdigit():
        row = int(output) if str(int(output)) == output and int(output) < n else None
    if row is None:
        raise GraphError(f"output {output!r} is not the id of any node", loc=("output",))
    return row


def _topological_order(table: Table, operands: Array, arity: Array, in_order: bool) -> Array | None:
    """None when every operand's row is before its user's (the request's order is kept);
    else the request rows in Kahn's order, ties in request order. Names a cycle."""
    n = len(table)
    rows = np.arange(n)
    after = operands >= rows
    if not after.any():
        return None
    if in_order:
        k, row = (int(x) for x in np.argwhere(after)[0])
        raise GraphError(
            f"{_name(table, row)}: input {k} is {operands[k, row]}; rows are in topological "
            "order: an operand's row comes before its user",
            loc=table.locs.at(row, "inputs", k),
            node=_node(table, row),
        )
    users: list[list[int]] = [[] for _ in range(n)]
    pending = arity.tolist()
    for k in range(operands.shape[0]):
        for user, j in zip(rows.tolist(), operands[k].tolist(), strict=True):
            if j >= 0:
                users[j].append(user)
    ready = deque(row for row in range(n) if pending[row] == 0)
    order: list[int] = []
    while ready:
        row = ready.popleft()
        order.append(row)
        for user in users[row]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    if len(order) < n:
        cycle = _find_cycle(operands, pending)
        names = " -> ".join(repr(table.ids[k]) if table.ids else str(k) for k in cycle)
        raise GraphError(
            f"the graph has a cycle: {names}",
            loc=table.locs.at(cycle[0]),
            node=_node(table, cycle[0]),
        )
    return np.array(order, np.intp)


def _find_cycle(operands: Array, pending: Sequence[int]) -> list[int]:
    """Every unsorted node has an unsorted operand, so walking operands must revisit one."""
    start = next(k for k in range(len(pending)) if pending[k] > 0)
    seen: dict[int, int] = {}
    path: list[int] = []
    k = start
    while k not in seen:
        seen[k] = len(path)
        path.append(k)
        k = next(int(j) for j in operands[:, k] if j >= 0 and pending[j] > 0)
    cycle = path[seen[k] :]
    return [*reversed(cycle), cycle[-1]]


def _infer_shapes(
    table: Table,
    codes: Array,
    arity: Array,
    operands: Array,
    attrs: Sequence[Mapping[str, Any]],
    tensors: Mapping[int, Array],
    source: Array | None,
    limits: Limits,
    ids: Sequence[str] | None,
) -> tuple[list[Shape], int, int, int, Array]:
    """(shapes, flops, elements, scratch, scalar): every node's shape from its operands'
    (Python ints only), the work and size estimates, and which nodes are scalars of scalar
    operands (those the executor may batch). Checks the limits as it goes."""
    n = codes.size
    op_of = [OPS.get(name) for name in table.names]

    def where(i: int) -> tuple[Loc, str | None]:
        return table.locs.at(i if source is None else int(source[i])), ids[i] if ids else None

    if not tensors and all(op is None or op.batches for op in op_of):
        # a scalar graph: every node is a number, one operation each
        ops = int(np.count_nonzero(arity))
        _check_sizes(limits, 1, n, ops, 0, table.locs.at(n - 1)[:-1], None)
        return [()] * n, ops, n, 0, np.ones(n, bool)
    shapes: list[Shape] = []
    scalar = np.zeros(n, bool)
    total = flops = scratch = 0
    max_tensor = limits.max_tensor_elements or math.inf  # a limit of 0 is none
    max_total = limits.max_total_elements or math.inf
    max_flops = limits.max_flops or math.inf
    max_scratch = limits.max_scratch_elements or math.inf
    for i, code in enumerate(codes.tolist()):
        op = op_of[code]
        ins: list[Shape] = []
        if op is None:  # a leaf
            shape: Shape = tensors[i].shape if i in tensors else ()
            work = extra = 0
        else:
            ins = [shapes[j] for j in operands[: arity[i], i].tolist()]
            if op.batches and not any(ins):  # scalars in, a scalar out
                shape, work, extra = (), 1, 0
            else:
                try:
                    shape = op.shape(*ins, **attrs[i])
                except ShapeError as err:
                    loc, node = where(i)
                    name = f"node {node!r}" if node is not None else f"row {loc[-1]}"
                    message = f"{name} ({op.name}): {err.message}"
                    raise ShapeError(message, loc=loc, node=node) from None
                work, extra = op.flops(ins, shape, **attrs[i]), op.scratch(ins, shape, **attrs[i])
        shapes.append(shape)
        scalar[i] = not shape and not any(ins)
        elements = math.prod(shape)
        total, flops, scratch = total + elements, flops + work, max(scratch, extra)
        if elements > max_tensor or total > max_total or flops > max_flops or extra > max_scratch:
            _check_sizes(limits, elements, total, flops, extra, *where(i))
    return shapes, flops, total, scratch, scalar


def _check_sizes(
    limits: Limits, elements: int, total: int, flops: int, scratch: int, loc: Loc, node: str | None
) -> None:
    brings = f"node {node!r} brings the" if node is not None else "the graph brings the"
    check_limits(
        [
            ("max_tensor_elements", limits.max_tensor_elements, elements,
             f"{brings} elements in one tensor to"),
            ("max_total_elements", limits.max_total_elements, total,
             f"{brings} elements in all tensors to"),
            ("max_flops", limits.max_flops, flops,
             f"{brings} estimated floating-point operations to"),
            ("max_scratch_elements", limits.max_scratch_elements, scratch,
             f"{brings} elements of one op's temporary buffer to"),
        ],
        loc=loc,
        node=node,
    )  # fmt: skip


def _ranks(shapes: Sequence[Shape]) -> Array:
    return np.fromiter(map(len, shapes), np.intp, len(shapes))


# --- front ends: lists of nodes --------------------------------------------------------


@dataclass(slots=True)
class NodeSpec:
    """One node as a front end hands it over (expressions, networks, tests). `loc` is where
    it sits in the request."""

    id: str
    op: str
    inputs: tuple[str, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict)
    value: Array | None = None
    loc: Loc = ()


def specs_table(nodes: Sequence[NodeSpec]) -> Table:
    """A list of `NodeSpec`s as a table (ids resolved by the compiler)."""
    names, codes = first_seen_codes([spec.op for spec in nodes])
    scalars = np.zeros(len(nodes))
    tensors: dict[int, Array] = {}
    for row, spec in enumerate(nodes):
        if spec.op in LEAF_OPS:
            if spec.value is None or spec.inputs:
                raise GraphError(
                    f"node {spec.id!r}: a {spec.op} node carries a value and no inputs",
                    loc=spec.loc,
                    node=spec.id,
                )
            value = np.asarray(spec.value)
            if value.ndim:
                tensors[row] = value
            else:
                scalars[row] = value
    return Table(
        names=names,
        codes=codes,
        scalars=scalars,
        tensors=tensors,
        locs=ListLocs([spec.loc for spec in nodes]),
        references=[spec.inputs for spec in nodes],
        ids=[spec.id for spec in nodes],
        attrs=[spec.attrs for spec in nodes],
    )


def compile_graph(
    nodes: Sequence[NodeSpec],
    output: str,
    *,
    limits: Limits = Limits(),
    dtype: np.dtype[Any] | type = np.float64,
    no_grad: frozenset[str] = frozenset(),
) -> Program:
    """`compile_table` of a list of `NodeSpec`s."""
    check_node_count(len(nodes), limits, loc=("nodes",))  # before a row of the table
    return compile_table(specs_table(nodes), output, limits=limits, dtype=dtype, no_grad=no_grad)
