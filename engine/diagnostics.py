"""Read health off one forward/backward pass: dead ReLUs, saturated gates, non-finite values.

Nothing here computes a gradient; it only looks at the values and gradients `graph.run`
produced, so the graph and network reports describe the same numbers they return.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from gradiag.engine.graph import OperandRows, Program, Result, RowIds, op_rows
from gradiag.engine.ops import Array, all_finite

SEVERITY_RANK = {"ok": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Thresholds:
    """Where findings start. Fractions are of units (network) or elements (graph)."""

    dead_warn: float = 0.10
    dead_fail: float = 0.50
    saturated_warn: float = 0.10
    saturated_fail: float = 0.50
    saturation_eps: float = 0.01
    # network: ||dW of layer 1|| / ||dW of the last layer|| below this is a vanishing gradient
    vanishing_ratio: float = 1e-3
    # a gradient norm (graph: of an input or param; network: of a layer's W) above this
    exploding_norm: float = 1e3


class Finding(NamedTuple):
    """One health finding. A named tuple, not a frozen dataclass: a big scalar graph may
    have a finding per node (11,700 dead ReLUs in a 100k-node one), and a frozen dataclass's
    __init__ cost more than the rest of its diagnostics."""

    code: str
    severity: str
    location: str
    message: str


@dataclass
class GateStats:
    """Totals over every node of one kind (relu, sigmoid, tanh) in a graph."""

    nodes: int = 0
    elements: int = 0
    flagged: int = 0  # dead (relu) or saturated (sigmoid, tanh) elements

    @property
    def fraction(self) -> float:
        return self.flagged / self.elements if self.elements else 0.0


@dataclass
class GraphDiagnostics:
    relu: GateStats
    sigmoid: GateStats
    tanh: GateStats
    nonfinite_nodes: list[str]
    parameter_tensors: int
    parameter_total: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        return worst_status(self.findings)


def worst_status(findings: Iterable[Finding]) -> str:
    # the distinct severities first (a C-level pass): there may be a finding per node
    severities = set(map(attrgetter("severity"), findings))
    return max(severities, key=SEVERITY_RANK.__getitem__, default="ok")


def grade(fraction: float, warn: float, fail: float) -> str:
    if fraction >= fail:
        return "fail"
    return "warn" if fraction >= warn else "ok"


def is_dead(pre_activation: Array) -> Array:
    """A ReLU element is dead when its input is <= 0: its gradient is blocked."""
    return np.asarray(pre_activation <= 0)


def is_saturated(activation: Array, kind: str, eps: float) -> Array:
    """Sigmoid output within eps of 0 or 1; tanh output within eps of -1 or 1."""
    return np.asarray(_saturated(activation, kind, eps))


def _saturated(activation: Any, kind: str, eps: float) -> Any:
    """is_saturated's test, for an array or a Python float alike."""
    low = 0.0 if kind == "sigmoid" else -1.0
    return (activation < low + eps) | (activation > 1.0 - eps)


def is_finite(x: Array | None) -> bool:
    """No NaN or infinity (None, a const's gradient, is finite). One read, no bool array."""
    return x is None or all_finite(x)


# Elements cast to float64 at a time by the reductions below: a 64 KiB buffer, in cache and
# under glibc's mmap threshold (a bigger one measured slower: page faults on every call).
CHUNK = 1 << 13

# Elements mean_std centres in one float64 array (8 MiB): a layer's activations at once, in
# three NumPy calls (four for float32: the cast). A chunk loop costs ~7 us a chunk (the
# benchmark's 256 x 1024 activations: ~0.34 -> ~0.2 ms a layer in cache); above this size
# the loop's overhead is noise, and the float64 copy would not be.
WHOLE = 1 << 20


# Where a float32 sum of squares is trusted: above, it may have overflowed (float32 ends at
# 3.4e38); below, elements' squares may have lost digits in float32's subnormal range.
FLOAT32_TRUSTED = (1e-20, 1e30)


def sum_of_squares(x: Array) -> float:
    """sum(x**2) without a float64 copy of x: a float64 x in one BLAS dot; a float32 x in
    one float32 dot (~1e-6 relative: float32's own precision, at a tenth of the chunks'
    time) unless the result is outside FLOAT32_TRUSTED, then in float64 a chunk at a time.
    NaN or inf whenever an element is, so a finite result also says that x is finite."""
    flat = x.reshape(-1)
    if flat.dtype == np.float64:
        return float(np.dot(flat, flat))
    if flat.dtype == np.float32:
        with np.errstate(all="ignore"):
            total = float(np.dot(flat, flat))
        low, high = FLOAT32_TRUSTED
        if low < total < high:
            return total
    return _chunked_sum_of_squares(flat, 0.0)


def mean_std(x: Array) -> tuple[float, float]:
    """Mean and (population) standard deviation in float64, as np.mean and np.std with
    dtype=float64 give them. Up to WHOLE elements in one float64 array (x - mean, then a
    BLAS dot); a bigger x a chunk at a time, never a float64 copy of all of it."""
    if x.size == 0:
        return math.nan, math.nan
    flat = x.reshape(-1)
    if flat.size > WHOLE:
        mean = float(np.mean(flat, dtype=np.float64))  # buffered casting: no float64 copy
        return mean, math.sqrt(_chunked_sum_of_squares(flat, mean) / flat.size)
    if flat.dtype == np.float64:
        mean = float(np.add.reduce(flat)) / flat.size
        centred = flat - mean
    else:
        centred = flat.astype(np.float64)
        mean = float(np.add.reduce(centred)) / flat.size
        centred -= mean
    return mean, math.sqrt(float(np.dot(centred, centred)) / flat.size)


def _chunked_sum_of_squares(flat: Array, shift: float) -> float:
    """sum((flat - shift)**2) in float64, through one float64 buffer of CHUNK elements
    reused for every chunk (a loop over chunks, not elements)."""
    buffer = np.empty(min(CHUNK, flat.size), np.float64)
    total = 0.0
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start : start + CHUNK]
        part = buffer[: chunk.size]
        np.copyto(part, chunk)  # the cast (faster than a casting subtract)
        if shift:
            part -= shift
        total += float(np.dot(part, part))
    return total


DEAD_RELU_ADVICE = (
    "no gradient flows through dead units; lower the learning rate, "
    "use leaky_relu, or initialise biases slightly positive"
)
SATURATION_ADVICE = {
    "sigmoid": "saturated sigmoids pass almost no gradient; prefer tanh or relu, "
    "or scale the inputs and weights down (Xavier init)",
    "tanh": "saturated tanh units pass almost no gradient; scale the inputs and weights down "
    "(Xavier init) or use relu",
}


def graph_diagnostics(result: Result, thresholds: Thresholds) -> GraphDiagnostics:
    if result.flat_values is not None and result.flat_grads is not None:
        return _scalar_diagnostics(result, result.flat_values, result.flat_grads, thresholds)
    program = result.program
    gates = {"relu": GateStats(), "sigmoid": GateStats(), "tanh": GateStats()}
    findings: list[Finding] = []  # the gates', in node order
    exploding: list[Finding] = []
    nonfinite: list[int] = []
    params: list[int] = []
    # one pass over the nodes for every question (a small graph's cost is per node visit)
    rows = zip(program.ids, program.ops, result.values, result.grads, strict=True)
    for i, (node, op, value, grad) in enumerate(rows):
        if not (is_finite(value) and is_finite(grad)):
            nonfinite.append(i)
        if op in gates:
            finding = _gate_reading(result, i, op, gates[op], thresholds)
            if finding is not None:
                findings.append(finding)
        elif op in ("input", "param"):
            if op == "param":
                params.append(i)
            norm = None if grad is None else _finite_norm(grad)
            if norm is not None and norm > thresholds.exploding_norm:
                exploding.append(_exploding(node, norm, thresholds))
    if nonfinite:
        findings.append(_nonfinite_finding(result, nonfinite[0], len(nonfinite)))
    return GraphDiagnostics(
        relu=gates["relu"],
        sigmoid=gates["sigmoid"],
        tanh=gates["tanh"],
        nonfinite_nodes=[program.ids[i] for i in nonfinite],
        parameter_tensors=len(params),
        parameter_total=sum(result.values[i].size for i in params),
        findings=findings + exploding,
    )


def _gate_reading(
    result: Result, i: int, op: str, stats: GateStats, thresholds: Thresholds
) -> Finding | None:
    """Add gate node i to its op's stats; its finding, if its elements call for one."""
    count, size = _flagged_elements(result, i, op, thresholds.saturation_eps)
    stats.nodes += 1
    stats.elements += size
    stats.flagged += count
    verdict = _gate_verdict(op, count, size, thresholds)
    return None if verdict is None else _gate_finding(result.program.ids[i], op, verdict)


def _flagged_elements(result: Result, i: int, op: str, eps: float) -> tuple[int, int]:
    """(dead or saturated elements, elements) of gate node i. A float64 scalar is read as a
    Python float: the same comparisons, without a bool array and two NumPy calls."""
    program = result.program
    relu = op == "relu"
    x = result.values[program.operands[i][0]] if relu else result.values[i]
    if x.ndim == 0 and x.dtype == np.float64:
        value = float(x)
        return int(value <= 0 if relu else _saturated(value, op, eps)), 1
    flagged = is_dead(x) if relu else is_saturated(x, op, eps)
    return int(np.count_nonzero(flagged)), flagged.size


def _gate_finding(node: str, op: str, verdict: tuple[str, str, str]) -> Finding:
    code, severity, text = verdict
    return Finding(code, severity, node, f"{op} node {node!r}: {text}")


def _gate_verdict(
    op: str, count: int, size: int, thresholds: Thresholds
) -> tuple[str, str, str] | None:
    """(code, severity, message after the node's name) of a gate node with `count` of its
    `size` elements flagged; None when that is healthy."""
    fraction = count / size if size else 0.0
    if op == "relu":
        severity = grade(fraction, thresholds.dead_warn, thresholds.dead_fail)
        code, what, advice = "dead_relu", "dead (input <= 0)", DEAD_RELU_ADVICE
    else:
        severity = grade(fraction, thresholds.saturated_warn, thresholds.saturated_fail)
        code, what = f"saturated_{op}", f"saturated (within {thresholds.saturation_eps} of a bound)"
        advice = SATURATION_ADVICE[op]
    if severity == "ok":
        return None
    return code, severity, f"{count} of {size} elements ({fraction:.0%}) are {what}; {advice}."


def _scalar_diagnostics(
    result: Result, values: Array, grads: Array, thresholds: Thresholds
) -> GraphDiagnostics:
    """graph_diagnostics of an all-scalar program from its flat value and gradient arrays:
    the same stats and findings, in the same order, with one NumPy pass per question."""
    program = result.program
    none = np.empty(0, np.intp)
    rows = {
        op: op_rows(program).get(op, none) for op in ("relu", "sigmoid", "tanh", "input", "param")
    }
    gates = {"relu": GateStats(), "sigmoid": GateStats(), "tanh": GateStats()}
    found: list[tuple[Array, str, tuple[str, str, str]]] = []  # (rows, op, verdict)
    for op, stats in gates.items():
        at = rows[op]
        if op == "relu":
            flagged = is_dead(values[_first_operands(program, at)])
        else:
            flagged = is_saturated(values[at], op, thresholds.saturation_eps)
        stats.nodes = stats.elements = at.size
        stats.flagged = int(np.count_nonzero(flagged))
        for count, where in ((1, at[flagged]), (0, at[~flagged])):  # a scalar: 1 of 1, or 0
            verdict = _gate_verdict(op, count, 1, thresholds)
            if verdict is not None and where.size:
                found.append((where, op, verdict))
    findings = _gate_findings(program, found)
    bad = np.flatnonzero(~(np.isfinite(values) & np.isfinite(grads)))
    nonfinite = _ids_at(program, bad)
    if nonfinite:
        findings.append(_nonfinite_finding(result, int(bad[0]), len(nonfinite)))
    leaves = np.sort(np.concatenate((rows["input"], rows["param"])))
    with np.errstate(invalid="ignore"):
        leaf_grads = grads[leaves]
        steep = leaves[np.isfinite(leaf_grads) & (np.abs(leaf_grads) > thresholds.exploding_norm)]
    findings += [_exploding(program.ids[i], abs(float(grads[i])), thresholds) for i in steep]
    return GraphDiagnostics(
        relu=gates["relu"],
        sigmoid=gates["sigmoid"],
        tanh=gates["tanh"],
        nonfinite_nodes=nonfinite,
        parameter_tensors=rows["param"].size,
        parameter_total=rows["param"].size,
        findings=findings,
    )


def _gate_findings(
    program: Program, found: list[tuple[Array, str, tuple[str, str, str]]]
) -> list[Finding]:
    """A finding per row of each (rows, op, verdict) group, in row order as the per-node
    path reports them. A big graph may have a finding per node: the ids are named once for
    all rows, each group's code, severity and message text made once, and per row only
    the message and the tuple are built."""
    if not found:
        return []
    at = np.concatenate([where for where, _, _ in found])
    group = np.repeat(np.arange(len(found)), [where.size for where, _, _ in found])
    order = np.argsort(at, kind="stable")
    names = _ids_at(program, at[order])
    parts = [
        (code, severity, f"{op} node ", f": {text}") for _, op, (code, severity, text) in found
    ]
    fields = (
        (code, severity, name, f"{before}{name!r}{after}")
        for (code, severity, before, after), name in zip(
            map(parts.__getitem__, group[order].tolist()), names, strict=True
        )
    )
    # Finding._make without its Python frame per row (tuple.__new__ is what it calls)
    return list(map(tuple.__new__, repeat(Finding), fields))


def _first_operands(program: Program, rows: Array) -> Array:
    if isinstance(program.operands, OperandRows):  # a columns body: read the column
        first: Array = program.operands.columns[0][rows]
        return first
    return np.array([program.operands[i][0] for i in rows.tolist()], np.intp)


def _ids_at(program: Program, rows: Array) -> list[str]:
    if isinstance(program.ids, RowIds):  # a columns body without ids: the row numbers
        return list(map(str, rows.tolist()))
    return list(map(program.ids.__getitem__, rows.tolist()))


def _nonfinite_finding(result: Result, i: int, count: int) -> Finding:
    first = result.program.ids[i]
    where = "value" if not is_finite(result.values[i]) else "gradient"
    return Finding(
        "nonfinite",
        "fail",
        first,
        f"a non-finite {where} first appears at node {first!r} ({result.program.ops[i]}); "
        f"{count} node(s) hold NaN or Infinity. Look for overflow (exp, pow), log or sqrt of "
        "values <= 0, or division by zero there.",
    )


def _finite_norm(grad: Array) -> float | None:
    """np.linalg.norm of a finite gradient (None when it is not finite). A float64 scalar's
    is the same sqrt(g * g) in Python floats: np.linalg.norm costs ~3 us a call."""
    if grad.ndim == 0 and grad.dtype == np.float64:
        g = float(grad)
        return math.sqrt(g * g) if math.isfinite(g) else None  # g * g may overflow: inf
    if not is_finite(grad):
        return None
    with np.errstate(over="ignore"):
        return float(np.linalg.norm(grad))


def _exploding(node: str, norm: float, thresholds: Thresholds) -> Finding:
    return Finding(
        "exploding_gradient",
        "warn",
        node,
        f"the gradient of {node!r} has norm {norm:.3g}, above {thresholds.exploding_norm:g}; "
        "lower the learning rate, clip gradients, or scale the inputs down.",
    )
