"""The one executor: a program's forward and backward, over its plan's levels x groups.

Forward walks the levels in order. A batched group (many scalar nodes of one op) is one call
of the op's forward on its operands, gathered from a flat value buffer in one fancy index per
operand position for the whole level; a single group (a tensor node, a loss) calls its op on
its own operands and keeps the cache for the backward. Every scalar node's value lives in
the buffer (plan order), every tensor node's in a dict by row.

Backward walks the levels from the top; when a level is reached, its nodes' gradients are
complete (their consumers are above). A single node calls its op's backward with its cache
and adds each operand's gradient, summed back to the operand's shape. The batched nodes take
their local derivatives d node / d operand first, one call of each op kind over all its
nodes (the op's backward at an upstream gradient of 1), and keep them on the `Result` (the
explanations read them). For the ops that `scale` (backward = upstream x derivative) each
level is then one gather, multiply and scatter over the edges into op nodes; the edges into
leaves, which nothing reads during the walk, are added at the end in one `np.bincount`. The
other batched ops (div, log, sqrt, reciprocal, pow) run their own backward per group.

A level whose upstream gradients are not all finite runs every batched group through the op's
own backward (a relu blocks an infinite gradient: 0, where inf * 0 would be NaN), and a node
without a path to the output adds nothing (where that matters, a non-finite derivative or
gradient, which nodes reach the output is worked out once, in the same walk). Overflow is
data: it shows up as NaN or Infinity in the values and gradients, which the diagnostics
report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradiag.engine.compiler import Program
from gradiag.engine.errors import EngineError, LimitError, ShapeError
from gradiag.engine.ops import Array, all_finite, unbroadcast
from gradiag.engine.plan import Group, Level, Plan


@dataclass
class Slots:
    """One array per node as the executor keeps them: a scalar node's number in `buffer` (at
    its plan position; one float64/float32 array for all of them), a tensor node's array in
    `tensors` by row."""

    buffer: Array
    tensors: dict[int, Array]
    position: Array

    def __getitem__(self, i: int) -> Array:
        tensor = self.tensors.get(i)
        return tensor if tensor is not None else np.asarray(self.buffer[self.position[i]])


@dataclass
class Result:
    """Forward values and gradients of a run, and the local derivatives its backward took.

    `values[i]` is node i's value; `grad(i)` its gradient d(output)/d(node) (None for a const
    and a `no_grad` node; zeros for a node without a path to the output). `scalar_values` and
    `scalar_grads` hold every scalar node's number by row, for whole-column readers (a
    tensor row's entry is unused; a const's gradient is 0). `partials` are the batched
    nodes' local derivatives by plan position (rows: operand positions); `single_local`
    those of the other scalar nodes of scalar operands."""

    program: Program
    values: Slots
    grads: Slots
    scalar_values: Array
    scalar_grads: Array
    partials: Array
    single_local: dict[int, tuple[Array | None, ...]] = field(default_factory=dict)

    def value(self, i: int) -> Array:
        return self.values[i]

    def grad(self, i: int) -> Array | None:
        program = self.program
        if not program.has_grad(i):
            return None
        shape = program.shapes[i]
        if not shape:
            return np.asarray(self.grads.buffer[self.grads.position[i]])
        tensor = self.grads.tensors.get(i)
        return np.zeros(shape, program.dtype) if tensor is None else tensor


def check_deadline(deadline: float | None) -> None:
    """Raise LimitError(limit="time_budget_seconds") once `time.monotonic()` is past
    `deadline`. The engine does not know the budget itself; the service fills in `value`."""
    if deadline is not None and time.monotonic() > deadline:
        raise LimitError(
            "the request ran over its time budget", limit="time_budget_seconds", value=0
        )


def run(
    program: Program,
    output_grad: Array | None = None,
    *,
    leaves: Mapping[int, Array] | None = None,
    deadline: float | None = None,
) -> Result:
    """One forward and one backward pass. `deadline` (a `time.monotonic()` value) is checked
    between levels and before every single node (one may be a big matmul). `leaves` (tensor
    values by row, of the compiled shapes and dtype) replace those leaves' values for this
    run only: a training loop sets each step's minibatch and weights on the one program it
    compiled, with no copy of the program."""
    tensors = None if leaves is None else {**program.tensors, **leaves}
    values, caches = forward(program, tensors=tensors, deadline=deadline)
    return backward(program, values, caches, output_grad, deadline=deadline)


# --- forward -------------------------------------------------------------------------------


def forward(
    program: Program,
    *,
    scalars: Array | None = None,
    tensors: Mapping[int, Array] | None = None,
    deadline: float | None = None,
) -> tuple[Slots, dict[int, Any]]:
    """Every node's value, and the single nodes' caches. `scalars`/`tensors` replace the
    program's leaf values (gradcheck moves one element)."""
    check_deadline(deadline)
    plan = program.plan
    n, m = len(program), plan.n_ops
    buffer = np.zeros(n + 1, program.dtype)  # + the scratch slot that "no operand" reads
    leaf_scalars = program.scalars if scalars is None else scalars
    buffer[m:n] = leaf_scalars[plan.leaves]
    values = Slots(buffer, dict(program.tensors if tensors is None else tensors), plan.position)
    caches: dict[int, Any] = {}
    with np.errstate(all="ignore"):  # overflow is data (reported as non-finite), not a crash
        for level in plan.levels:
            check_deadline(deadline)
            _forward_level(program, level, values, caches, deadline)
    return values, caches


def _forward_level(
    program: Program,
    level: Level,
    values: Slots,
    caches: dict[int, Any],
    deadline: float | None,
) -> None:
    plan, buffer = program.plan, values.buffer
    if level.batched:
        start = level.start
        stop = level.batched[-1].stop
        gathered = [buffer[column[start:stop]] for column in plan.operands[: level.arity]]
        for group in level.batched:
            lo, hi = group.start - start, group.stop - start
            args = [operand[lo:hi] for operand in gathered[: group.op.arity]]
            buffer[group.start : group.stop], _ = group.op.forward(*args, **group.attrs)
    for group in level.singles:
        check_deadline(deadline)
        _forward_single(program, group, values, caches)


def _forward_single(program: Program, group: Group, values: Slots, caches: dict[int, Any]) -> None:
    row = group.row
    args = [values[j] for j in group.inputs]
    try:
        out, caches[row] = group.op.forward(*args, **group.attrs)
    except EngineError as err:
        raise type(err)(
            f"node {program.node_id(row)!r} ({group.op.name}): {err.message}",
            loc=program.loc(row),
            node=program.node_id(row),
        ) from None
    if program.shapes[row]:
        values.tensors[row] = np.asarray(out)
    else:
        values.buffer[group.start] = out


# --- backward ------------------------------------------------------------------------------


def backward(
    program: Program,
    values: Slots,
    caches: Mapping[int, Any],
    output_grad: Array | None = None,
    *,
    deadline: float | None = None,
) -> Result:
    """d(output)/d(node) for every node (see `Result.grad`). Gradients add up at forks."""
    plan = program.plan
    n, out = len(program), program.output
    grads = Slots(np.zeros(n + 1, program.dtype), {}, plan.position)
    seed = _seed(program, output_grad)
    if program.shapes[out]:
        grads.tensors[out] = seed
    else:
        grads.buffer[plan.position[out]] = seed
    partials = _local_partials(plan, values.buffer, program.dtype)
    walk = _Walk(program, values, caches, grads, partials)
    with np.errstate(all="ignore"):
        for level in reversed(plan.levels):
            check_deadline(deadline)
            walk.level(level, deadline)
        walk.into_leaves()
    by_row = plan.position[:-1]
    return Result(
        program,
        values,
        grads,
        values.buffer[by_row],
        grads.buffer[by_row],
        partials,
        walk.single_local,
    )


def _seed(program: Program, output_grad: Array | None) -> Array:
    shape = program.shapes[program.output]
    if output_grad is None:
        return np.ones(shape, program.dtype)
    seed = np.asarray(output_grad, dtype=program.dtype)
    if seed.shape != shape:
        raise ShapeError(
            f"output_grad has shape {list(seed.shape)}; the output "
            f"{program.node_id(program.output)!r} has shape {list(shape)}",
            loc=("output_grad",),
        )
    return seed


def _local_partials(plan: Plan, buffer: Array, dtype: np.dtype[Any]) -> Array:
    """(width, n_ops): d node / d operand k of every batched node (plan order; 0 for a
    missing operand, one the op passes no gradient, and the single nodes): each kind's
    backward at an upstream gradient of 1 on its forward cache, all its nodes in one call."""
    partials = np.zeros((plan.width, plan.n_ops), dtype)
    with np.errstate(all="ignore"):
        for kind in plan.kinds:
            op = kind.op
            operands = [buffer[column[kind.positions]] for column in plan.operands[: op.arity]]
            _, cache = op.forward(*operands, **kind.attrs)
            local = op.backward(np.ones(kind.positions.size, dtype), cache)
            for row, derivative in zip(partials, local, strict=False):
                if derivative is not None:
                    row[kind.positions] = derivative
    return partials


def _finite(x: Array) -> bool:
    """No NaN or infinity in a level's slice: its sum is finite (NaN or inf when an element
    is; one pass, no temporary array; the caller holds np.errstate), or, when the sum
    overflowed, every element is."""
    return math.isfinite(np.add.reduce(x)) or bool(np.isfinite(x).all())


class _Walk:
    """The backward's state while it walks the levels from the top."""

    def __init__(
        self,
        program: Program,
        values: Slots,
        caches: Mapping[int, Any],
        grads: Slots,
        partials: Array,
    ) -> None:
        self.program, self.values, self.caches, self.grads = program, values, caches, grads
        plan = self.plan = program.plan
        flat = partials.reshape(-1)
        self.derivative = flat[plan.inner_edges.partial]
        self.leaf_derivative = flat[plan.leaf_edges.partial]
        self.exact_levels: list[Level] = []
        self.single_local: dict[int, tuple[Array | None, ...]] = {}
        self._reached: Array | None = None
        if plan.kinds and not all_finite(partials):  # no kinds: no batched node, all 0
            # a node without a path to the output has gradient 0: 0 * inf must add nothing
            live = self.live()
            self.derivative[~live[plan.inner_edges.consumer]] = 0.0
            self.leaf_derivative[~live[plan.leaf_edges.consumer]] = 0.0

    def live(self) -> Array:
        """By plan position: which nodes have a path to the output. Asked only where a
        gradient of 0 must not turn into NaN (a non-finite derivative or upstream gradient),
        so it is worked out then, once: one pass per level from the top, marking the operands
        of reached nodes."""
        if self._reached is None:
            plan, program = self.plan, self.program
            reach = np.zeros(len(program) + 1, bool)
            reach[plan.position[program.output]] = True
            for level in reversed(plan.levels):
                hit = reach[level.start : level.stop]
                if hit.any():
                    for column in plan.operands:
                        reach[column[level.start : level.stop][hit]] = True
            self._reached = reach
        return self._reached

    def level(self, level: Level, deadline: float | None) -> None:
        for group in level.singles:
            check_deadline(deadline)
            self.single(group)
        if not level.batched:
            return
        buffer = self.grads.buffer
        if not _finite(buffer[level.start : level.batched[-1].stop]):
            self.exact_levels.append(level)  # its leaf edges are added here, not at the end
            for group in level.batched:
                self.batched_exactly(group)
            return
        lo, hi = level.edge_span
        if lo < hi:  # else every operand is a leaf or of an exact group
            edges = self.plan.inner_edges
            contribution = buffer[edges.consumer[lo:hi]] * self.derivative[lo:hi]
            if level.edges_distinct:
                buffer[edges.target[lo:hi]] += contribution
            else:
                np.add.at(buffer, edges.target[lo:hi], contribution)
        for group in level.exact_groups:
            self.batched_exactly(group)

    def batched_exactly(self, group: Group) -> None:
        """One batched group's op backward at its upstream gradients, on its forward cache
        made again from the values, added into its operands' slots."""
        rows = slice(group.start, group.stop)
        op, plan, buffer = group.op, self.plan, self.grads.buffer
        operands = plan.operands[: op.arity]
        _, cache = op.forward(*(self.values.buffer[c[rows]] for c in operands), **group.attrs)
        local: Sequence[Array | None] = op.backward(buffer[rows], cache)
        live = self.live()[rows]
        if not live.all():
            local = [None if d is None else np.where(live, d, 0.0) for d in local]
        for column, d in zip(operands, local, strict=True):
            if d is not None:
                np.add.at(buffer, column[rows], d)

    def single(self, group: Group) -> None:
        """A single node: its op's backward with the forward's cache; each operand's gradient
        summed back to its shape and added to its slot."""
        program, plan, grads = self.program, self.plan, self.grads
        row = group.row
        shape = program.shapes[row]
        dout = grads.tensors.get(row) if shape else np.asarray(grads.buffer[group.start])
        if dout is None:  # a tensor node nothing reached
            return
        if not shape and dout == 0 and not self.live()[group.start]:
            return  # a scalar node nothing reached (its slot was 0 from the start)
        op, cache = group.op, self.caches[row]
        operands, wanted = group.inputs, group.needs
        local = op.backward(dout, cache, wanted) if op.takes_needs else op.backward(dout, cache)
        for j, d, needed in zip(operands, local, wanted, strict=True):
            if d is None or not needed:
                continue
            operand_shape = program.shapes[j]
            if type(d) is not np.ndarray or d.shape != operand_shape:
                d = unbroadcast(d, operand_shape)
            if operand_shape:  # a new array, never `+=`: the slot may alias another's
                held = grads.tensors.get(j)
                grads.tensors[j] = d if held is None else held + d
            else:
                grads.buffer[plan.position[j]] += d
        if not shape and not any(program.shapes[j] for j in operands):
            ones = np.ones((), program.dtype)
            self.single_local[row] = tuple(op.backward(ones, cache))

    def into_leaves(self) -> None:
        """The batched edges into leaves, all at once (but those of the exact levels)."""
        plan, buffer = self.plan, self.grads.buffer
        edges = plan.leaf_edges
        if not edges.consumer.size:
            return
        contribution = buffer[edges.consumer] * self.leaf_derivative
        if self.exact_levels:
            keep = np.ones(contribution.size, bool)
            for level in self.exact_levels:
                keep[slice(*level.leaf_span)] = False
            contribution = np.where(keep, contribution, 0.0)
        m, n = plan.n_ops, buffer.size - 1
        buffer[m:n] += np.bincount(edges.target - m, contribution, minlength=n - m)
