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

from gradiag.engine.compiler import Program
from gradiag.engine.executor import Result
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
    """Gate stats and findings, non-finite nodes, exploding leaf gradients and parameter
    counts of one run. Scalar nodes are read in whole-column passes over the executor's
    flat arrays; tensor nodes one at a time."""
    program = result.program
    values, grads = result.scalar_values, result.scalar_grads
    scalar = program.ranks == 0
    gates = {"relu": GateStats(), "sigmoid": GateStats(), "tanh": GateStats()}
    found: list[tuple[Array, str, tuple[str, str, str]]] = []  # (rows, op, verdict)
    for op, stats in gates.items():
        rows = program.rows_of(op)
        at = rows[scalar[rows]]
        if op == "relu":
            flagged = is_dead(values[program.operands[0, at]])
        else:
            flagged = is_saturated(values[at], op, thresholds.saturation_eps)
        stats.nodes = stats.elements = at.size
        stats.flagged = int(np.count_nonzero(flagged))
        for count, where in ((1, at[flagged]), (0, at[~flagged])):  # a scalar: 1 of 1, or 0
            verdict = _gate_verdict(op, count, 1, thresholds)
            if verdict is not None and where.size:
                found.append((where, op, verdict))
        for i in rows[~scalar[rows]].tolist():
            count, size = _flagged_elements(result, i, op, thresholds.saturation_eps)
            stats.nodes += 1
            stats.elements += size
            stats.flagged += count
            verdict = _gate_verdict(op, count, size, thresholds)
            if verdict is not None:
                found.append((np.array([i]), op, verdict))
    findings = _gate_findings(program, found)
    nonfinite = _nonfinite_rows(result, values, grads, scalar)
    if nonfinite.size:
        findings.append(_nonfinite_finding(result, int(nonfinite[0]), nonfinite.size))
    params = program.rows_of("param")
    findings += _exploding_leaves(result, grads, scalar, thresholds)
    return GraphDiagnostics(
        relu=gates["relu"],
        sigmoid=gates["sigmoid"],
        tanh=gates["tanh"],
        nonfinite_nodes=program.node_ids(nonfinite),
        parameter_tensors=params.size,
        parameter_total=_elements(program, params, scalar),
        findings=findings,
    )


def _elements(program: Program, rows: Array, scalar: Array) -> int:
    """The elements of these rows' values: one per scalar row, its size per tensor row."""
    tensors = rows[~scalar[rows]].tolist()
    return int(np.count_nonzero(scalar[rows])) + sum(program.tensors[i].size for i in tensors)


def _flagged_elements(result: Result, i: int, op: str, eps: float) -> tuple[int, int]:
    """(dead or saturated elements, elements) of tensor gate node i."""
    x = result.value(int(result.program.operands[0, i])) if op == "relu" else result.value(i)
    flagged = is_dead(x) if op == "relu" else is_saturated(x, op, eps)
    return int(np.count_nonzero(flagged)), flagged.size


def _nonfinite_rows(result: Result, values: Array, grads: Array, scalar: Array) -> Array:
    """The rows whose value or gradient holds NaN or Infinity, ascending."""
    program = result.program
    with_grad = np.ones(len(program), bool)
    with_grad[program.rows_of("const")] = False
    with_grad[list(program.no_grad)] = False
    bad = scalar & ~(np.isfinite(values) & (np.isfinite(grads) | ~with_grad))
    for i in np.flatnonzero(~scalar).tolist():
        bad[i] = not (is_finite(result.value(i)) and is_finite(result.grad(i)))
    return np.flatnonzero(bad)


def _exploding_leaves(
    result: Result, grads: Array, scalar: Array, thresholds: Thresholds
) -> list[Finding]:
    """An input or param whose gradient has a finite norm above `exploding_norm`."""
    program = result.program
    findings = []
    leaves = program.rows_of("input", "param")
    scalar_leaves = leaves[scalar[leaves]]
    with np.errstate(invalid="ignore"):
        magnitudes = np.abs(grads[scalar_leaves])
        steep = np.isfinite(magnitudes) & (magnitudes > thresholds.exploding_norm)
    norms = dict(zip(scalar_leaves[steep].tolist(), magnitudes[steep].tolist(), strict=True))
    for i in leaves[~scalar[leaves]].tolist():
        grad = result.grad(i)
        norm = None if grad is None else _finite_norm(grad)
        if norm is not None and norm > thresholds.exploding_norm:
            norms[i] = norm
    for i in sorted(norms):
        findings.append(_exploding(program.node_id(i), norms[i], thresholds))
    return findings


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


def _gate_findings(
    program: Program, found: list[tuple[Array, str, tuple[str, str, str]]]
) -> list[Finding]:
    """A finding per row of each (rows, op, verdict) group, in row order. A big graph may
    have a finding per node: the ids are named once for all rows, each group's code,
    severity and message text made once, and per row only the message and the tuple."""
    if not found:
        return []
    at = np.concatenate([where for where, _, _ in found])
    group = np.repeat(np.arange(len(found)), [where.size for where, _, _ in found])
    order = np.argsort(at, kind="stable")
    names = program.node_ids(at[order])
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


def _nonfinite_finding(result: Result, i: int, count: int) -> Finding:
    first = result.program.node_id(i)
    where = "value" if not is_finite(result.value(i)) else "gradient"
    return Finding(
        "nonfinite",
        "fail",
        first,
        f"a non-finite {where} first appears at node {first!r} ({result.program.op(i)}); "
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
