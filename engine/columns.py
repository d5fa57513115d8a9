"""The columns front end: a graph as a table whose row i is node i, for big scalar graphs.

A micrograd-style graph of 100k one-number nodes costs a Python object per node in the
nodes form (a dict in the JSON, a model, a report dict). As columns it is a few flat lists:
`ops`, one operand list per operand position (`-1`: none) and the leaf values, or the same
packed as binary arrays. This module checks what is particular to the wire's table form
(column lengths, rows in topological order, a value on every leaf row and on no other) and
hands a `Table` to the one compiler (`engine.compiler`), which checks the rest.

Only scalars: every leaf value is one number (so every node is one). Tensors go in the
nodes form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradiag.engine.compiler import (
    ColumnLocs,
    Limits,
    Program,
    Table,
    check_node_count,
    compile_table,
)
from gradiag.engine.errors import GraphError, Loc
from gradiag.engine.ops import LEAF_OPS, MAX_ARITY, Array
from gradiag.engine.plan import first_seen_codes


@dataclass(frozen=True)
class CodedOps:
    """An op column as codes into a legend: row i's op is `names[codes[i]]` (a packed
    columns body sends it so: no string per row)."""

    names: Sequence[str]
    codes: Array

    def __len__(self) -> int:
        return int(self.codes.size)


def compile_columns(
    ops: Sequence[str] | CodedOps,
    inputs: Sequence[Sequence[int] | Array],
    values: Sequence[Any] | Array,
    *,
    output: int | str | None = None,
    ids: Sequence[str] | None = None,
    attrs: Sequence[Mapping[str, Any] | None] | None = None,
    limits: Limits | None = None,
    dtype: np.dtype[Any] | type = np.float64,
) -> Program:
    """Check a table and compile it.

    `ops[i]` is row i's op; `inputs[k][i]` the row of its k-th operand (-1: none); `values[i]`
    a leaf's number (a float or "NaN"/"Infinity"/"-Infinity"; None on op rows); `output` a
    row or an id (default: the last row). Packed columns come as arrays: `ops` a `CodedOps`,
    `inputs[k]` integer arrays, `values` a float array with NaN on every op row."""
    n = len(ops)
    limits = limits or Limits()
    check_node_count(n, limits, loc=("columns", "op"))  # before any per-row work
    _check_lengths(n, inputs, values, ids, attrs)
    names, codes = _coded(ops)
    operands = _operand_columns(inputs, n)
    table = Table(
        names=names,
        codes=codes,
        scalars=_leaf_column(values, names, codes),
        tensors={},
        locs=ColumnLocs(),
        operands=operands,
        ids=ids,
        attrs=attrs,
    )
    output = n - 1 if output is None else output
    return compile_table(table, output, limits=limits, dtype=dtype, in_order=True)


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


def _coded(ops: Sequence[str] | CodedOps) -> tuple[list[str], Array]:
    """The op column as (names, codes), names in order of first appearance in the rows (a
    legend's order does not matter, and a name listed twice is one op)."""
    if not isinstance(ops, CodedOps):
        return first_seen_codes(ops)
    codes = ops.codes
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= len(ops.names)):
        i = int(np.flatnonzero((codes < 0) | (codes >= len(ops.names)))[0])
        raise GraphError(
            f"row {i}: op code {int(codes[i])} is not an index into op.names "
            f"(0..{len(ops.names) - 1})",
            loc=("columns", "op", "codes", i),
        )
    names, by_code = first_seen_codes(list(ops.names))  # legend entry -> distinct name
    merged = by_code[codes]
    first = np.full(len(names), codes.size, np.intp)
    np.minimum.at(first, merged, np.arange(codes.size))
    used = np.flatnonzero(first < codes.size)
    used = used[np.argsort(first[used], kind="stable")]  # first appearance in the rows
    renumber = np.full(len(names), -1, np.intp)
    renumber[used] = np.arange(used.size)
    return [names[k] for k in used.tolist()], renumber[merged]


def _operand_columns(inputs: Sequence[Sequence[int] | Array], n: int) -> Array:
    """(k, n) operand rows (k: the lists given, at least one), -1 where a row has fewer
    operands."""
    operands = np.full((max(len(inputs), 1), n), -1, np.intp)
    for k, column in enumerate(inputs):
        if isinstance(column, np.ndarray):  # a packed integer column
            operands[k] = column
            continue
        try:
            operands[k] = np.fromiter(column, np.intp, n)
        except OverflowError:  # a row number past int64: no row, and -1 is "none"
            i = next(i for i, j in enumerate(column) if not -1 <= j < n)
            raise GraphError(
                f"row {i}: input {k} is {column[i]}; an operand is a row number, or -1 for none",
                loc=("columns", "inputs", k, i),
            ) from None
    return operands


def _leaf_column(values: Sequence[Any] | Array, names: Sequence[str], codes: Array) -> Array:
    """Every row's value as one float64 array (NaN on op rows). A leaf row needs a number, an
    op row null (NaN in a packed column): NumPy reads None as NaN, so only NaN cells are
    looked at again."""
    n = codes.size
    packed = isinstance(values, np.ndarray)
    # fromiter: 4x np.array's time when None is in the list
    column = np.asarray(values, np.float64) if packed else np.fromiter(values, np.float64, n)
    is_leaf = np.array([name in LEAF_OPS for name in names], bool)[codes]
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
    return column
