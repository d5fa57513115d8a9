"""The columns front end: a graph as a table whose row i is node i, for big scalar graphs.

A micrograd-style graph of 100k one-number nodes costs a Python object per node in the
nodes form (a dict in the JSON, a model, a `NodeSpec`, a report dict). As columns it is a
few flat lists: `ops`, one operand list per operand position (`-1`: none) and the leaf
values. Rows must already be in topological order (each operand's row is smaller), so the
program keeps the request's numbering; the checks below are whole-column NumPy work, and the
level-batching plan (engine.graph) is built straight from the columns.

Only scalars: every leaf value is one number, so every node is a scalar. Tensors go in the
nodes form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from gradiag.engine.errors import GraphError, LimitError, Loc, ShapeError
from gradiag.engine.graph import (
    BATCH_MIN_NODES,
    LeafColumn,
    Limits,
    OperandRows,
    Program,
    RowIds,
    first_seen_codes,
    op_kinds,
    plan_columns,
)
from gradiag.engine.ops import LEAF_OPS, OPS, Array, Shape

NO_ATTRS: Mapping[str, Any] = MappingProxyType({})
MAX_ARITY = max(op.arity for op in OPS.values())


class CodedOps(Sequence[str]):
    """An op column as codes into a legend: row i's op is `names[codes[i]]`. A packed columns
    body sends it so (no string per row); it reads as the list of op names it stands for."""

    def __init__(self, names: Sequence[str], codes: Array) -> None:
        self.names = list(names)
        self.codes = codes

    def __len__(self) -> int:
        return int(self.codes.size)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.names[c] for c in self.codes[i].tolist()]
        return self.names[int(self.codes[i])]

    def __iter__(self) -> Iterator[str]:
        return map(self.names.__getitem__, self.codes.tolist())


class RowLocs(Sequence[Loc]):
    """Where row i sits in the request, `(*prefix, i)`: by default its cell of the `op`
    column; a nodes body's table (service.frontend) says `("nodes", i)`, as compile_graph."""

    def __init__(self, n: int, prefix: Loc = ("columns", "op")) -> None:
        self.n = n
        self.prefix = tuple(prefix)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(self.n)[i]]
        # range: negative rows count from the end, and past the end is an IndexError, so
        # iterating (Sequence's __iter__ reads until IndexError) stops after n locs
        return (*self.prefix, range(self.n)[i])


def compile_columns(
    ops: Sequence[str],
    inputs: Sequence[Sequence[int] | Array],
    values: Sequence[Any] | Array,
    *,
    output: int | str | None = None,
    ids: Sequence[str] | None = None,
    attrs: Sequence[Mapping[str, Any] | None] | None = None,
    limits: Limits | None = None,
    dtype: np.dtype[Any] | type = np.float64,
    locs: Sequence[Loc] | None = None,
) -> Program:
    """Check a table and make it a program (and its batching plan) without a per-row object.

    `ops[i]` is row i's op; `inputs[k][i]` the row of its k-th operand (-1: none); `values[i]`
    a leaf's number (a float or "NaN"/"Infinity"/"-Infinity"; None on op rows); `output` a
    row or an id (default: the last row). Packed columns come as arrays: `ops` a `CodedOps`,
    `inputs[k]` integer arrays, `values` a float array with NaN on every op row. `locs[i]`:
    where row i sits in the request, for errors the run raises (default: its `op` cell)."""
    limits = limits or Limits()
    n = len(ops)
    if limits.max_nodes and n > limits.max_nodes:
        raise LimitError(
            f"the graph has {n} nodes; the limit is {limits.max_nodes}",
            limit="max_nodes",
            value=limits.max_nodes,
            loc=("columns", "op"),
        )
    _check_lengths(n, inputs, values, ids, attrs)
    table = _OpColumn(ops)
    arity = table.arity()
    operands = _operand_columns(inputs, arity, table, n)
    leaf_rows = np.flatnonzero(arity == 0)  # every op of the table takes an operand
    column = _leaf_column(values, leaf_rows, n, dtype)
    row_ids: Sequence[str] = RowIds(n) if ids is None else ids
    if ids is not None:
        _check_unique(ids)
    row_attrs = _attrs(ops, attrs, n)
    flops = _check_shapes(table, arity, row_attrs, limits)
    program = Program(
        ids=row_ids,
        ops=ops,
        operands=OperandRows(operands, arity),
        attrs=row_attrs,
        shapes=[()] * n,
        leaf_values=LeafColumn(column, leaf_rows),
        locs=RowLocs(n) if locs is None else locs,
        output=_output_row(output, row_ids, n),
        dtype=np.dtype(dtype),
        flops=flops,
    )
    program.__dict__["_op_rows"] = {name: table.rows(name) for name in table.names}
    _attach_plan(program, table, operands, has_attrs=any(attrs or ()))
    return program


def _check_lengths(
    n: int,
    inputs: Sequence[Sequence[int] | Array],
    values: Sequence[Any] | Array,
    ids: Sequence[str] | None,
    attrs: Sequence[Any] | None,
) -> None:
    if n == 0:
        raise GraphError("the table has no rows", loc=("columns", "op"))
    if len(inputs) > MAX_ARITY:
        raise GraphError(
            f"inputs has {len(inputs)} rows; an op takes at most {MAX_ARITY} operands",
            loc=("columns", "inputs"),
        )
    named: list[tuple[Loc, int]] = [
        (("columns", "inputs", k), len(r)) for k, r in enumerate(inputs)
    ]
    named.append((("columns", "value"), len(values)))
    if ids is not None:
        named.append((("columns", "id"), len(ids)))
    if attrs is not None:
        named.append((("columns", "attrs"), len(attrs)))
    for loc, length in named:
        if length != n:
            raise GraphError(f"this column has {length} entries; op has {n}", loc=loc)


class _OpColumn:
    """The op column as codes: `names` in order of first appearance, `codes[i]` row i's."""

    def __init__(self, ops: Sequence[str]) -> None:
        self.names: list[str]
        self.codes: Array
        self.names, self.codes = (
            _first_seen_legend(ops) if isinstance(ops, CodedOps) else first_seen_codes(ops)
        )
        for name in self.names:  # the wire schema knows the ops; check again for other callers
            if name not in LEAF_OPS and name not in OPS:
                row = list(ops).index(name)
                raise GraphError(f"row {row}: unknown op {name!r}", loc=("columns", "op", row))

    def arity(self) -> Array:
        table = [0 if name in LEAF_OPS else OPS[name].arity for name in self.names]
        return np.array(table, np.intp)[self.codes]

    def rows(self, name: str) -> Array:
        if name not in self.names:
            return np.empty(0, np.intp)
        return np.flatnonzero(self.codes == self.names.index(name))


def _first_seen_legend(ops: CodedOps) -> tuple[list[str], Array]:
    """A legend's codes renumbered as `first_seen_codes` numbers the names (a name listed
    twice is one op; order of first appearance), so a packed and a list body run alike."""
    codes = ops.codes
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= len(ops.names)):
        i = int(np.flatnonzero((codes < 0) | (codes >= len(ops.names)))[0])
        raise GraphError(
            f"row {i}: op code {int(codes[i])} is not an index into op.names "
            f"(0..{len(ops.names) - 1})",
            loc=("columns", "op", "codes", i),
        )
    names, by_code = first_seen_codes(ops.names)  # legend entry -> distinct name
    merged = by_code[codes]
    first = np.full(len(names), codes.size, np.intp)
    np.minimum.at(first, merged, np.arange(codes.size))
    used = np.flatnonzero(first < codes.size)
    used = used[np.argsort(first[used], kind="stable")]  # first appearance in the rows
    renumber = np.full(len(names), -1, np.intp)
    renumber[used] = np.arange(used.size)
    return [names[k] for k in used.tolist()], renumber[merged]


def _operand_columns(
    inputs: Sequence[Sequence[int] | Array], arity: Array, table: _OpColumn, n: int
) -> Array:
    """(MAX_ARITY, n) operand rows, -1 where a row has fewer operands. Checks that row i has
    exactly its op's arity, in the first positions, and only rows before it."""
    operands = np.full((MAX_ARITY, n), -1, np.intp)
    if inputs:
        for k, row in enumerate(inputs):
            if isinstance(row, np.ndarray):  # a packed integer column
                operands[k] = row
                continue
            try:
                operands[k] = np.fromiter(row, np.intp, n)
            except OverflowError:  # a row number past int64: no row, and -1 is "none"
                i = next(i for i, j in enumerate(row) if not -1 <= j < n)
                raise GraphError(
                    f"row {i}: input {k} is {row[i]}; an operand is a row number, or -1 for none",
                    loc=("columns", "inputs", k, i),
                ) from None
    given = operands[: len(inputs)]  # the rows after them are all -1: nothing to check
    _refuse(given < -1, operands, "an operand is a row number, or -1 for none")
    present = given >= 0
    count = present.sum(axis=0)
    wrong = np.flatnonzero(count != arity)
    if wrong.size:
        i = int(wrong[0])
        raise GraphError(
            f"row {i}: {table.names[table.codes[i]]} takes {arity[i]} input(s), got {count[i]}",
            loc=("columns", "inputs"),
        )
    _refuse(
        present[1:] & ~present[:-1],
        operands,
        "operands fill the first positions: -1 only after the last one",
        first=1,
    )
    _refuse(
        given >= np.arange(n),
        operands,
        "rows are in topological order: an operand's row comes before its user",
    )
    return operands


def _refuse(mask: Array, operands: Array, why: str, first: int = 0) -> None:
    """A GraphError at the first (position, row) the mask marks, if any (`first`: the
    position of the mask's first row)."""
    if mask.any():  # one pass; argwhere only on the way to an error
        k, i = (int(x) for x in np.argwhere(mask)[0])
        k += first
        raise GraphError(
            f"row {i}: input {k} is {operands[k, i]}; {why}", loc=("columns", "inputs", k, i)
        )


def _leaf_column(values: Sequence[Any] | Array, leaf_rows: Array, n: int, dtype: Any) -> Array:
    """Every row's value as one array (NaN on op rows). A leaf row needs a number, an op
    row null (NaN in a packed column): NumPy reads None as NaN, so only NaN cells are looked
    at again."""
    packed = isinstance(values, np.ndarray)
    # fromiter: 4x np.array's time when None is in the list
    column = np.asarray(values, np.float64) if packed else np.fromiter(values, np.float64, n)
    is_leaf = np.zeros(n, bool)
    is_leaf[leaf_rows] = True
    if not packed:  # a packed leaf may be NaN: a float array has no null
        for i in np.flatnonzero(np.isnan(column) & is_leaf).tolist():
            if values[i] is None:
                raise GraphError(f"row {i}: a leaf row needs a value", loc=("columns", "value", i))
    given = np.flatnonzero(~is_leaf & ~np.isnan(column))
    if given.size:
        i = int(given[0])
        raise GraphError(
            f"row {i}: an op row computes its value: give {'NaN' if packed else 'null'}",
            loc=("columns", "value", i),
        )
    return column.astype(dtype, copy=False)


def _check_unique(ids: Sequence[str]) -> None:
    if len(set(ids)) == len(ids):
        return
    first: dict[str, int] = {}
    for i, node_id in enumerate(ids):
        if node_id in first:
            raise GraphError(
                f"duplicate id {node_id!r}: rows {first[node_id]} and {i} both use it",
                loc=("columns", "id", i),
                node=node_id,
            )
        first[node_id] = i


def _attrs(
    ops: Sequence[str], attrs: Sequence[Mapping[str, Any] | None] | None, n: int
) -> list[Mapping[str, Any]]:
    rows: list[Mapping[str, Any]] = [NO_ATTRS] * n
    for i, given in enumerate(attrs or ()):
        if not given:
            continue
        known = OPS[ops[i]].attrs if ops[i] in OPS else {}
        for name in given:
            if name not in known:
                raise GraphError(
                    f"row {i}: {ops[i]} has no attribute {name!r}",
                    loc=("columns", "attrs", i, name),
                )
        rows[i] = dict(given)
    return rows


def _check_shapes(
    table: _OpColumn, arity: Array, attrs: Sequence[Mapping[str, Any]], limits: Limits
) -> int:
    """Every row is a scalar: elementwise ops keep it so; the others (matmul, losses, ...)
    are asked, row by row (they are rare in a scalar table). Returns the flop estimate."""
    n = table.codes.size
    flops = int(np.count_nonzero(arity))  # one per op row, as compile_graph counts scalars
    for name in table.names:
        if name in LEAF_OPS or OPS[name].elementwise:
            continue
        op = OPS[name]
        for i in table.rows(name).tolist():
            scalars: list[Shape] = [()] * int(arity[i])
            try:
                shape = op.shape(*scalars, **attrs[i])
            except ShapeError as err:
                raise ShapeError(
                    f"row {i} ({name}): {err.message}", loc=("columns", "op", i)
                ) from None
            if shape != ():
                raise ShapeError(
                    f"row {i} ({name}): a columns graph holds scalars only",
                    loc=("columns", "op", i),
                )
            flops += op.flops(scalars, shape) - 1
    for name, limit, amount, what in (
        ("max_total_elements", limits.max_total_elements, n, "elements in all tensors"),
        ("max_flops", limits.max_flops, flops, "estimated floating-point operations"),
    ):
        if limit and amount > limit:
            raise LimitError(
                f"the table brings the {what} to {amount}; the limit {name} is {limit}",
                limit=name,
                value=limit,
                loc=("columns", "op"),
            )
    return flops


def _output_row(output: int | str | None, ids: Sequence[str], n: int) -> int:
    if output is None:
        return n - 1
    if isinstance(output, int):
        if not 0 <= output < n:
            raise GraphError(f"output row {output} is not a row (0..{n - 1})", loc=("output",))
        return output
    try:
        return ids.index(output)
    except ValueError:
        raise GraphError(f"output {output!r} is not the id of any row", loc=("output",)) from None


def _attach_plan(program: Program, table: _OpColumn, operands: Array, *, has_attrs: bool) -> None:
    """Build the level plan from the columns (engine.graph would rebuild them from per-row
    tuples). Small or non-elementwise tables take the per-node walk."""
    if len(program) < BATCH_MIN_NODES:
        return
    # without attrs the group kinds are the ops, already coded
    kinds = op_kinds(program, None if has_attrs else (table.names, table.codes))
    if kinds is None:
        return
    codes, names = kinds
    program.__dict__["_plan"] = plan_columns(
        codes, names, (operands[0], operands[1]), program.output, table.rows("const").tolist()
    )
