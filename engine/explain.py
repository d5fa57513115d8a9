"""Gates in words: each scalar node's local derivatives, and the leaves ranked by gradient.

`local_grads` gives, for every scalar node of scalar operands, the local derivative
d(node)/d(operand) it applies to the upstream gradient (for mul at x=3, y=-4: d/dx = -4,
d/dy = 3). The backward took them already (`Result.partials`, `Result.single_local`: the op's
own backward at an upstream gradient of 1); this only names them by operand id.

`explain_leaves` ranks the differentiable leaves (input, param) by |gradient| (tensor
leaves: the gradient's norm) and says what each means for the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradiag.engine.executor import Result
from gradiag.engine.ops import Array

LocalGrads = dict[str, float]


def local_grads(result: Result) -> dict[int, LocalGrads]:
    """Node row -> {operand id: d(node)/d(operand)} for scalar op nodes of scalar operands.
    An operand used twice (x * x) gets the sum of its local derivatives; one the op gives no
    gradient (class labels) is left out."""
    program = result.program
    plan = program.plan
    ids = program.node_ids()
    local: dict[int, LocalGrads] = {}
    for kind in plan.kinds:
        rows = plan.order[kind.positions]
        arity = kind.op.arity
        operand_rows = [program.operands[k, rows].tolist() for k in range(arity)]
        columns = [result.partials[k, kind.positions].tolist() for k in range(arity)]
        _record(local, ids, rows.tolist(), operand_rows, columns)
    for row, derivatives in result.single_local.items():
        grads: LocalGrads = {}
        for j, d in zip(program.inputs(row), derivatives, strict=True):
            if d is not None:
                grads[ids[j]] = grads.get(ids[j], 0.0) + float(np.sum(d))
        local[row] = grads
    return local


def _record(
    local: dict[int, LocalGrads],
    ids: Sequence[str],
    nodes: list[int],
    operand_rows: list[list[int]],
    derivatives: list[list[float]],
) -> None:
    """Node nodes[r]'s {operand id: derivative} from position k's operand_rows[k][r] and
    derivatives[k][r]; an operand in two positions (x * x) gets their sum. Each starts as
    0.0 + d, a sum's first term (so a -0.0 is written 0.0)."""
    if len(operand_rows) == 2:  # binary ops, most nodes of a big graph: no inner loop per node
        (rows_a, rows_b), (column_a, column_b) = operand_rows, derivatives
        for i, a, b, da, db in zip(nodes, rows_a, rows_b, column_a, column_b, strict=True):
            if a != b:
                local[i] = {ids[a]: 0.0 + da, ids[b]: 0.0 + db}
            else:
                local[i] = {ids[a]: 0.0 + da + db}
        return
    for r, i in enumerate(nodes):
        grads: LocalGrads = {}
        for rows, column in zip(operand_rows, derivatives, strict=True):
            name = ids[rows[r]]
            grads[name] = grads.get(name, 0.0) + column[r]
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
    output = program.node_id(program.output)
    out = output if output.isidentifier() else "the output"
    leaves = []
    for i in program.rows_of("input", "param").tolist():
        grad = result.grad(i)
        if grad is not None:
            leaves.append(_explain(program.node_id(i), np.asarray(grad), out))
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
