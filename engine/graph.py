"""A validated graph as a small compiled program, and its forward and backward walks.

`compile_graph` checks a list of `NodeSpec`s (ids, ops, arity, references, cycles, shapes,
limits) and numbers the nodes 0..n-1 in topological order: the request's own order when it
already is one (every operand before its user), otherwise Kahn's order, ties in request
order. `forward` walks that order once;
`backward` walks it once in reverse, each op adding its vector-Jacobian product into its
operands' gradient slots. The op table (`engine.ops.OPS`) is the only place that knows what
an op does. Nothing here recurses, so depth is bounded by the node limit, not the stack.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradiag.engine.errors import EngineError, GraphError, LimitError, Loc, ShapeError
from gradiag.engine.ops import LEAF_OPS, OPS, Array, Shape, all_finite


@dataclass(slots=True)
class NodeSpec:
    """One node as a front end hands it over. `loc` is where it sits in the request."""

    id: str
    op: str
    inputs: tuple[str, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict)
    value: Array | None = None
    loc: Loc = ()


@dataclass(frozen=True)
class Limits:
    """Refuse a graph before anything large is allocated. 0 means no limit."""

    max_nodes: int = 0
    max_tensor_elements: int = 0
    max_total_elements: int = 0
    max_flops: int = 0


@dataclass
class Program:
    """Nodes numbered in topological order: op, operand indices, attrs, shapes, leaf values."""

    ids: Sequence[str]
    ops: Sequence[str]
    operands: Sequence[tuple[int, ...]]
    attrs: Sequence[Mapping[str, Any]]
    shapes: list[Shape]
    leaf_values: Mapping[int, Array]
    locs: Sequence[Loc]
    output: int
    dtype: np.dtype[Any]
    flops: int
    # Nodes whose gradient nobody reads (network mode's input batch X): backward neither
    # computes nor passes it on, and reports None for them, as for a const.
    no_grad: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.ids)

    def is_leaf(self, i: int) -> bool:
        return self.ops[i] in LEAF_OPS


class LeafColumn(Mapping[int, Array]):
    """The leaf values of a scalar program as one array (`column[i]` for each leaf row i):
    a columns body hands its values over without a 0-d array per leaf."""

    def __init__(self, column: Array, rows: Array) -> None:
        self.column = column
        self.rows = rows  # the leaf rows, ascending

    def __getitem__(self, i: int) -> Array:
        return np.asarray(self.column[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows.tolist())

    def __len__(self) -> int:
        return int(self.rows.size)


class RowIds(Sequence[str]):
    """The ids of a table without an `id` column (engine.columns): row i is called "i"."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if type(i) is int and 0 <= i < self.n:  # the common case first: it is called per row
            return str(i)
        if isinstance(i, slice):
            return [str(k) for k in range(self.n)[i]]
        return str(range(self.n)[i])  # negative rows; IndexError beyond

    def __iter__(self) -> Iterator[str]:
        return map(str, range(self.n))

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        # "3" is row 3; "03", "+3" and other digits than 0-9 name no row
        row = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else -1
        if str(row) == value and start <= row < (self.n if stop is None else stop):
            return row
        raise ValueError(value)


class OperandRows(Sequence[tuple[int, ...]]):
    """Row i's operand rows as a tuple, read off the operand columns on demand (`columns[k]`:
    every row's k-th operand, -1 for none)."""

    def __init__(self, columns: Array, arity: Array) -> None:
        self.columns = columns  # (MAX_ARITY or fewer, n)
        self._arity = arity
        self._lists: tuple[list[list[int]], list[int]] | None = None

    def __len__(self) -> int:
        return int(self._arity.size)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        if self._lists is None:  # plain ints once: tuples for 100k rows cost ~10 ms
            self._lists = (self.columns.tolist(), self._arity.tolist())
        columns, arity = self._lists
        return tuple(column[i] for column in columns[: arity[i]])


@dataclass
class Result:
    """Forward values and gradients, indexed like the program. `grads[i]` is None for a const
    and for a `no_grad` leaf. A batched scalar run also keeps them as one array each
    (`flat_grads`: 0 for consts)."""

    program: Program
    values: Sequence[Array]
    grads: Sequence[Array | None]
    flat_values: Array | None = None
    flat_grads: Array | None = None


class ScalarColumn(Sequence[Any]):
    """A batched run's values or gradients, read as a list of NumPy scalars would be (None
    on the `missing` rows: consts have no gradient) but kept as one array: a list of 100k
    scalars costs ~4 ms to build and nobody reads most of it."""

    def __init__(self, column: Array, missing: Sequence[int] = ()) -> None:
        self.column = column
        self.missing = frozenset(missing)

    def __len__(self) -> int:
        return int(self.column.size)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        if self.missing and i in self.missing:
            return None
        return self.column[i]

    def __iter__(self) -> Iterator[Any]:
        if not self.missing:
            return iter(self.column)
        return (self[i] for i in range(len(self)))


def op_rows(program: Program) -> dict[str, Array]:
    """The rows of each op of the program, ascending (kept on it): whole-column questions
    (which nodes are relus, params, consts) without a Python loop per row."""
    rows: dict[str, Array] | None = program.__dict__.get("_op_rows")
    if rows is None:
        names, codes = first_seen_codes(program.ops)
        rows = {name: np.flatnonzero(codes == k) for k, name in enumerate(names)}
        program.__dict__["_op_rows"] = rows
    return rows


def first_seen_codes(keys: Sequence[Any]) -> tuple[list[Any], Array]:
    """The distinct keys in order of first appearance, and each row's index among them:
    one pass in C (dict.fromkeys, map), not a Python loop per row."""
    distinct = list(dict.fromkeys(keys))
    code_of = {key: k for k, key in enumerate(distinct)}
    return distinct, np.fromiter(map(code_of.__getitem__, keys), np.intp, len(keys))


def compile_graph(
    nodes: Sequence[NodeSpec],
    output: str,
    *,
    limits: Limits = Limits(),
    dtype: np.dtype[Any] | type = np.float64,
    no_grad: frozenset[str] = frozenset(),
) -> Program:
    """Check the nodes and number them 0..n-1 in topological order. Nodes keep the request's
    order when it is topological; otherwise Kahn's order, ties in request order. So a graph
    written operands first (as micrograd's `build_topo` writes it) keeps its numbering, and
    the columns front end (engine.columns) numbers the same graph alike."""
    if limits.max_nodes and len(nodes) > limits.max_nodes:
        raise LimitError(
            f"the graph has {len(nodes)} nodes; the limit is {limits.max_nodes}",
            limit="max_nodes",
            value=limits.max_nodes,
            loc=("nodes",),
        )
    index = _index_ids(nodes)
    operands_by_request = [_check_node(spec, index) for spec in nodes]
    if output not in index:
        raise GraphError(f"output {output!r} is not the id of any node", loc=("output",))
    order = _topological_order(nodes, operands_by_request)
    position, operands = _renumbered(order, operands_by_request)
    ordered = [nodes[k] for k in order]
    leaf_values: dict[int, Array] = {}  # filled by _infer_shapes
    program = Program(
        ids=[spec.id for spec in ordered],
        ops=[spec.op for spec in ordered],
        operands=operands,
        attrs=[dict(spec.attrs) for spec in ordered],
        shapes=[],
        leaf_values=leaf_values,
        locs=[spec.loc for spec in ordered],
        output=position[index[output]],
        dtype=np.dtype(dtype),
        flops=0,
    )
    _infer_shapes(program, ordered, limits, leaf_values)
    program.no_grad = frozenset(position[index[name]] for name in no_grad)  # ids -> rows
    return program


def _index_ids(nodes: Sequence[NodeSpec]) -> dict[str, int]:
    index: dict[str, int] = {}
    for k, spec in enumerate(nodes):
        if spec.id in index:
            first = index[spec.id]
            raise GraphError(
                f"duplicate id {spec.id!r}: nodes {first} and {k} both use it",
                loc=(*spec.loc, "id"),
                node=spec.id,
            )
        index[spec.id] = k
    return index


def _check_node(spec: NodeSpec, index: Mapping[str, int]) -> tuple[int, ...]:
    """Op known, arity right, attrs known, operands exist. Returns operand request indices."""
    if spec.op in LEAF_OPS:
        if spec.value is None or spec.inputs:
            raise GraphError(
                f"node {spec.id!r}: a {spec.op} node carries a value and no inputs",
                loc=spec.loc,
                node=spec.id,
            )
        return ()
    op = OPS.get(spec.op)
    if op is None:
        raise GraphError(
            f"node {spec.id!r}: unknown op {spec.op!r}", loc=(*spec.loc, "op"), node=spec.id
        )
    if len(spec.inputs) != op.arity:
        raise GraphError(
            f"node {spec.id!r}: {spec.op} takes {op.arity} input(s), got {len(spec.inputs)}",
            loc=(*spec.loc, "inputs"),
            node=spec.id,
        )
    for name in spec.attrs:
        if name not in op.attrs:
            raise GraphError(
                f"node {spec.id!r}: {spec.op} has no attribute {name!r}",
                loc=(*spec.loc, "attrs", name),
                node=spec.id,
            )
    operands = []
    for k, ref in enumerate(spec.inputs):
        if ref not in index:
            raise GraphError(
                f"node {spec.id!r}: input {ref!r} is not the id of any node",
                loc=(*spec.loc, "inputs", k),
                node=spec.id,
            )
        operands.append(index[ref])
    return tuple(operands)


def _topological_order(
    nodes: Sequence[NodeSpec], operands: Sequence[tuple[int, ...]]
) -> Sequence[int]:
    """The request indices in topological order: the request's own order (a `range`) when
    every operand comes before its user, else Kahn's algorithm, ties in request order (FIFO,
    so it would put every leaf first). Names a cycle."""
    if all(j < k for k, ins in enumerate(operands) for j in ins):
        return range(len(nodes))
    n = len(nodes)
    users: list[list[int]] = [[] for _ in range(n)]
    pending = [0] * n
    for k, ins in enumerate(operands):
        pending[k] = len(ins)
        for j in ins:
            users[j].append(k)
    ready = deque(k for k in range(n) if pending[k] == 0)
    order: list[int] = []
    while ready:
        k = ready.popleft()
        order.append(k)
        for user in users[k]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    if len(order) < n:
        cycle = _find_cycle(operands, pending)
        names = " -> ".join(repr(nodes[k].id) for k in cycle)
        first = nodes[cycle[0]]
        raise GraphError(f"the graph has a cycle: {names}", loc=first.loc, node=first.id)
    return order


def _renumbered(
    order: Sequence[int], operands_by_request: list[tuple[int, ...]]
) -> tuple[Sequence[int], list[tuple[int, ...]]]:
    """Each request index's new row, and every row's operand rows. The request's own order
    (the usual case) needs no renumbering."""
    if isinstance(order, range):
        return order, operands_by_request
    position = [0] * len(order)
    for new, old in enumerate(order):
        position[old] = new
    return position, [tuple(position[j] for j in operands_by_request[k]) for k in order]


def _find_cycle(operands: Sequence[tuple[int, ...]], pending: Sequence[int]) -> list[int]:
    """Every unsorted node has an unsorted operand, so walking operands must revisit one."""
    start = next(k for k in range(len(pending)) if pending[k] > 0)
    seen: dict[int, int] = {}
    path: list[int] = []
    k = start
    while k not in seen:
        seen[k] = len(path)
        path.append(k)
        k = next(j for j in operands[k] if pending[j] > 0)
    cycle = path[seen[k] :]
    return [*reversed(cycle), cycle[-1]]


def _infer_shapes(
    program: Program, ordered: Sequence[NodeSpec], limits: Limits, leaf_values: dict[int, Array]
) -> None:
    total = 0
    shapes = program.shapes
    # a limit of 0 is no limit: compare against infinity and skip the per-node call
    max_tensor = limits.max_tensor_elements or math.inf
    max_total = limits.max_total_elements or math.inf
    max_flops = limits.max_flops or math.inf
    for i, spec in enumerate(ordered):
        if program.is_leaf(i):
            assert spec.value is not None
            value = np.asarray(spec.value, dtype=program.dtype)
            leaf_values[i] = value
            shape: Shape = value.shape
        else:
            op = OPS[spec.op]
            operand_shapes = [shapes[j] for j in program.operands[i]]
            if op.elementwise and not any(operand_shapes):  # scalars in, a scalar out
                shapes.append(())
                program.flops += 1
                total += 1
                if total > max_total or program.flops > max_flops:
                    _check_size(limits, spec, 1, total, program.flops)
                continue
            try:
                shape = op.shape(*operand_shapes, **program.attrs[i])
            except ShapeError as err:
                raise ShapeError(
                    f"node {spec.id!r} ({spec.op}): {err.message}", loc=spec.loc, node=spec.id
                ) from None
            program.flops += op.flops(operand_shapes, shape)
        shapes.append(shape)
        elements = math.prod(shape)
        total += elements
        if elements > max_tensor or total > max_total or program.flops > max_flops:
            _check_size(limits, spec, elements, total, program.flops)


def _check_size(limits: Limits, spec: NodeSpec, elements: int, total: int, flops: int) -> None:
    checks = (
        ("max_tensor_elements", limits.max_tensor_elements, elements, "elements in one tensor"),
        ("max_total_elements", limits.max_total_elements, total, "elements in all tensors"),
        ("max_flops", limits.max_flops, flops, "estimated floating-point operations"),
    )
    for name, limit, amount, what in checks:
        if limit and amount > limit:
            raise LimitError(
                f"node {spec.id!r} brings the {what} to {amount}; the limit {name} is {limit}",
                limit=name,
                value=limit,
                loc=spec.loc,
                node=spec.id,
            )


def forward(
    program: Program, *, deadline: float | None = None
) -> tuple[Sequence[Array], list[Any] | _BatchedForward]:
    """Values and caches of every node, in topological order. `deadline` (a
    `time.monotonic()` value) is checked between ops (per node, or per batched group level)."""
    check_deadline(deadline)
    plan = batch_plan(program)
    if plan is not None:
        return _forward_batched(program, plan, deadline)
    values: list[Array] = []
    caches: list[Any] = []
    operands_of, attrs_of, leaf_values = program.operands, program.attrs, program.leaf_values
    with np.errstate(all="ignore"):  # overflow is data (reported as non-finite), not a crash
        for i, op_name in enumerate(program.ops):
            if deadline is not None and time.monotonic() > deadline:
                check_deadline(deadline)  # every node: a single op may be a big matmul
            if op_name in LEAF_OPS:
                values.append(leaf_values[i])
                caches.append(None)
                continue
            operands = list(map(values.__getitem__, operands_of[i]))
            attrs = attrs_of[i]
            try:
                op = OPS[op_name]
                out, cache = op.forward(*operands, **attrs) if attrs else op.forward(*operands)
            except EngineError as err:
                raise type(err)(
                    f"node {program.ids[i]!r} ({program.ops[i]}): {err.message}",
                    loc=program.locs[i],
                    node=program.ids[i],
                ) from None
            values.append(np.asarray(out))
            caches.append(cache)
    return values, caches


def backward(
    program: Program,
    caches: Sequence[Any] | _BatchedForward,
    output_grad: Array | None = None,
    *,
    deadline: float | None = None,
) -> Sequence[Array | None]:
    """d(output)/d(node) for every node but consts and `program.no_grad` (None for those).
    Gradients add up at forks. Ops that take `needs` skip the gradients of such operands."""
    n = len(program)
    out = program.output
    no_grad = program.no_grad
    grads: list[Array | None] = [None] * n
    if output_grad is None:
        grads[out] = np.ones(program.shapes[out], program.dtype)
    else:
        seed = np.asarray(output_grad, dtype=program.dtype)
        if seed.shape != program.shapes[out]:
            raise ShapeError(
                f"output_grad has shape {list(seed.shape)}; the output {program.ids[out]!r} "
                f"has shape {list(program.shapes[out])}",
                loc=("output_grad",),
            )
        grads[out] = seed
    if isinstance(caches, _BatchedForward):
        batched = _backward_batched(program, caches, grads[out], deadline)  # type: ignore[arg-type]
        if no_grad:
            return [None if i in no_grad else g for i, g in enumerate(batched)]
        return batched
    ops, operands_of, shapes = program.ops, program.operands, program.shapes
    with np.errstate(all="ignore"):
        for i in range(out, -1, -1):
            if deadline is not None and time.monotonic() > deadline:
                check_deadline(deadline)  # every node: a single op may be a big matmul
            dout = grads[i]
            if dout is None or ops[i] in LEAF_OPS or i in no_grad:
                continue
            op = OPS[ops[i]]
            operands = operands_of[i]
            if op.takes_needs:  # a matmul skips the product for an operand nobody reads
                needs = tuple(ops[j] != "const" and j not in no_grad for j in operands)
                local = op.backward(dout, caches[i], needs)
            else:
                local = op.backward(dout, caches[i])
            for j, d in zip(operands, local, strict=True):
                if d is None or ops[j] == "const" or j in no_grad:
                    continue
                if type(d) is not np.ndarray or d.shape != shapes[j]:  # else it is as it is
                    d = unbroadcast(d, shapes[j])
                # A new array, never `+=`: the slot may alias a gradient another node holds.
                grads[j] = d if grads[j] is None else grads[j] + d
    for i in range(n):  # unreached (or not differentiable) nodes: gradient 0
        if ops[i] == "const" or i in no_grad:
            grads[i] = None  # even when the const is the output and was seeded above
        elif grads[i] is None:
            grads[i] = np.zeros(shapes[i], program.dtype)
    return grads


def unbroadcast(grad: Array, shape: Shape) -> Array:
    """Sum a gradient of a broadcast shape back to the operand's `shape`."""
    grad = np.asarray(grad)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return np.broadcast_to(grad, shape) if grad.shape != shape else grad


def check_deadline(deadline: float | None) -> None:
    """Raise LimitError(limit="time_budget_seconds") once `time.monotonic()` is past
    `deadline`. The engine does not know the budget itself; the service fills in `value`."""
    if deadline is not None and time.monotonic() > deadline:
        raise LimitError(
            "the request ran over its time budget", limit="time_budget_seconds", value=0
        )


def run(
    program: Program, output_grad: Array | None = None, *, deadline: float | None = None
) -> Result:
    values, caches = forward(program, deadline=deadline)
    grads = backward(program, caches, output_grad, deadline=deadline)
    if isinstance(caches, _BatchedForward):
        return Result(program, values, grads, caches.values, caches.grads)
    return Result(program, values, grads)


# --- level batching: scalar-heavy graphs as a few NumPy calls per level -----------------
#
# A graph of one-number nodes (micrograd style) spends its time in Python per node. Nodes at
# the same topological level do not depend on each other, so each level runs as a few NumPy
# calls: the level's operands are gathered from a flat value buffer in one fancy index per
# operand position, and every (op, attrs) group of the level is one call of the op's own
# forward on a slice of them. The buffer holds the op nodes in plan order (level, then
# group), so a group's outputs are a contiguous slice, then the leaves.
#
# Backward first takes the local derivatives, d node / d operand, of every node whose op
# `scales` (its backward is dout times a derivative made from the cache alone), one call
# per op kind over all its nodes at once: the op's own backward at an upstream gradient of
# 1. Then it walks the levels from the top; a level's gradients are complete when it is
# reached, so each edge from it into an op node below adds gradient x derivative to that
# node's slot in a flat gradient buffer: one gather, one multiply and one scatter per level
# (`+=` when no target repeats in the level, `np.add.at` otherwise): the products the op's
# backward makes, summed in level order rather than the per-node walk's. The other ops'
# groups (div, log, sqrt, reciprocal) call their backward at the level's gradients. The
# edges into leaves, which nothing reads during the walk, are added after it in one
# `np.bincount`. When a gradient comes out NaN or infinite the backward is redone group by
# group with the ops' backward: a relu blocks an infinite gradient (0, where inf * 0 would
# be NaN) and a node without a path to the output adds nothing. Only ops marked
# `elementwise` in the op table are batched; any other graph takes the per-node walk.

BATCH_MIN_NODES = 256  # below this the per-node walk is about as fast


@dataclass(slots=True)
class _Group:
    op_name: str
    attrs: Mapping[str, Any]
    start: int  # its slice of the plan order (and of the value buffer)
    stop: int
    arity: int


@dataclass(slots=True)
class _Level:
    start: int  # its slice of the plan order
    stop: int
    groups: list[_Group]
    arity: int  # the most operands a group of it takes
    edge_span: tuple[int, int]  # its slice of `_Plan.inner_edges` (its scaling nodes' edges)
    edges_distinct: bool  # no target repeats in that slice, so `+=` is exact
    exact_groups: list[_Group]  # its groups whose op does not `scale`: backward per group


@dataclass(slots=True)
class _Edges:
    """Operand edges, by buffer position: the consuming op node, the operand it reads, and
    where the derivative d consumer / d operand is in the flattened (2, n_ops) partials."""

    consumer: Array
    target: Array
    partial: Array


@dataclass(slots=True)
class _Kind:
    """The op nodes of one (op, attrs), over all levels: their local derivatives are one call."""

    op_name: str
    attrs: Mapping[str, Any]
    arity: int
    positions: Array  # in the plan order


@dataclass
class _Plan:
    """`order[p]` is the node at buffer position p (op nodes in plan order, then the leaves);
    `position` the inverse; `operands[k][p]` the buffer position of the k-th operand of the
    op node at p (the last slot, a scratch one, where it has none)."""

    levels: list[_Level]
    order: Array
    position: Array
    operands: tuple[Array, ...]
    n_ops: int
    consts: list[int]
    edges: tuple[Array, Array]  # the program's first and second operand rows (-1: none)
    output: int
    kinds: list[_Kind]  # the op kinds that `scale`
    inner_edges: _Edges  # their edges into op nodes, in plan order of their consumers
    leaf_edges: _Edges  # their edges into leaves

    @property
    def leaves(self) -> Array:
        return self.order[self.n_ops :]


@dataclass
class _BatchedForward:
    """What a batched forward hands its backward: the plan and the values. No op caches: the
    backward evaluates the ops again, all nodes of a kind at once, from the value buffer."""

    plan: _Plan
    values: Array  # the values in row order
    buffer: Array  # the values in plan order (the forward's buffer)
    grads: Array | None = None  # the gradients in row order, once backward ran


_NONE = np.empty(0, np.intp)
_NO_EDGES = _Edges(_NONE, _NONE, _NONE)
_NOT_BATCHABLE = _Plan([], _NONE, _NONE, (), 0, [], (_NONE, _NONE), 0, [], _NO_EDGES, _NO_EDGES)


def batch_plan(program: Program) -> _Plan | None:
    """The level groups of a scalar-heavy program (built once, kept on it), or None."""
    plan = program.__dict__.get("_plan")
    if plan is None:
        plan = _build_plan(program) or _NOT_BATCHABLE
        program.__dict__["_plan"] = plan
    return None if plan is _NOT_BATCHABLE else plan


def _build_plan(program: Program) -> _Plan | None:
    n = len(program)
    if n < BATCH_MIN_NODES or any(program.shapes):  # a shape () is falsy: all scalars
        return None
    kinds = op_kinds(program)
    if kinds is None:
        return None
    codes, names = kinds
    first = np.array([ins[0] if ins else -1 for ins in program.operands], np.intp)
    second = np.array([ins[1] if len(ins) > 1 else -1 for ins in program.operands], np.intp)
    consts = [i for i, op in enumerate(program.ops) if op == "const"]
    return plan_columns(codes, names, (first, second), program.output, consts)


def op_kinds(
    program: Program, coded: tuple[list[Any], Array] | None = None
) -> tuple[Array, list[tuple[str, Mapping[str, Any]]]] | None:
    """A code per node for its (op, attrs) (-1: leaf), and the (op, attrs) of each code, in
    order of first appearance (the order groups run within a level). None when an op is not
    elementwise. Without attrs anywhere (the usual case) a node's kind is its op; `coded`
    is the op column already coded by `first_seen_codes` (a caller that knows there are no
    attrs)."""
    if coded is None:
        keys: Sequence[Any] = program.ops
        if any(program.attrs):  # leaky_relu's alpha: one kind per (op, attrs)
            keys = [
                (op, tuple(sorted(attrs.items()))) if attrs else op
                for op, attrs in zip(program.ops, program.attrs, strict=True)
            ]
        coded = first_seen_codes(keys)
    distinct, codes = coded
    ops = [key if isinstance(key, str) else key[0] for key in distinct]
    if any(op not in LEAF_OPS and not OPS[op].elementwise for op in ops):
        return None
    names: list[tuple[str, Mapping[str, Any]]] = []
    remap: list[int] = []
    for key, op in zip(distinct, ops, strict=True):
        if op in LEAF_OPS:
            remap.append(-1)
        else:
            remap.append(len(names))
            names.append((op, {} if isinstance(key, str) else dict(key[1])))
    return np.array(remap, np.intp)[codes], names


def plan_columns(
    codes: Array,
    names: Sequence[tuple[str, Mapping[str, Any]]],
    operands: tuple[Array, Array],
    output: int,
    consts: list[int],
) -> _Plan:
    """The level plan of a scalar program given as columns: `codes[i]` indexes `names`
    (-1: leaf), `operands` the first and second operand of each node (-1: none)."""
    n = codes.size
    inner = np.flatnonzero(codes >= 0)
    levels = _levels(inner, operands, n)
    key = levels[inner] * (len(names) + 1) + codes[inner]  # (level, code): one group each
    by_key = _stable_order(key)
    ops_order = inner[by_key]
    m = ops_order.size
    order = np.concatenate((ops_order, np.flatnonzero(codes < 0))).astype(np.intp)
    position = np.empty(n + 1, np.intp)
    position[order] = np.arange(n)
    position[n] = n  # operand -1 (none) reads and writes the scratch slot n
    buffer_operands = tuple(position[column[ops_order]] for column in operands)
    level_of, code_of = levels[ops_order], codes[ops_order]
    group_starts = _starts(key[by_key])
    level_starts = _starts(level_of)
    n_levels = level_starts.size + 1  # numbered 1.., every one used (0: the leaves)
    scales = np.array([OPS[op].scales for op, _ in names], bool)
    inner_edges, leaf_edges = _split_edges(buffer_operands, n, scales[code_of])
    edge_bounds = np.searchsorted(inner_edges.consumer, [*level_starts.tolist(), m]).tolist()
    edges_distinct = _distinct_by_level(
        level_of[inner_edges.consumer], inner_edges.target, n_levels
    )[1:].tolist()
    arity_of = np.array([OPS[op].arity for op, _ in names], np.intp)[code_of]
    level_arity = np.maximum.reduceat(arity_of, level_starts).tolist() if m else []
    groups = [
        _Group(names[code][0], names[code][1], start, stop, arity)
        for code, start, stop, arity in zip(
            code_of[group_starts].tolist(),
            group_starts.tolist(),
            [*group_starts[1:].tolist(), m][: group_starts.size],
            arity_of[group_starts].tolist(),
            strict=True,
        )
    ]
    bounds = [*level_starts.tolist(), m]
    first_group = [*np.searchsorted(group_starts, level_starts).tolist(), len(groups)]
    groups_of = [groups[first_group[k] : first_group[k + 1]] for k in range(len(level_arity))]
    plan_levels = [
        _Level(
            bounds[k],
            bounds[k + 1],
            groups_of[k],
            arity,
            (edge_bounds[k], edge_bounds[k + 1]),
            edges_distinct[k],
            [group for group in groups_of[k] if not OPS[group.op_name].scales],
        )
        for k, arity in enumerate(level_arity)
    ]
    kinds = [
        _Kind(op, attrs, OPS[op].arity, positions)
        for code, (op, attrs) in enumerate(names)
        if OPS[op].scales and (positions := np.flatnonzero(code_of == code)).size
    ]
    return _Plan(
        plan_levels,
        order,
        position,
        buffer_operands,
        m,
        consts,
        operands,
        output,
        kinds,
        inner_edges,
        leaf_edges,
    )


def _split_edges(
    buffer_operands: tuple[Array, ...], n: int, scales: Array
) -> tuple[_Edges, _Edges]:
    """The (op node, operand) edges of the op nodes that `scale` (by plan position), but
    the missing operands (the scratch slot n), in plan order of the op node: those into op
    nodes (the backward adds them level by level) and those into leaves (nothing reads a
    leaf's gradient, so they are added at the end, in one call)."""
    m = scales.size
    # edge e = 2p + k is op p's k-th operand: filled by strided 1-d copies (an (m, 2) array
    # built by broadcasting loops in C over rows of 2, ~20x slower)
    targets = np.empty(2 * m, np.intp)
    kept = np.empty(2 * m, bool)
    for k, column in enumerate(buffer_operands):
        targets[k::2] = column
        kept[k::2] = scales

    def edges(at: Array) -> _Edges:  # the flattened (2, m) partials: row k, column p
        consumer = at >> 1
        return _Edges(consumer, targets[at], consumer + (at & 1) * m)

    # flatnonzero, then take: ~3x faster than boolean-mask indexing on a random mask
    into_ops = kept & (targets < m)
    return edges(np.flatnonzero(into_ops)), edges(np.flatnonzero(kept & ~into_ops & (targets != n)))


def _stable_order(key: Array) -> Array:
    """The stable sort order of integer keys. Keys that fit 16 bits unsigned (up to
    65536 / (op kinds + 1) levels, every graph the bench has) sort as uint16, for which
    NumPy's stable sort is a radix sort: ~5x faster than `np.lexsort` on 100k rows."""
    if key.size and int(key.min()) >= 0 and int(key.max()) < 1 << 16:
        key = key.astype(np.uint16)
    return np.argsort(key, kind="stable")


def _starts(keys: Array) -> Array:
    """Where each run of equal keys starts, in a sorted array."""
    if not keys.size:
        return np.empty(0, np.intp)
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))


def _levels(inner: Array, operands: tuple[Array, Array], n: int) -> Array:
    """1 + the deepest operand's level (leaves: 0), in index (topological) order. A Python
    loop over plain ints, each level depending on the ones before it; it runs over the op
    rows only, renumbered 1.. in order, so it can append (leaves and "no operand" read the
    level 0 at slot 0). The operand columns are read through memoryviews (each int made as
    it is read, not a list of them first) and the levels go back by `np.fromiter`: both
    measured faster than `tolist()` and assigning the list (the 100k-row DAG: 28 -> 21 ms)."""
    rank = np.zeros(n + 1, np.intp)  # row -> 1 + its rank among the op rows; slot n (-1): 0
    rank[inner] = np.arange(1, inner.size + 1)
    first, second = (rank[column[inner]].data for column in operands)  # memoryviews
    level = [0]
    append = level.append
    for a, b in zip(first, second, strict=True):
        x = level[a]
        y = level[b]
        append(x + 1 if x > y else y + 1)
    by_row = np.zeros(n, np.intp)
    by_row[inner] = np.fromiter(level, np.intp, len(level))[1:]
    return by_row


def _distinct_by_level(level_of: Array, column: Array, n_levels: int) -> Array:
    """Indexed by level number: True when no value of `column` repeats among the rows of that
    level (`level_of`: each row's level), so a `+=` scattering to them is exact."""
    distinct = np.ones(n_levels, bool)
    if level_of.size:
        span = int(column.max()) + 1
        key = np.sort(level_of * span + column)
        distinct[key[1:][key[1:] == key[:-1]] // span] = False
    return distinct


def _reached(plan: _Plan, n: int) -> Array:
    """Which op positions have a path to the output: one pass per level, from the top,
    marking the operands of reached nodes. Only asked when a gradient came out non-finite
    (an unreached node's 0 * inf must not count)."""
    reach = np.zeros(n + 1, bool)  # by buffer position; slot n takes the "no operand" marks
    reach[plan.position[plan.output]] = True
    for level in reversed(plan.levels):
        hit = reach[level.start : level.stop]
        if hit.any():
            for column in plan.operands[: level.arity]:
                reach[column[level.start : level.stop][hit]] = True
    return reach


def _forward_batched(
    program: Program, plan: _Plan, deadline: float | None = None
) -> tuple[ScalarColumn, _BatchedForward]:
    n, m = len(program), plan.n_ops
    buf = np.empty(n + 1, program.dtype)  # + the scratch slot that missing operands read
    buf[n] = 0.0
    leaf_values = program.leaf_values
    leaves = plan.leaves
    if isinstance(leaf_values, LeafColumn):
        buf[m:n] = leaf_values.column[leaves]
    else:
        buf[m:n] = np.fromiter(
            (leaf_values[i] for i in leaves.tolist()), program.dtype, count=leaves.size
        )
    with np.errstate(all="ignore"):
        for level in plan.levels:
            check_deadline(deadline)
            start = level.start
            gathered = [buf[column[start : level.stop]] for column in plan.operands[: level.arity]]
            for group in level.groups:
                lo, hi = group.start - start, group.stop - start
                args = [operand[lo:hi] for operand in gathered[: group.arity]]
                buf[group.start : group.stop], _ = OPS[group.op_name].forward(*args, **group.attrs)
    values = buf[plan.position[:n]]
    return ScalarColumn(values), _BatchedForward(plan, values, buf)


def _backward_batched(
    program: Program, batched: _BatchedForward, seed: Array, deadline: float | None = None
) -> ScalarColumn:
    plan = batched.plan
    n = len(program)
    partials = _local_partials(plan, batched.buffer, program.dtype)
    grad = _backward_by_partials(plan, partials, batched.buffer, seed, n, deadline)
    if not all_finite(grad[:n]):  # redo by the ops' backward, unreached nodes held at 0
        live = _reached(plan, n)
        grad = _backward_by_ops(plan, batched.buffer, seed, n, live, deadline)
    grads_by_row = grad[plan.position[:n]]
    if plan.consts:
        grads_by_row[plan.consts] = 0.0  # seeded when a const is the output; no gradient
    batched.grads = grads_by_row
    return ScalarColumn(grads_by_row, plan.consts)


def _local_partials(plan: _Plan, buffer: Array, dtype: np.dtype[Any]) -> Array:
    """(2, n_ops): d node / d operand for the first and second operand of every op node
    whose op `scales` (plan order; 0 for a missing operand, one the op passes no gradient,
    and the other ops' nodes), each such op kind's backward at an upstream gradient of 1 on
    its forward cache, all its nodes in one call."""
    partials = np.zeros((2, plan.n_ops), dtype)
    with np.errstate(all="ignore"):
        for kind in plan.kinds:
            op = OPS[kind.op_name]
            operands = [buffer[column[kind.positions]] for column in plan.operands[: kind.arity]]
            _, cache = op.forward(*operands, **kind.attrs)
            local = op.backward(np.ones(kind.positions.size, dtype), cache)
            for row, derivative in zip(partials, local, strict=False):
                if derivative is not None:
                    row[kind.positions] = derivative
    return partials


def _backward_by_partials(
    plan: _Plan, partials: Array, buffer: Array, seed: Array, n: int, deadline: float | None
) -> Array:
    """The gradient buffer (by buffer position). Per level, from the top: the gradients of its
    op nodes are complete (their consumers are above), so each edge from them into an op
    node below adds consumer gradient x local derivative to it, and each group of an op
    that does not `scale` runs its backward. The edges into leaves are added last, all at
    once."""
    grad = np.zeros(n + 1, partials.dtype)
    grad[plan.position[plan.output]] = seed
    flat = partials.reshape(-1)
    inner, leafward = plan.inner_edges, plan.leaf_edges
    consumer, target, derivative = inner.consumer, inner.target, flat[inner.partial]
    with np.errstate(all="ignore"):
        for level in reversed(plan.levels):
            check_deadline(deadline)
            lo, hi = level.edge_span
            if lo < hi:  # else every operand is a leaf or of an exact group
                contribution = grad[consumer[lo:hi]] * derivative[lo:hi]
                if level.edges_distinct:
                    grad[target[lo:hi]] += contribution
                else:
                    np.add.at(grad, target[lo:hi], contribution)
            for group in level.exact_groups:
                _group_backward(plan, buffer, grad, group, None)
        into_leaves = grad[leafward.consumer] * flat[leafward.partial]
        m = plan.n_ops
        grad[m:n] += np.bincount(leafward.target - m, into_leaves, minlength=n - m)
    return grad


def _backward_by_ops(
    plan: _Plan,
    buffer: Array,
    seed: Array,
    n: int,
    live: Array,
    deadline: float | None,
) -> Array:
    """The gradient buffer (by buffer position) by each group's op backward at its real
    upstream gradients (its forward cache made again from the values): the exact rules
    where a gradient is non-finite. `live` (by position): add nothing from a node without
    a path to the output. Taken only when a gradient is non-finite, so it is plain: a
    group at a time, every scatter by `np.add.at`."""
    grad = np.zeros(n + 1, buffer.dtype)
    grad[plan.position[plan.output]] = seed
    with np.errstate(all="ignore"):
        for level in reversed(plan.levels):
            check_deadline(deadline)
            for group in level.groups:
                _group_backward(plan, buffer, grad, group, live)
    return grad


def _group_backward(
    plan: _Plan, buffer: Array, grad: Array, group: _Group, live: Array | None
) -> None:
    """Add one group's local gradients at its upstream gradients into its operands' slots:
    its op's backward on its forward cache, made again from the values. `live` (by
    position): add nothing from a node without a path to the output."""
    rows = slice(group.start, group.stop)
    op = OPS[group.op_name]
    operands = plan.operands[: group.arity]
    _, cache = op.forward(*(buffer[column[rows]] for column in operands), **group.attrs)
    local: Sequence[Array | None] = op.backward(grad[rows], cache)
    if live is not None:
        local = _live_only(local, live[rows])
    for column, d in zip(operands, local, strict=True):
        if d is not None:
            np.add.at(grad, column[rows], d)


def _live_only(local: Sequence[Array | None], live: Array) -> list[Array | None]:
    if live.all():
        return list(local)
    return [None if d is None else np.where(live, d, 0.0) for d in local]
