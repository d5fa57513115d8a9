"""How the executor walks a program: topological levels x groups, planned once at compile.

A node's level is 1 + its deepest operand's (leaves: 0); nodes of one level do not depend on
each other. Within a level the nodes form groups:

- a *batched* group: scalar nodes (shape (), scalar operands) of one op and attrs whose op
  `batches` (elementwise). The group runs as ONE call of the op's forward on 1-D arrays
  gathered from a flat value buffer: a graph of 100k one-number nodes (micrograd style)
  costs a few NumPy calls per level instead of Python per node;
- a *single* group: any other node (a tensor, a matmul, a loss), run on its own.

The plan numbers the op nodes in plan order (level, then batched groups by kind, then the
single nodes, rows ascending within each) and puts them at the front of the value buffer,
the leaves after them, so a batched group's values are one contiguous slice. For the
backward of the batched nodes whose op `scales` it lists every (consumer, operand) edge:
those into op nodes, in the consumer's plan order (a level's edges are one slice), and those
into leaves (added once, at the end). `engine.executor` runs the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradiag.engine.ops import OPS, Array, Op


@dataclass(slots=True)
class Group:
    """Plan positions [start, stop) of one op and attrs. A single group holds one node,
    `row`, its operand rows, `inputs`, and which of them take a gradient, `needs` (not a
    const, not a `no_grad` leaf), both read on every run; a batched one runs its nodes as
    one call (`row` is -1)."""

    op: Op
    attrs: Mapping[str, Any]
    start: int
    stop: int
    row: int = -1
    inputs: tuple[int, ...] = ()
    needs: tuple[bool, ...] = ()

    @property
    def batched(self) -> bool:
        return self.row < 0


@dataclass(slots=True)
class Level:
    start: int  # its slice of the plan order: its batched groups first, then its singles
    stop: int
    batched: list[Group]
    singles: list[Group]
    arity: int  # the most operands a batched group of it takes
    edge_span: tuple[int, int]  # its slice of `Plan.inner_edges`
    leaf_span: tuple[int, int]  # its slice of `Plan.leaf_edges`
    edges_distinct: bool  # no target repeats in its inner edges, so `+=` is exact
    exact_groups: list[Group]  # its batched groups whose op does not `scale`

    @property
    def groups(self) -> list[Group]:
        return self.batched + self.singles


@dataclass(slots=True)
class Edges:
    """Operand edges, by buffer position: the consuming op node, the operand it reads, and
    where the local derivative d consumer / d operand is in the flattened partials."""

    consumer: Array
    target: Array
    partial: Array


@dataclass(slots=True)
class Kind:
    """The batched nodes of one (op, attrs), over all levels: their local derivatives are one
    call of the op."""

    op: Op
    attrs: Mapping[str, Any]
    positions: Array  # in plan order


@dataclass
class Plan:
    """`order[p]` is the row at buffer position p (op nodes in plan order, then the leaves);
    `position` the inverse, with `position[n] = n`, a scratch slot that "no operand" reads;
    `operands[k][p]` the position of the k-th operand of the op node at p (n for none)."""

    levels: list[Level]
    order: Array
    position: Array
    operands: tuple[Array, ...]
    n_ops: int
    kinds: list[Kind]  # the batched kinds (local derivatives, one call each)
    width: int  # operand slots per node in the partials: a power of two >= batched arity
    inner_edges: Edges  # scaling batched nodes' edges into op nodes
    leaf_edges: Edges  # and into leaves

    @property
    def leaves(self) -> Array:
        return self.order[self.n_ops :]


def make_plan(
    names: Sequence[str],
    codes: Array,
    attrs: Sequence[Mapping[str, Any]],
    operands: Array,
    scalar: Array,
    graded: Array,
    *,
    with_attrs: bool = True,
) -> Plan:
    """The plan of a program: `codes[i]` indexes `names` (leaf ops included), `operands` is
    (k, n) (-1: none), `scalar[i]` True where node i and its operands are scalars,
    `graded[i]` True where node i takes a gradient. `with_attrs`: False when no row has
    attrs (then no row is looked at for them)."""
    n = codes.size
    is_op = np.array([name in OPS for name in names], bool)[codes]
    inner = np.flatnonzero(is_op)
    levels = _levels(inner, operands, n)
    kind, kinds_of = _kinds(names, codes, attrs if with_attrs else None, scalar & is_op)
    n_kinds = len(kinds_of)
    key = levels[inner] * (n_kinds + 1) + np.where(kind[inner] >= 0, kind[inner], n_kinds)
    ops_order = inner[_stable_order(key)]
    m = ops_order.size
    order = np.concatenate((ops_order, np.flatnonzero(~is_op))).astype(np.intp)
    position = np.empty(n + 1, np.intp)
    position[order] = np.arange(n)
    position[n] = n
    buffer_operands = tuple(position[column[ops_order]] for column in operands)
    level_of, kind_of = levels[ops_order], kind[ops_order]
    batched_arity = max((OPS[kinds_of[k][0]].arity for k in range(n_kinds)), default=1)
    width = 1 << (batched_arity - 1).bit_length()
    scales = np.array([OPS[op].scales for op, _ in kinds_of] + [False], bool)[kind_of]
    inner_edges, leaf_edges = _split_edges(buffer_operands, n, m, scales, width)
    level_starts = _starts(level_of)
    bounds = [*level_starts.tolist(), m]
    edge_bounds = np.searchsorted(inner_edges.consumer, bounds).tolist()
    leaf_bounds = np.searchsorted(leaf_edges.consumer, bounds).tolist()
    distinct = _distinct_by_level(level_of[inner_edges.consumer], inner_edges.target, levels)
    groups, first_group = _groups(
        ops_order, level_of, kind_of, kinds_of, names, codes, attrs, operands, graded
    )
    plan_levels = []
    for k in range(len(bounds) - 1):
        start, stop = bounds[k], bounds[k + 1]
        mine = groups[first_group[k] : first_group[k + 1]]
        batched = [g for g in mine if g.row < 0]  # a level's batched groups come first
        plan_levels.append(
            Level(
                start,
                stop,
                batched,
                mine[len(batched) :],
                max((g.op.arity for g in batched), default=0),
                (edge_bounds[k], edge_bounds[k + 1]),
                (leaf_bounds[k], leaf_bounds[k + 1]),
                bool(distinct[int(level_of[start])]),
                [g for g in batched if not g.op.scales],
            )
        )
    kinds = [
        Kind(OPS[op], op_attrs, positions)
        for code, (op, op_attrs) in enumerate(kinds_of)
        if (positions := np.flatnonzero(kind_of == code)).size
    ]
    return Plan(
        plan_levels,
        order,
        position,
        buffer_operands,
        m,
        kinds,
        width,
        inner_edges,
        leaf_edges,
    )


def _kinds(
    names: Sequence[str],
    codes: Array,
    attrs: Sequence[Mapping[str, Any]] | None,
    batchable: Array,
) -> tuple[Array, list[tuple[str, Mapping[str, Any]]]]:
    """Each row's batched kind (an index into the kinds, -1: not batched) and the kinds'
    (op, attrs), in order of first appearance. Without attrs (the usual case) a kind is an
    op, read off the op codes; attrs split an op into one kind per distinct attrs."""
    batches = np.array([name in OPS and OPS[name].batches for name in names], bool)
    if attrs is None or not any(attrs):  # a kind per op that batches, in `names` order
        remap = np.where(batches, np.cumsum(batches) - 1, -1)
        kind = np.where(batchable, remap[codes], -1)
        return kind, [(name, {}) for name, batched in zip(names, batches, strict=True) if batched]
    rows = np.flatnonzero(batchable & batches[codes])
    kind = np.full(codes.size, -1, np.intp)
    keys = [(names[codes[i]], _hashable(attrs[i])) for i in rows.tolist()]
    distinct_keys, key_codes = first_seen_codes(keys)
    kind[rows] = key_codes
    _, first = np.unique(key_codes, return_index=True)  # each kind's first row among `rows`
    return kind, [
        (op, attrs[int(rows[at])]) for (op, _), at in zip(distinct_keys, first, strict=True)
    ]


def _hashable(attrs: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()))


def first_seen_codes(keys: Sequence[Any]) -> tuple[list[Any], Array]:
    """The distinct keys in order of first appearance, and each row's index among them:
    one pass in C (dict.fromkeys, map), not a Python loop per row."""
    distinct = list(dict.fromkeys(keys))
    code_of = {key: k for k, key in enumerate(distinct)}
    return distinct, np.fromiter(map(code_of.__getitem__, keys), np.intp, len(keys))


def _groups(
    ops_order: Array,
    level_of: Array,
    kind_of: Array,
    kinds_of: Sequence[tuple[str, Mapping[str, Any]]],
    names: Sequence[str],
    codes: Array,
    attrs: Sequence[Mapping[str, Any]],
    operands: Array,
    graded: Array,
) -> tuple[list[Group], list[int]]:
    """The groups in plan order (runs of one batched kind within a level, and each single
    node alone), and the index of each level's first group (then their count)."""
    m = ops_order.size
    if not m:
        return [], [0]
    within = np.where(kind_of >= 0, kind_of, len(kinds_of) + np.arange(m))
    key = level_of * (len(kinds_of) + m) + within
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    kind_ops = [(OPS[op], op_attrs) for op, op_attrs in kinds_of]
    op_of = [OPS.get(name) for name in names]
    groups = []
    for start, stop, kind, row, code in zip(
        starts.tolist(),
        [*starts[1:].tolist(), m],
        kind_of[starts].tolist(),
        ops_order[starts].tolist(),
        codes[ops_order[starts]].tolist(),
        strict=True,
    ):
        if kind >= 0:
            op, op_attrs = kind_ops[kind]
            groups.append(Group(op, op_attrs, start, stop))
        else:
            single = op_of[code]
            assert single is not None  # an op row
            inputs = operands[: single.arity, row]
            needs = tuple(graded[inputs].tolist())
            groups.append(
                Group(single, attrs[row], start, stop, row, tuple(inputs.tolist()), needs)
            )
    level_starts = np.flatnonzero(np.concatenate(([True], level_of[1:] != level_of[:-1])))
    return groups, [*np.searchsorted(starts, level_starts).tolist(), len(groups)]


def _split_edges(
    buffer_operands: tuple[Array, ...], n: int, m: int, scales: Array, width: int
) -> tuple[Edges, Edges]:
    """The (op node, operand) edges of the batched nodes whose op `scales`, but the missing
    operands, in plan order of the op node: those into op nodes and those into leaves.
    Edge e = width * p + k is op p's k-th operand (filled by strided 1-d copies)."""
    targets = np.full(width * m, n, np.intp)
    kept = np.zeros(width * m, bool)
    for k, column in enumerate(buffer_operands[:width]):
        targets[k::width] = column
        kept[k::width] = scales
    shift = width.bit_length() - 1

    def edges(at: Array) -> Edges:  # the flattened (width, m) partials: row k, column p
        consumer = at >> shift
        return Edges(consumer, targets[at], consumer + (at & (width - 1)) * m)

    # flatnonzero, then take: ~3x faster than boolean-mask indexing on a random mask
    into_ops = kept & (targets < m)
    into_leaves = kept & (targets >= m) & (targets != n)
    return edges(np.flatnonzero(into_ops)), edges(np.flatnonzero(into_leaves))


def _stable_order(key: Array) -> Array:
    """The stable sort order of integer keys. Keys that fit 16 bits unsigned sort as uint16,
    for which NumPy's stable sort is a radix sort: ~5x faster than a merge sort on 100k."""
    if key.size and int(key.min()) >= 0 and int(key.max()) < 1 << 16:
        key = key.astype(np.uint16)
    return np.argsort(key, kind="stable")


def _starts(keys: Array) -> Array:
    """Where each run of equal keys starts, in a sorted array."""
    if not keys.size:
        return np.empty(0, np.intp)
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))


def _levels(inner: Array, operands: Array, n: int) -> Array:
    """1 + the deepest operand's level (leaves: 0), in topological (row) order. A Python loop
    over plain ints, each level depending on the ones before it; it runs over the op rows
    only, renumbered 1.. in order, so it can append (leaves and "no operand" read the level
    0 at slot 0). The operand columns are read through memoryviews and the levels go back
    by `np.fromiter`: both faster than lists. Columns no row uses are left out."""
    rank = np.zeros(n + 1, np.intp)  # row -> 1 + its rank among the op rows; row -1 -> 0
    rank[inner] = np.arange(1, inner.size + 1)
    used = [column for column in operands if (column[inner] >= 0).any()]
    views = [rank[column[inner]].data for column in used]
    level = [0]
    append = level.append
    if len(views) == 1:
        for a in views[0]:
            append(level[a] + 1)
    elif len(views) == 2:
        for a, b in zip(*views, strict=True):
            x = level[a]
            y = level[b]
            append(x + 1 if x > y else y + 1)
    elif views:
        for ranks in zip(*views, strict=True):
            append(max([level[r] for r in ranks]) + 1)
    else:
        level.extend([1] * inner.size)
    by_row = np.zeros(n, np.intp)
    by_row[inner] = np.fromiter(level, np.intp, len(level))[1:]
    return by_row


def _distinct_by_level(level_of: Array, column: Array, levels: Array) -> Array:
    """Indexed by level number: True when no value of `column` repeats among the rows of that
    level (`level_of`: each row's level), so a `+=` scattering to them is exact."""
    distinct = np.ones(int(levels.max(initial=0)) + 2, bool)
    if level_of.size:
        span = int(column.max()) + 1
        key = np.sort(level_of * span + column)
        distinct[key[1:][key[1:] == key[:-1]] // span] = False
    return distinct
