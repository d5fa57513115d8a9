"""A validated graph as a small compiled program, and its forward and backward walks.

`compile_graph` checks a list of `NodeSpec`s (ids, ops, arity, references, cycles, shapes,
limits) and numbers the nodes 0..n-1 in topological order. `forward` walks that order once;
`backward` walks it once in reverse, each op adding its vector-Jacobian product into its
operands' gradient slots. The op table (`engine.ops.OPS`) is the only place that knows what
an op does. Nothing here recurses, so depth is bounded by the node limit, not the stack.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import EngineError, GraphError, LimitError, Loc, ShapeError
from engine.ops import LEAF_OPS, OPS, Array, Shape


@dataclass(frozen=True)
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

    ids: list[str]
    ops: list[str]
    operands: list[tuple[int, ...]]
    attrs: list[Mapping[str, Any]]
    shapes: list[Shape]
    leaf_values: dict[int, Array]
    locs: list[Loc]
    output: int
    dtype: np.dtype[Any]
    flops: int

    def __len__(self) -> int:
        return len(self.ids)

    def is_leaf(self, i: int) -> bool:
        return self.ops[i] in LEAF_OPS


@dataclass
class Result:
    """Forward values and gradients, indexed like the program. `grads[i]` is None for const."""

    program: Program
    values: list[Array]
    grads: list[Array | None]


def compile_graph(
    nodes: Sequence[NodeSpec],
    output: str,
    *,
    limits: Limits = Limits(),
    dtype: np.dtype[Any] | type = np.float64,
) -> Program:
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
    position = {old: new for new, old in enumerate(order)}
    ordered = [nodes[k] for k in order]
    program = Program(
        ids=[spec.id for spec in ordered],
        ops=[spec.op for spec in ordered],
        operands=[tuple(position[j] for j in operands_by_request[k]) for k in order],
        attrs=[dict(spec.attrs) for spec in ordered],
        shapes=[],
        leaf_values={},
        locs=[spec.loc for spec in ordered],
        output=position[index[output]],
        dtype=np.dtype(dtype),
        flops=0,
    )
    _infer_shapes(program, ordered, limits)
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


def _topological_order(nodes: Sequence[NodeSpec], operands: Sequence[tuple[int, ...]]) -> list[int]:
    """Kahn's algorithm over request indices; ties keep request order. Names a cycle."""
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


def _infer_shapes(program: Program, ordered: Sequence[NodeSpec], limits: Limits) -> None:
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
            program.leaf_values[i] = value
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
) -> tuple[list[Array], list[Any] | _BatchedCaches]:
    """Values and caches of every node, in topological order. `deadline` (a
    `time.monotonic()` value) is checked between ops (per node, or per batched group level)."""
    check_deadline(deadline)
    plan = batch_plan(program)
    if plan is not None:
        return _forward_batched(program, plan, deadline)
    values: list[Array] = []
    caches: list[Any] = []
    with np.errstate(all="ignore"):  # overflow is data (reported as non-finite), not a crash
        for i in range(len(program)):
            if deadline is not None and time.monotonic() > deadline:
                check_deadline(deadline)  # every node: a single op may be a big matmul
            if program.is_leaf(i):
                values.append(program.leaf_values[i])
                caches.append(None)
                continue
            operands = [values[j] for j in program.operands[i]]
            try:
                out, cache = OPS[program.ops[i]].forward(*operands, **program.attrs[i])
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
    caches: Sequence[Any] | _BatchedCaches,
    output_grad: Array | None = None,
    *,
    deadline: float | None = None,
) -> list[Array | None]:
    """d(output)/d(node) for every node but consts. Gradients add up at forks."""
    n = len(program)
    out = program.output
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
    if isinstance(caches, _BatchedCaches):
        return _backward_batched(program, caches, grads[out], deadline)  # type: ignore[arg-type]
    with np.errstate(all="ignore"):
        for i in range(out, -1, -1):
            if deadline is not None and time.monotonic() > deadline:
                check_deadline(deadline)  # every node: a single op may be a big matmul
            dout = grads[i]
            if dout is None or program.is_leaf(i):
                continue
            local = OPS[program.ops[i]].backward(dout, caches[i])
            for j, d in zip(program.operands[i], local, strict=True):
                if d is None or program.ops[j] == "const":
                    continue
                d = unbroadcast(d, program.shapes[j])
                # A new array, never `+=`: the slot may alias a gradient another node holds.
                grads[j] = d if grads[j] is None else grads[j] + d
    for i in range(n):  # unreached (or not differentiable) nodes: gradient 0
        if program.ops[i] == "const":
            grads[i] = None  # even when the const is the output and was seeded above
        elif grads[i] is None:
            grads[i] = np.zeros(program.shapes[i], program.dtype)
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
    return Result(program, values, grads)


# --- level batching: scalar-heavy graphs as a few NumPy calls per level -----------------
#
# A graph of one-number nodes (micrograd style) spends its time in Python per node. Nodes at
# the same topological level do not depend on each other, so every (level, op, attrs) group
# runs as one call of the op's own forward/backward on 1-D arrays gathered from a flat value
# buffer by index arrays; results are scattered back. Backward walks the groups in reverse
# level order and adds each group's local gradients into a flat gradient buffer (`+=` when
# the operand indices are distinct, `np.add.at` for fan-in within the group). Only ops marked
# `elementwise` in the op table are batched; any other graph takes the per-node walk.

BATCH_MIN_NODES = 256  # below this the per-node walk is about as fast


@dataclass
class _Group:
    op_name: str
    attrs: Mapping[str, Any]
    out: Array  # node indices this group computes
    operands: tuple[Array, ...]  # per operand position, the operand node indices
    distinct: tuple[bool, ...]  # per position: no index repeats, so `buf[idx] += d` is exact
    live: Array | None  # backward: which outputs reach the graph output (None: all do)
    reaches: bool  # any output reaches the graph output


@dataclass
class _Plan:
    levels: list[list[_Group]]
    leaves: Array
    consts: list[int]


@dataclass
class _BatchedCaches:
    """What a batched forward hands its backward: the plan and each group's op cache."""

    plan: _Plan
    caches: list[list[Any]]  # [level][group]


_NOT_BATCHABLE = _Plan([], np.empty(0, np.intp), [])


def batch_plan(program: Program) -> _Plan | None:
    """The level groups of a scalar-heavy program (built once, kept on it), or None."""
    plan = program.__dict__.get("_plan")
    if plan is None:
        plan = _build_plan(program) or _NOT_BATCHABLE
        program.__dict__["_plan"] = plan
    return None if plan is _NOT_BATCHABLE else plan


def _build_plan(program: Program) -> _Plan | None:
    n = len(program)
    if n < BATCH_MIN_NODES or any(shape != () for shape in program.shapes):
        return None
    kinds: dict[tuple[str, tuple[tuple[str, Any], ...]], int] = {}
    names: list[tuple[str, Mapping[str, Any]]] = []
    level = [0] * n
    code = [-1] * n
    first = [-1] * n
    second = [-1] * n
    for i, ins in enumerate(program.operands):
        if not ins:
            continue
        op = program.ops[i]
        if not OPS[op].elementwise:
            return None
        attrs = program.attrs[i]
        key = (op, tuple(sorted(attrs.items())) if attrs else ())
        kind = kinds.get(key)
        if kind is None:
            kind = kinds[key] = len(names)
            names.append((op, attrs))
        code[i] = kind
        a = level[ins[0]]
        first[i] = ins[0]
        if len(ins) == 2:
            b = level[ins[1]]
            second[i] = ins[1]
            a = a if a > b else b
        level[i] = a + 1
    reach = bytearray(n)
    reach[program.output] = 1
    for i in range(program.output, -1, -1):
        if reach[i]:
            for j in program.operands[i]:
                reach[j] = 1
    reached = np.frombuffer(bytes(reach), dtype=np.uint8).astype(bool)
    codes = np.array(code, np.intp)
    levels = np.array(level, np.intp)
    operand_columns = (np.array(first, np.intp), np.array(second, np.intp))
    inner = np.flatnonzero(codes >= 0)
    order = inner[np.lexsort((codes[inner], levels[inner]))]  # stable: index order inside
    key_of = levels[order] * (len(names) + 1) + codes[order]
    starts = np.flatnonzero(np.diff(key_of)) + 1
    plan = _Plan([], np.flatnonzero(codes < 0), [i for i in range(n) if program.ops[i] == "const"])
    current = -1
    for out in np.split(order, starts) if order.size else []:
        op_name, attrs = names[codes[out[0]]]
        arity = OPS[op_name].arity
        operands = tuple(operand_columns[k][out] for k in range(arity))
        live = reached[out]
        group = _Group(
            op_name,
            attrs,
            out,
            operands,
            tuple(np.unique(idx).size == idx.size for idx in operands),
            None if live.all() else live,
            bool(live.any()),
        )
        if levels[out[0]] != current:
            current = int(levels[out[0]])
            plan.levels.append([])
        plan.levels[-1].append(group)
    return plan


def _forward_batched(
    program: Program, plan: _Plan, deadline: float | None = None
) -> tuple[list[Array], _BatchedCaches]:
    buf = np.empty(len(program), program.dtype)
    leaf_values = program.leaf_values
    buf[plan.leaves] = np.fromiter(
        (leaf_values[i] for i in plan.leaves.tolist()), program.dtype, count=plan.leaves.size
    )
    caches: list[list[Any]] = []
    with np.errstate(all="ignore"):
        for groups in plan.levels:
            check_deadline(deadline)
            level_caches = []
            for group in groups:
                operands = [buf[idx] for idx in group.operands]  # gathers: fresh arrays
                out, cache = OPS[group.op_name].forward(*operands, **group.attrs)
                buf[group.out] = out
                level_caches.append(cache)
            caches.append(level_caches)
    values: list[Array] = list(buf)  # NumPy scalars: 0-d arrays to every reader
    return values, _BatchedCaches(plan, caches)


def _backward_batched(
    program: Program, batched: _BatchedCaches, seed: Array, deadline: float | None = None
) -> list[Array | None]:
    plan = batched.plan
    grad = np.zeros(len(program), program.dtype)
    grad[program.output] = seed
    with np.errstate(all="ignore"):
        for groups, caches in zip(reversed(plan.levels), reversed(batched.caches), strict=True):
            check_deadline(deadline)
            for group, cache in zip(groups, caches, strict=True):
                if not group.reaches:
                    continue
                local = OPS[group.op_name].backward(grad[group.out], cache)
                for idx, distinct, d in zip(group.operands, group.distinct, local, strict=True):
                    if d is None:
                        continue
                    if group.live is not None:  # an unreached node adds nothing (not 0 * inf)
                        d = np.where(group.live, d, 0.0)
                    if distinct:
                        grad[idx] += d
                    else:
                        np.add.at(grad, idx, d)
    grads: list[Array | None] = list(grad)
    for i in plan.consts:
        grads[i] = None
    return grads
