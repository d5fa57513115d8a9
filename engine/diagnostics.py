"""Read health off one forward/backward pass: dead and saturated units, norms, non-finites.

Nothing here computes a gradient; it only looks at the values and gradients the executor
produced, so the reports describe the same numbers they return. The rules (docs/
diagnostics.md has them with a worked example each):

- An activation node (an op with a `gate` in the op table: relu, leaky_relu, sigmoid, tanh)
  of rank >= 2 is a batch of units: axis `batch_axis` indexes the examples; for rank 2 every
  other position is a unit, for rank >= 3 (N, C, H, W) a unit is a channel, the axis after
  the batch axis. A unit is dead when its input is <= 0 for every example (and position);
  saturated when its output is within eps of a bound for every one. A node of rank < 2 (or
  not larger than `batch_axis`) has no batch axis: its elements are counted, never graded.
- A relu none of whose paths to the output passes through an op with weights (matmul,
  affine, conv2d) is a margin (a hinge's max(0, .)): counted, not graded.
- Graded per node (network: per layer): `dead_relu` and `saturated_<op>` on the fraction of
  units, `saturated_activations` on the fraction of elements (a layer 95% saturated with no
  unit saturated on every example is not healthy).
- Norms are exact for finite data (scaled as BLAS nrm2 is): never Infinity for finite data.
- `nonfinite` names the first node, in topological order, whose value is not finite; when
  every value is, the first non-finite gradient in backward order (where it came in).
- At most `MAX_FINDINGS` findings are listed; beyond, one per code says how many more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple, Protocol

import numpy as np

from gradiag.engine.compiler import Program
from gradiag.engine.executor import Result
from gradiag.engine.ops import OPS, Array, Op, all_finite

SEVERITY_RANK = {"ok": 0, "warn": 1, "fail": 2}
MAX_FINDINGS = 100


@dataclass(frozen=True)
class Thresholds:
    """Where findings start. Fractions are of units, or of elements for
    `saturated_activations`."""

    dead_warn: float = 0.10
    dead_fail: float = 0.50
    saturated_warn: float = 0.10
    saturated_fail: float = 0.50
    saturation_eps: float = 0.01
    # the fraction of a layer's (node's) activations that are saturated
    saturated_activations_warn: float = 0.25
    saturated_activations_fail: float = 0.75
    # network: ||dW of layer 1|| / ||dW of the last layer|| below this is a vanishing gradient
    vanishing_ratio: float = 1e-3
    # a gradient norm (graph: of an input or param; network: of a layer's W) above this
    exploding_norm: float = 1e3
    # training (engine/training.py): a layer's median ||lr * v|| / ||W|| above `high` or below
    # `low` warns (CS231n: about 1e-3); a loss above `diverged_factor` x its start fails
    update_ratio_high: float = 1e-2
    update_ratio_low: float = 1e-5
    diverged_factor: float = 10.0


class Finding(NamedTuple):
    """One health finding; `omitted` only on a summary of findings left out of the list (the
    wire's `count`)."""

    code: str
    severity: str
    location: str
    message: str
    omitted: int | None = None


def worst_status(findings: Iterable[Finding]) -> str:
    severities = set(map(attrgetter("severity"), findings))
    return max(severities, key=SEVERITY_RANK.__getitem__, default="ok")


def grade(fraction: float, warn: float, fail: float) -> str:
    if fraction >= fail:
        return "fail"
    return "warn" if fraction >= warn else "ok"


def cap_findings(findings: Sequence[Finding], limit: int = MAX_FINDINGS) -> list[Finding]:
    """The first `limit` findings, then one per code for the rest: how many, and the worst
    severity among them (so the status stays the worst of all)."""
    if len(findings) <= limit:
        return list(findings)
    left: dict[str, list[Finding]] = {}
    for finding in findings[limit:]:
        left.setdefault(finding.code, []).append(finding)
    summaries = [
        Finding(
            code,
            worst_status(group),
            group[0].location,
            f"{len(group)} more {code} findings, the first at {group[0].location!r}, are not "
            f"listed: a report lists at most {limit} findings",
            len(group),
        )
        for code, group in left.items()
    ]
    return [*findings[:limit], *summaries]


# --- activations: dead and saturated units ------------------------------------------------


@dataclass
class Reading:
    """One activation node (or layer) read: its elements and, with a batch axis, units."""

    op: str
    elements: int
    flagged: int  # dead (dies, leaks) or saturated elements
    units: int | None  # None: no batch axis (rank < 2), not graded as units
    flagged_units: list[int] = field(default_factory=list)  # dead or saturated units
    per_unit: Array | None = None  # flagged elements of each unit (with units)

    @property
    def fraction(self) -> float:
        return self.flagged / self.elements if self.elements else 0.0

    @property
    def unit_fraction(self) -> float:
        return len(self.flagged_units) / self.units if self.units else 0.0


def flagged(op: Op, pre: Array, post: Array, eps: float) -> Array:
    """Which elements are dead (input <= 0: relu, leaky_relu) or saturated (output within
    eps of one of the op's bounds: sigmoid, tanh)."""
    if op.gate == "saturates":
        assert op.bounds is not None
        low, high = op.bounds
        return np.asarray((post < low + eps) | (post > high - eps))
    return np.asarray(pre <= 0)


def unit_axes(ndim: int, batch_axis: int) -> tuple[int, ...] | None:
    """The axes a unit is read over (a unit is flagged when flagged at all of them): the
    batch axis for rank 2, every axis but the channel (the one after the batch axis) for
    rank >= 3; None where there is no batch axis."""
    if ndim < 2 or batch_axis >= ndim:
        return None
    if ndim == 2:
        return (batch_axis,)
    channel = (batch_axis + 1) % ndim
    return tuple(axis for axis in range(ndim) if axis != channel)


def count_per_unit(mask: Array, axes: tuple[int, ...]) -> Array:
    """np.count_nonzero(mask, axis=axes), as int64. For (N, C, *spatial) read per channel,
    each image's positions are summed first as bytes (uint16 where they fit), then the
    images: NumPy's count over several axes sums an int64 copy of the mask, ~4x slower."""
    ndim = mask.ndim
    if ndim < 3 or axes != (0, *range(2, ndim)):
        counted: Array = np.count_nonzero(mask, axis=axes)
        return counted
    n, c = mask.shape[:2]
    positions = math.prod(mask.shape[2:])
    per_image = np.add.reduce(
        np.ascontiguousarray(mask).reshape(n, c, positions).view(np.uint8),
        axis=2,
        dtype=np.uint16 if positions < 2**16 else np.int64,
    )
    counts: Array = per_image.sum(axis=0, dtype=np.int64)
    return counts


def read_activation(op: Op, pre: Array, post: Array, eps: float, batch_axis: int) -> Reading:
    mask = flagged(op, pre, post, eps)
    axes = unit_axes(mask.ndim, batch_axis)
    if axes is None:
        return Reading(op.name, mask.size, int(np.count_nonzero(mask)), None)
    per_unit = count_per_unit(mask, axes).reshape(-1)
    whole = mask.size // max(1, per_unit.size)  # a unit's elements
    everywhere = np.flatnonzero(per_unit == whole).tolist()
    return Reading(op.name, mask.size, int(per_unit.sum()), per_unit.size, everywhere, per_unit)


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


def unit_findings(
    reading: Reading, where: str, subject: str, thresholds: Thresholds
) -> list[Finding]:
    """The graded findings of one node or layer (`where`: its id or name; `subject`: how a
    message names it, e.g. "relu node 'h'" or "layer1")."""
    if reading.units is None:
        return []
    findings = []
    units, count, fraction = reading.units, len(reading.flagged_units), reading.unit_fraction
    if reading.op == "relu":
        severity = grade(fraction, thresholds.dead_warn, thresholds.dead_fail)
        if severity != "ok":
            message = (
                f"{count} of {units} relu units of {subject} ({fraction:.0%}) are dead (input "
                f"<= 0 on every example): {DEAD_RELU_ADVICE}."
            )
            findings.append(Finding("dead_relu", severity, where, message))
    if reading.op in SATURATION_ADVICE:
        eps = thresholds.saturation_eps
        advice = SATURATION_ADVICE[reading.op]
        severity = grade(fraction, thresholds.saturated_warn, thresholds.saturated_fail)
        if severity != "ok":
            message = (
                f"{count} of {units} {reading.op} units of {subject} ({fraction:.0%}) are "
                f"saturated (within {eps:g} of a bound on every example): {advice}."
            )
            findings.append(Finding(f"saturated_{reading.op}", severity, where, message))
        severity = grade(
            reading.fraction,
            thresholds.saturated_activations_warn,
            thresholds.saturated_activations_fail,
        )
        if severity != "ok":
            message = (
                f"{reading.fraction:.0%} of the {reading.elements} {reading.op} activations of "
                f"{subject} are saturated (within {eps:g} of a bound): {advice}."
            )
            findings.append(Finding("saturated_activations", severity, where, message))
    return findings


# --- norms and finiteness -----------------------------------------------------------------


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
        total = float(np.vdot(flat, flat))  # a BLAS dot, like np.dot, but no overflow warning
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


def norm(x: Array) -> float:
    """The 2-norm (Frobenius) of x, exact for finite data: sqrt(sum(x^2)) when that sum
    neither overflows nor loses digits to underflow, else scaled by max|x| as BLAS nrm2
    does (1e200 elements give ~1e200, never Infinity). NaN or Infinity only when x holds
    them (NaN when it holds a NaN)."""
    with np.errstate(all="ignore"):
        total = sum_of_squares(x)
    return norm_of_sum_of_squares(total, x)


def norm_of_sum_of_squares(total: float, x: Array) -> float:
    """`norm(x)` given x's `sum_of_squares` already (the network reads each tensor once)."""
    return math.sqrt(total) if _PLAIN[0] < total < _PLAIN[1] else _scaled_norm(x)


# Below this a float64 sum of squares may hold squares that lost digits (subnormal) or
# flushed to 0 (an all-zero x lands here too: its scaled norm is 0); above it one may have
# overflowed.
_PLAIN = (1e-280, 1e300)


def _scaled_norm(x: Array) -> float:
    """max|x| * ||x / max|x|||, in float64 a chunk at a time; NaN and Infinity as data."""
    flat = x.reshape(-1)
    if flat.size == 0:
        return 0.0
    with np.errstate(all="ignore"):
        if np.isnan(flat).any():
            return math.nan
        scale = float(np.max(np.abs(flat)))
        if scale == 0.0 or not math.isfinite(scale):
            return scale
        total = 0.0
        for start in range(0, flat.size, CHUNK):
            part = flat[start : start + CHUNK].astype(np.float64) / scale
            total += float(np.dot(part, part))
    return scale * math.sqrt(total)


# --- layers: what a network and an ONNX model share --------------------------------------


class WithGradNorms(Protocol):
    """A layer with the norms of its gradients by part (W, b, z, ...)."""

    grad_norms: dict[str, float]


def first_to_last(layers: Sequence[WithGradNorms], part: str) -> float | None:
    """A gradient norm of the first layer with weights over the last one's; None for one
    such layer, a zero or non-finite last."""
    if len(layers) < 2:
        return None
    first, last = layers[0].grad_norms[part], layers[-1].grad_norms[part]
    if not (math.isfinite(first) and math.isfinite(last)) or last == 0:
        return None
    return first / last


# --- a graph -------------------------------------------------------------------------------


@dataclass
class KindStats:
    """Totals over the activation nodes of one op (relu, sigmoid, tanh) in a graph."""

    nodes: int = 0
    elements: int = 0
    flagged: int = 0  # dead (relu) or saturated (sigmoid, tanh) elements
    units: int = 0  # of the nodes with a batch axis
    flagged_units: int = 0
    margins: int = 0  # relu nodes that are a margin, not hidden units

    @property
    def fraction(self) -> float:
        return self.flagged / self.elements if self.elements else 0.0

    @property
    def unit_fraction(self) -> float:
        return self.flagged_units / self.units if self.units else 0.0

    def add(self, reading: Reading) -> None:
        self.nodes += 1
        self.elements += reading.elements
        self.flagged += reading.flagged
        if reading.units is not None:
            self.units += reading.units
            self.flagged_units += len(reading.flagged_units)


GRAPH_KINDS = ("relu", "sigmoid", "tanh")


@dataclass
class GraphDiagnostics:
    kinds: dict[str, KindStats]
    nonfinite_nodes: list[str]
    parameter_tensors: int
    parameter_total: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        return worst_status(self.findings)


def graph_diagnostics(
    result: Result, thresholds: Thresholds, *, batch_axis: int = 0
) -> GraphDiagnostics:
    """Per-kind stats and graded findings of the activation nodes, non-finite nodes,
    exploding leaf gradients and parameter counts of one run. Scalar nodes are read in
    whole-column passes over the executor's flat arrays; tensor nodes one at a time."""
    program = result.program
    scalar = program.ranks == 0
    kinds = {name: KindStats() for name in GRAPH_KINDS}
    graded: list[tuple[int, Finding]] = []  # (row, finding): listed in row order
    gated = [name for name in program.names if name in kinds]
    margins = _margins(program) if (program.rows_of("relu").size and not scalar.all()) else None
    for name in gated:
        stats, op = kinds[name], OPS[name]
        rows = program.rows_of(name)
        _count_scalars(result, op, rows[scalar[rows]], stats, thresholds.saturation_eps)
        for i in rows[~scalar[rows]].tolist():
            pre = result.value(int(program.operands[0, i]))
            reading = read_activation(op, pre, result.value(i), thresholds.saturation_eps,
                                      batch_axis)  # fmt: skip
            stats.add(reading)
            if margins is not None and name == "relu" and margins[i]:
                stats.margins += 1
                continue
            node = program.node_id(i)
            subject = f"{name} node {node!r}"
            graded += [(i, f) for f in unit_findings(reading, node, subject, thresholds)]
    findings = [finding for _, finding in sorted(graded, key=lambda pair: pair[0])]
    nonfinite = _nonfinite_rows(result, scalar)
    if nonfinite.size:
        findings.append(nonfinite_finding(result, nonfinite, program.node_id))
    params = program.rows_of("param")
    findings += _exploding_leaves(result, scalar, thresholds)
    return GraphDiagnostics(
        kinds=kinds,
        nonfinite_nodes=program.node_ids(nonfinite),
        parameter_tensors=params.size,
        parameter_total=_elements(program, params, scalar),
        findings=cap_findings(findings),
    )


def _count_scalars(result: Result, op: Op, rows: Array, stats: KindStats, eps: float) -> None:
    """Scalar activation nodes: their elements counted in one pass; never graded."""
    if not rows.size:
        return
    values = result.scalar_values
    pre = values[result.program.operands[0, rows]]
    mask = flagged(op, pre, values[rows], eps)
    stats.nodes += rows.size
    stats.elements += rows.size
    stats.flagged += int(np.count_nonzero(mask))


def _margins(program: Program) -> Array:
    """By row: True where no path from the node to the output passes through an op with
    weights (matmul, affine, conv2d): a relu there is a margin, not a hidden unit. One walk
    in reverse topological order from the output (nodes it does not reach: True)."""
    n = len(program)
    reached = [False] * n
    weighted_after = [False] * n  # some path to the output passes a weighted op after it
    reached[program.output] = True
    for i in range(program.output, -1, -1):
        if not reached[i]:
            continue
        op = OPS.get(program.op(i))
        through = weighted_after[i] or (op is not None and op.weighted)
        for j in program.inputs(i):
            reached[j] = True
            weighted_after[j] = weighted_after[j] or through
    return ~np.array(weighted_after, bool)


def _elements(program: Program, rows: Array, scalar: Array) -> int:
    """The elements of these rows' values: one per scalar row, its size per tensor row."""
    tensors = rows[~scalar[rows]].tolist()
    return int(np.count_nonzero(scalar[rows])) + sum(program.tensors[i].size for i in tensors)


def _nonfinite_rows(result: Result, scalar: Array) -> Array:
    """The rows whose value or gradient holds NaN or Infinity, ascending."""
    program = result.program
    with_grad = np.ones(len(program), bool)
    with_grad[program.rows_of("const")] = False
    with_grad[list(program.no_grad)] = False
    values, grads = result.scalar_values, result.scalar_grads
    bad = scalar & ~(np.isfinite(values) & (np.isfinite(grads) | ~with_grad))
    for i in np.flatnonzero(~scalar).tolist():
        bad[i] = not (is_finite(result.value(i)) and is_finite(result.grad(i)))
    return np.flatnonzero(bad)


def nonfinite_origin(result: Result, rows: Array) -> tuple[int, str]:
    """Of the non-finite `rows` (ascending): the first whose value is not finite, in
    topological order; when every value is finite, the last whose gradient is not (the
    first in backward order: where the NaN or Infinity came into the backward pass)."""
    for i in rows.tolist():
        if not is_finite(result.value(i)):
            return i, "value"
    return int(rows[-1]), "gradient"


def nonfinite_finding(result: Result, rows: Array, name_of: Callable[[int], str]) -> Finding:
    """The `nonfinite` finding: where it starts (`name_of(row)`: its location)."""
    i, where = nonfinite_origin(result, rows)
    program = result.program
    node = program.node_id(i)
    if where == "value":
        start = f"a non-finite value first appears at node {node!r} ({program.op(i)})"
        look = (
            "look for overflow (exp, pow, huge weights), log or sqrt of values <= 0, or "
            "division by zero there"
        )
    else:
        start = (
            f"every value is finite; a non-finite gradient first appears, going backward "
            f"from the output, at node {node!r} ({program.op(i)})"
        )
        look = "look for a gradient that overflows there (huge weights or upstream gradients)"
    message = f"{start}; {rows.size} node(s) hold NaN or Infinity: {look}."
    return Finding("nonfinite", "fail", name_of(i), message)


def _exploding_leaves(result: Result, scalar: Array, thresholds: Thresholds) -> list[Finding]:
    """An input or param whose gradient has a finite norm above `exploding_norm`."""
    program = result.program
    leaves = program.rows_of("input", "param")
    scalar_leaves = leaves[scalar[leaves]]
    with np.errstate(invalid="ignore"):
        magnitudes = np.abs(result.scalar_grads[scalar_leaves])
        steep = np.isfinite(magnitudes) & (magnitudes > thresholds.exploding_norm)
    norms = dict(zip(scalar_leaves[steep].tolist(), magnitudes[steep].tolist(), strict=True))
    for i in leaves[~scalar[leaves]].tolist():
        grad = result.grad(i)
        size = norm(grad) if grad is not None else math.nan
        if math.isfinite(size) and size > thresholds.exploding_norm:
            norms[i] = size
    return [exploding_finding(program.node_id(i), norms[i], thresholds) for i in sorted(norms)]


def exploding_finding(node: str, size: float, thresholds: Thresholds) -> Finding:
    return Finding(
        "exploding_gradient",
        "warn",
        node,
        f"the gradient of {node!r} has norm {size:.3g}, above {thresholds.exploding_norm:g}; "
        "lower the learning rate, clip gradients, or scale the inputs down.",
    )
