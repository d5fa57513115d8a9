"""A validated graph as a small compiled program, and its forward and backward walks.

`compile_graph` checks a list of `NodeSpec`s (ids, ops, arity, references, cycles, shapes,
limits) and numbers the nodes 0..n-1 in topological order. `forward` walks that order once;
`backward` walks it once in reverse, each op adding its vector-Jacobian product into its
operands' gradient slots. The op table (`engine.ops.OPS`) is the only place that knows what
an op does. Nothing here recurses, so depth is bounded by the node limit, not the stack.
"""

from __future__ import annotations

import math
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
    for i, spec in enumerate(ordered):
        if program.is_leaf(i):
            assert spec.value is not None
            value = np.asarray(spec.value, dtype=program.dtype)
            program.leaf_values[i] = value
            shape: Shape = value.shape
        else:
            op = OPS[spec.op]
            operand_shapes = [program.shapes[j] for j in program.operands[i]]
            try:
                shape = op.shape(*operand_shapes, **program.attrs[i])
            except ShapeError as err:
                raise ShapeError(
                    f"node {spec.id!r} ({spec.op}): {err.message}", loc=spec.loc, node=spec.id
                ) from None
            program.flops += op.flops(operand_shapes, shape)
        program.shapes.append(shape)
        elements = math.prod(shape)
        total += elements
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


def forward(program: Program) -> tuple[list[Array], list[Any]]:
    """Values and caches of every node, in topological order."""
    values: list[Array] = []
    caches: list[Any] = []
    with np.errstate(all="ignore"):  # overflow is data (reported as non-finite), not a crash
        for i in range(len(program)):
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
    program: Program, caches: Sequence[Any], output_grad: Array | None = None
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
    with np.errstate(all="ignore"):
        for i in range(out, -1, -1):
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


def run(program: Program, output_grad: Array | None = None) -> Result:
    values, caches = forward(program)
    grads = backward(program, caches, output_grad)
    return Result(program, values, grads)
