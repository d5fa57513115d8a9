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

from engine.errors import EngineError
from engine.graph import Result, batch_plan, op_kinds
from engine.ops import OPS, Array, broadcast_shape, same_shape

LocalGrads = dict[str, float]


def local_grads(result: Result) -> dict[int, LocalGrads]:
    """Node index -> {operand id: d(node)/d(operand)} for scalar op nodes. An operand used
    twice (x * x) gets the sum of its local derivatives; one the op gives no gradient
    (class labels) is left out."""
    program = result.program
    plan = batch_plan(program)
    if plan is not None and result.flat_values is not None:
        return _batched_local_grads(result, plan.edges)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    single: list[int] = []
    for i, op_name in enumerate(program.ops):
        if program.is_leaf(i) or program.shapes[i] != ():
            continue
        if any(program.shapes[j] != () for j in program.operands[i]):
            continue
        op = OPS[op_name]
        if op.shape in (same_shape, broadcast_shape):
            groups[(op_name, repr(sorted(program.attrs[i].items())))].append(i)
        else:
            single.append(i)
    local: dict[int, LocalGrads] = {}
    for nodes in groups.values():
        _apply(result, nodes, local)
    for i in single:
        _apply(result, [i], local)
    return local


def _batched_local_grads(result: Result, edges: tuple[Array, Array]) -> dict[int, LocalGrads]:
    """A batched run (every node a scalar, every op elementwise): per (op, attrs), the
    operands are read off the flat values by the operand columns, no Python per node but
    the dict each node's report needs."""
    program = result.program
    kinds = op_kinds(program)
    assert kinds is not None and result.flat_values is not None  # batched: all elementwise
    codes, names = kinds
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(names) + 1))
    local: dict[int, LocalGrads] = {}
    for code, (op_name, attrs) in enumerate(names):
        rows = order[starts[code] : starts[code + 1]]
        op = OPS[op_name]
        operand_rows = [edge[rows] for edge in edges[: op.arity]]
        operands = [result.flat_values[column] for column in operand_rows]
        derivatives = _derivatives(op_name, operands, attrs)
        if derivatives is not None:
            columns = [
                None if d is None else np.broadcast_to(d, rows.shape).tolist() for d in derivatives
            ]
            _record(local, program.ids, rows.tolist(), [c.tolist() for c in operand_rows], columns)
    return local


def _apply(result: Result, nodes: list[int], local: dict[int, LocalGrads]) -> None:
    program = result.program
    first = nodes[0]
    arity = len(program.operands[first])
    operand_rows = [[program.operands[i][k] for i in nodes] for k in range(arity)]
    if len(nodes) == 1:
        operands = [result.values[j] for j in program.operands[first]]
    else:
        operands = [
            np.array([result.values[j] for j in column], program.dtype) for column in operand_rows
        ]
    derivatives = _derivatives(program.ops[first], operands, program.attrs[first])
    if derivatives is None:
        return
    # one list of floats per operand position (a scalar broadcast to every row), not a NumPy
    # call per node: a 100k-node graph's report spent most of its time here
    columns: list[list[float] | None] = [
        None
        if d is None
        else (np.broadcast_to(d, (len(nodes),)).tolist() if len(nodes) > 1 else [float(np.sum(d))])
        for d in derivatives
    ]
    _record(local, program.ids, nodes, operand_rows, columns)


def _derivatives(
    op_name: str, operands: Sequence[Array], attrs: Mapping[str, Any]
) -> tuple[Array | None, ...] | None:
    """d(op)/d(each operand) at these operands, elementwise: the op's own backward with an
    upstream gradient of 1 (None when the op refuses the operands)."""
    op = OPS[op_name]
    try:
        with np.errstate(all="ignore"):
            out, cache = op.forward(*operands, **attrs)
            derivatives: tuple[Array | None, ...] = op.backward(np.ones_like(out), cache)
    except EngineError:
        return None
    return derivatives


def _record(
    local: dict[int, LocalGrads],
    ids: Sequence[str],
    nodes: list[int],
    operand_rows: list[list[int]],
    derivatives: list[list[float] | None],
) -> None:
    """Node nodes[r]'s {operand id: derivative} from position k's operand_rows[k][r] and
    derivatives[k][r]; an operand in two positions (x * x) gets their sum."""
    for row, i in enumerate(nodes):
        grads: LocalGrads = {}
        for rows, column in zip(operand_rows, derivatives, strict=True):
            if column is None:
                continue
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
