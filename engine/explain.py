"""Gates in words: each scalar node's local derivatives, and the leaves ranked by gradient.

`local_grads` gives, for every node whose operands and output are all scalars, the local
derivative d(node)/d(operand) it applies to the upstream gradient (for mul at x=3, y=-4:
d/dx = -4, d/dy = 3). It asks the op table itself: the op's backward with an upstream
gradient of 1. Elementwise ops (same-shape and broadcasting ones) are done for every scalar
node of the same op and attrs in one NumPy call over the stacked operands, so a graph of many
one-number nodes costs a handful of calls, not one per node; other ops go one node at a time.

`explain_leaves` ranks the differentiable leaves (input, param) by |gradient| (tensor
leaves: the gradient's norm) and says what each means for the output.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradiag.engine.errors import EngineError
from gradiag.engine.graph import Program, Result, batch_plan, op_kinds
from gradiag.engine.ops import LEAF_OPS, OPS, Array, broadcast_shape, same_shape

LocalGrads = dict[str, float]


def local_grads(result: Result) -> dict[int, LocalGrads]:
    """Node index -> {operand id: d(node)/d(operand)} for scalar op nodes. An operand used
    twice (x * x) gets the sum of its local derivatives; one the op gives no gradient
    (class labels) is left out."""
    program = result.program
    plan = batch_plan(program)
    if plan is not None and result.flat_values is not None:
        return _batched_local_grads(result, plan.edges)
    groups, single = _scalar_groups(program)
    local: dict[int, LocalGrads] = {}
    with np.errstate(all="ignore"):  # once, not per group: it costs as much as a small op
        for nodes in groups.values():
            _apply(result, nodes, local)
        for i in single:
            _apply(result, [i], local)
    return local


def _scalar_groups(program: Program) -> tuple[dict[tuple[str, str], list[int]], list[int]]:
    """The scalar op nodes (scalar operands too): those of an elementwise shape rule grouped
    by (op, attrs), to be done in one call per group; the others one at a time."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    single: list[int] = []
    shapes, operands, attrs = program.shapes, program.operands, program.attrs
    for i, op_name in enumerate(program.ops):
        # scalar nodes of scalar operands only (a shape () is falsy)
        if op_name in LEAF_OPS or shapes[i] or any(map(shapes.__getitem__, operands[i])):
            continue
        if OPS[op_name].shape in (same_shape, broadcast_shape):
            # attrs may hold lists (unhashable): their repr is the key
            groups[(op_name, repr(sorted(attrs[i].items())) if attrs[i] else "")].append(i)
        else:
            single.append(i)
    return groups, single


def _batched_local_grads(result: Result, edges: tuple[Array, Array]) -> dict[int, LocalGrads]:
    """A batched run (every node a scalar, every op elementwise): per (op, attrs), the
    operands are read off the flat values by the operand columns, no Python per node but
    the dict each node's report needs."""
    program = result.program
    kinds = op_kinds(program)
    assert kinds is not None and result.flat_values is not None  # batched: all elementwise
    codes, names = kinds
    ids = list(program.ids)  # a columns body's `RowIds` would make each id per lookup
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(names) + 1))
    local: dict[int, LocalGrads] = {}
    with np.errstate(all="ignore"):  # overflow is data
        for code, (op_name, attrs) in enumerate(names):
            rows = order[starts[code] : starts[code + 1]]
            operand_rows = [edge[rows] for edge in edges[: OPS[op_name].arity]]
            operands = [result.flat_values[column] for column in operand_rows]
            derivatives = _derivatives(op_name, operands, attrs)
            if derivatives is None:
                continue
            columns = [None if d is None else _per_row(d, rows.size) for d in derivatives]
            _record(local, ids, rows.tolist(), [c.tolist() for c in operand_rows], columns)
    return local


def _apply(result: Result, nodes: list[int], local: dict[int, LocalGrads]) -> None:
    """The local gradients of one group's nodes: its operands stacked, one call of the op."""
    program = result.program
    if len(nodes) == 1:
        _apply_one(result, nodes[0], local)
        return
    first = nodes[0]
    arity = len(program.operands[first])
    operand_rows = [[program.operands[i][k] for i in nodes] for k in range(arity)]
    operands = [
        np.array([result.values[j] for j in column], program.dtype) for column in operand_rows
    ]
    derivatives = _derivatives(program.ops[first], operands, program.attrs[first])
    if derivatives is None:
        return
    # one list of floats per operand position, not a NumPy call per node: a 100k-node
    # graph's report spent most of its time here
    columns = [None if d is None else _per_row(d, len(nodes)) for d in derivatives]
    _record(local, program.ids, nodes, operand_rows, columns)


def _apply_one(result: Result, i: int, local: dict[int, LocalGrads]) -> None:
    """A node alone in its group (most nodes of a small graph): its own operands, and its
    dict made directly (the columns `_record` reads would cost more than the op)."""
    program = result.program
    operands = program.operands[i]
    derivatives = _derivatives(
        program.ops[i], [result.values[j] for j in operands], program.attrs[i]
    )
    if derivatives is None:
        return
    grads: LocalGrads = {}
    for j, d in zip(operands, derivatives, strict=True):
        if d is not None:
            name = program.ids[j]
            grads[name] = grads.get(name, 0.0) + _per_row(d, 1)[0]
    local[i] = grads


def _per_row(derivative: Array, rows: int) -> list[float]:
    """One operand position's derivative as a float per row, without a NumPy call per row:
    a scalar one (every row shares it) repeated, a (rows,) one as it is. A single node of
    an op that is not elementwise may give another shape: its sum is the number."""
    derivative = np.asarray(derivative)  # np.shape would dispatch on a NumPy scalar: slower
    shape = derivative.shape
    if shape == ():
        return [float(derivative)] * rows
    if shape == (rows,):
        as_list: list[float] = derivative.tolist()
        return as_list
    if rows == 1:
        return [float(np.sum(derivative))]
    broadcast: list[float] = np.broadcast_to(derivative, (rows,)).tolist()
    return broadcast


def _derivatives(
    op_name: str, operands: Sequence[Array], attrs: Mapping[str, Any]
) -> tuple[Array | None, ...] | None:
    """d(op)/d(each operand) at these operands, elementwise: the op's own backward with an
    upstream gradient of 1 (None when the op refuses the operands)."""
    op = OPS[op_name]
    try:  # the caller holds np.errstate(all="ignore"): overflow here is data
        out, cache = op.forward(*operands, **attrs)
        derivatives: tuple[Array | None, ...] = op.backward(_ones_like(out), cache)
    except EngineError:
        return None
    return derivatives


def _ones_like(out: Array) -> Array:
    """np.ones_like(out) without its dispatch, which costs ~5x the work on the 0-d and tiny
    arrays (and NumPy scalars) of scalar nodes."""
    out = np.asarray(out)
    ones = np.empty(out.shape, out.dtype)
    ones.fill(1)
    return ones


def _record(
    local: dict[int, LocalGrads],
    ids: Sequence[str],
    nodes: list[int],
    operand_rows: list[list[int]],
    derivatives: list[list[float] | None],
) -> None:
    """Node nodes[r]'s {operand id: derivative} from position k's operand_rows[k][r] and
    derivatives[k][r]; an operand in two positions (x * x) gets their sum. Each starts as
    0.0 + d, a sum's first term (so a -0.0 is written 0.0)."""
    present = [
        (rows, column)
        for rows, column in zip(operand_rows, derivatives, strict=True)
        if column is not None
    ]
    if len(present) == 2:  # binary ops, most nodes of a big graph: no inner loop per node
        (rows_a, column_a), (rows_b, column_b) = present
        for i, a, b, da, db in zip(nodes, rows_a, rows_b, column_a, column_b, strict=True):
            if a != b:
                local[i] = {ids[a]: 0.0 + da, ids[b]: 0.0 + db}
            else:
                local[i] = {ids[a]: 0.0 + da + db}
        return
    for row, i in enumerate(nodes):
        grads: LocalGrads = {}
        for rows, column in present:
            name = ids[rows[row]]
            grads[name] = grads.get(name, 0.0) + column[row]
        local[i] = grads


@dataclass(frozen=True)
class LeafExplanation:
    id: str
    shape: tuple[int, ...]
    magnitude: float  # |grad| for a scalar, the gradient's norm for a tensor
    grad: float  # the gradient (a tensor: its element of largest magnitude)
    element: tuple[int, ...]  # where that element is (() for a scalar)
    sentence: str


def explain_leaves(result: Result) -> list[LeafExplanation]:
    """Input and param leaves, largest gradient first (ties keep topological order)."""
    program = result.program
    output = program.ids[program.output]
    out = output if output.isidentifier() else "the output"
    leaves = []
    for i, op in enumerate(program.ops):
        grad = result.grads[i]
        if op not in ("input", "param") or grad is None:
            continue
        leaves.append(_explain(program.ids[i], np.asarray(grad), out))
    return sorted(leaves, key=lambda leaf: -_rank(leaf.magnitude))


def _rank(magnitude: float) -> float:
    return math.inf if math.isnan(magnitude) else magnitude


def _explain(node: str, grad: Array, out: str) -> LeafExplanation:
    with np.errstate(all="ignore"):
        if grad.ndim == 0:
            g = float(grad)
            return LeafExplanation(
                node, (), abs(g), g, (), f"{node}: {fmt(g)} — {_effect(node, g, out)}"
            )
        magnitudes = np.abs(grad)
        norm = float(np.linalg.norm(grad)) if grad.size else 0.0
    flat = int(np.argmax(np.where(np.isnan(magnitudes), np.inf, magnitudes))) if grad.size else 0
    element = tuple(int(d) for d in np.unravel_index(flat, grad.shape)) if grad.size else ()
    g = float(grad[element]) if grad.size else 0.0
    name = f"{node}[{', '.join(str(d) for d in element)}]"
    sentence = (
        f"{node}: gradient norm {fmt(norm)} over {grad.size} elements; the largest is "
        f"{name} = {fmt(g)} — {_effect(name, g, out)}"
    )
    return LeafExplanation(node, tuple(grad.shape), norm, g, element, sentence)


def _effect(name: str, g: float, out: str) -> str:
    if g == 0.0:
        return f"a small change in {name} does not change {out} (to first order)"
    if not math.isfinite(g):
        return f"the gradient is not finite, so {name}'s effect on {out} cannot be read off"
    return f"increasing {name} by a small h changes {out} by about {fmt(g)}h"


def fmt(x: float) -> str:
    """Short, exact enough for a sentence: 6 significant digits, -4.0 rather than -4."""
    if not math.isfinite(x):
        return repr(x)
    text = f"{x:.6g}"
    return text + ".0" if text.lstrip("-").isdigit() else text
