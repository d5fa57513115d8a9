"""Compare backprop's gradients with centred differences (CS231n's gradient check).

For every differentiable leaf (`input`, `param`) a sample of its elements is perturbed one
at a time by +h and -h and the compiled program's forward is run again (`graph.forward`;
backward is never re-run). With g the upstream gradient at the output (all ones by
default), the numerical derivative of the scalar sum(g * out) is

    n = (sum(g * out(x + h)) - sum(g * out(x - h))) / 2h

and it is compared with the analytic gradient a by the relative error
|a - n| / max(|a|, |n|) (0 where both are 0). The CS231n bands name the result:
> 1e-2 "wrong", (1e-4, 1e-2] "uncomfortable", (1e-7, 1e-4] "ok for kinks", <= 1e-7 "good".

Kinks. For every node of a kink op (the op table's `kink`: relu, abs, leaky_relu: the sign of
x; max, min: the sign of a - b) the two perturbed forwards are compared: when an element's
sign differs between the +h and -h runs, or it is exactly 0 at the unperturbed point and
moved, the step crossed a kink or a tie and the centred difference is not a derivative there.
Such elements are reported as kink crossings and left out of `passed` and
`max_relative_error`.

Cost. At most `max_elements_per_node` elements of a leaf are checked (all of them when it
has no more; otherwise a sorted sample drawn without replacement by
`numpy.random.default_rng([seed, leaf position])`), and at most `max_evaluations` forwards
are run overall (two per element; when the cap bites, elements are shared out among the
leaves round-robin in topological order and `complete` is false).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gradiag.engine.compiler import Program
from gradiag.engine.errors import EngineError, LimitError
from gradiag.engine.executor import Result, Slots, check_deadline, forward
from gradiag.engine.ops import OPS, Array

BANDS: tuple[tuple[float, str], ...] = (
    (1e-2, "wrong"),
    (1e-4, "uncomfortable"),
    (1e-7, "ok for kinks"),
)
GOOD = "good"
MAX_KINKS_LISTED = 10
# Forwards of a gradcheck visit at most this many nodes in all (~1 s of per-node Python).
MAX_NODE_EVALUATIONS = 500_000


@dataclass(frozen=True)
class GradcheckOptions:
    step: float = 1e-5
    tolerance: float = 1e-6
    max_elements_per_node: int = 64
    max_evaluations: int = 4096
    seed: int = 0


@dataclass(frozen=True)
class KinkCrossing:
    """One checked element whose +-h step crossed a kink (`at`: the node, `op`, and the
    kink node's element that crossed)."""

    element: tuple[int, ...]
    at: str
    op: str
    at_element: tuple[int, ...]
    analytic: float
    numerical: float
    relative_error: float


@dataclass
class NodeCheck:
    id: str
    elements: int  # all elements of the leaf
    checked: int = 0  # elements compared (kink crossings included)
    max_relative_error: float = 0.0  # over checked elements without a kink crossing
    worst_element: tuple[int, ...] | None = None
    kink_crossings: int = 0
    kinks: list[KinkCrossing] = field(default_factory=list)
    undefined: int = 0  # elements where the perturbed forward failed (e.g. class labels)

    @property
    def verdict(self) -> str:
        return verdict(self.max_relative_error)


@dataclass
class GradcheckResult:
    options: GradcheckOptions
    nodes: list[NodeCheck]
    evaluations: int
    complete: bool

    @property
    def max_relative_error(self) -> float:
        return max((n.max_relative_error for n in self.nodes), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_relative_error <= self.options.tolerance

    @property
    def verdict(self) -> str:
        return verdict(self.max_relative_error)

    @property
    def kink_crossings(self) -> int:
        return sum(n.kink_crossings for n in self.nodes)


def evaluation_budget(
    program: Program, max_flops: int = 0, max_node_evaluations: int = MAX_NODE_EVALUATIONS
) -> int:
    """How many forwards the work budget allows: node visits (Python per node) and, when
    `max_flops` is set, floating-point operations (the same budget a single run has)."""
    budget = max_node_evaluations // max(1, len(program))
    if max_flops:
        budget = min(budget, max_flops // max(1, program.flops))
    return budget


def relative_error(analytic: Array | float, numerical: Array | float) -> Array:
    """|a - n| / max(|a|, |n|), elementwise; 0 where both are 0 (or equal infinities),
    Infinity where either is NaN or only one is infinite."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numerical, dtype=np.float64)
    with np.errstate(all="ignore"):
        scale = np.maximum(np.abs(a), np.abs(n))
        err = np.abs(a - n) / scale
    equal = a == n
    err = np.where(equal, 0.0, err)
    return np.where(np.isfinite(err) | equal, err, math.inf)


def verdict(error: float) -> str:
    """The CS231n band of a relative error."""
    for bound, name in BANDS:
        if not error <= bound:  # NaN counts as wrong
            return name
    return GOOD


def gradcheck(
    result: Result,
    output_grad: Array | None = None,
    options: GradcheckOptions = GradcheckOptions(),
    *,
    deadline: float | None = None,
) -> GradcheckResult:
    """`deadline` (a `time.monotonic()` value) is checked before every perturbed forward
    and inside it; past it, LimitError(limit="time_budget_seconds")."""
    program = result.program
    seed = (
        np.ones(program.shapes[program.output], program.dtype)
        if output_grad is None
        else np.asarray(output_grad, dtype=program.dtype)
    )
    leaves = program.rows_of("input", "param").tolist()
    samples = {i: _sample(program.shapes[i], options, k) for k, i in enumerate(leaves)}
    quota = _share([len(samples[i]) for i in leaves], max(0, options.max_evaluations) // 2)
    kinky = [name for name in program.names if name in OPS and OPS[name].kink is not None]
    kink_nodes = program.rows_of(*kinky).tolist()
    center_signs = {i: _kink_sign(program, result.values, i) for i in kink_nodes}
    checks: list[NodeCheck] = []
    evaluations = 0
    for leaf, take in zip(leaves, quota, strict=True):
        check = NodeCheck(program.node_id(leaf), elements=math.prod(program.shapes[leaf]))
        checks.append(check)
        grad = result.grad(leaf)
        assert grad is not None  # inputs and params always get a gradient
        for element in samples[leaf][:take]:
            evaluations += 2
            check_deadline(deadline)
            plus = _perturbed_forward(program, leaf, element, options.step, deadline)
            minus = _perturbed_forward(program, leaf, element, -options.step, deadline)
            if plus is None or minus is None:
                check.undefined += 1
                continue
            check.checked += 1
            out = program.output
            with np.errstate(all="ignore"):
                numerical = float(
                    (np.sum(seed * plus[out]) - np.sum(seed * minus[out])) / (2 * options.step)
                )
            analytic = float(grad[element])
            error = float(relative_error(analytic, numerical))
            crossing = _kink_crossing(program, plus, minus, center_signs)
            if crossing is not None:
                check.kink_crossings += 1
                if len(check.kinks) < MAX_KINKS_LISTED:
                    at, at_element = crossing
                    check.kinks.append(
                        KinkCrossing(
                            element,
                            program.node_id(at),
                            program.op(at),
                            at_element,
                            analytic,
                            numerical,
                            error,
                        )
                    )
            elif not error <= check.max_relative_error:  # NaN always replaces
                check.max_relative_error = error
                check.worst_element = element
    complete = all(take >= len(samples[i]) for i, take in zip(leaves, quota, strict=True))
    return GradcheckResult(options, checks, evaluations, complete)


def _sample(shape: Sequence[int], options: GradcheckOptions, k: int) -> list[tuple[int, ...]]:
    """Every element when there are at most max_elements_per_node, else a seeded sample."""
    size = math.prod(shape)
    cap = max(0, options.max_elements_per_node)
    if size <= cap:
        flat: Sequence[int] = range(size)
    else:
        rng = np.random.default_rng([options.seed, k])
        flat = sorted(int(j) for j in rng.choice(size, size=cap, replace=False))
    return [tuple(int(d) for d in np.unravel_index(j, tuple(shape))) for j in flat]


def _share(wanted: Sequence[int], budget: int) -> list[int]:
    """Hand out `budget` elements round-robin, one per leaf per round, up to what each wants."""
    if sum(wanted) <= budget:
        return list(wanted)
    given = [0] * len(wanted)
    while budget > 0:
        for k, want in enumerate(wanted):
            if budget > 0 and given[k] < want:
                given[k] += 1
                budget -= 1
    return given


def _perturbed_forward(
    program: Program,
    leaf: int,
    element: tuple[int, ...],
    step: float,
    deadline: float | None = None,
) -> Slots | None:
    """Every value with one element of one leaf moved by `step` (the program's own leaf
    values stay as they are: a copy of the one leaf column or array is moved)."""
    scalars, tensors = program.scalars, program.tensors
    if program.shapes[leaf]:
        moved = tensors[leaf].copy()
        moved[element] += step
        tensors = {**tensors, leaf: moved}
    else:
        scalars = scalars.copy()
        scalars[leaf] += step
    try:
        values, _ = forward(program, scalars=scalars, tensors=tensors, deadline=deadline)
    except LimitError:
        raise  # the time budget: the whole request stops
    except EngineError:
        return None
    return values


def _kink_sign(program: Program, values: Slots, node: int) -> Array:
    """The sign whose change marks a kink (x for relu/abs/leaky_relu, a - b for max/min)."""
    with np.errstate(all="ignore"):
        sign: Array = np.sign(_kink_operand(program, values, node))
    return sign


def _kink_operand(program: Program, values: Slots, node: int) -> Array:
    operands = program.inputs(node)
    if OPS[program.op(node)].kink == "a-b":
        return np.asarray(values[operands[0]] - values[operands[1]])
    return values[operands[0]]


def _kink_crossing(
    program: Program,
    plus: Slots,
    minus: Slots,
    center_signs: dict[int, Array],
) -> tuple[int, tuple[int, ...]] | None:
    """The first kink node (and its element) whose sign differs between the two runs, or
    that sits exactly on the kink at the centre and moved."""
    for node, center in center_signs.items():
        sign_plus = _kink_sign(program, plus, node)
        sign_minus = _kink_sign(program, minus, node)
        crossed = sign_plus != sign_minus
        if np.any(center == 0):
            with np.errstate(all="ignore"):
                moved = _kink_operand(program, plus, node) != _kink_operand(program, minus, node)
            crossed = crossed | ((center == 0) & moved)
        if np.any(crossed):
            flat = int(np.argmax(np.ravel(crossed)))
            where = np.unravel_index(flat, np.shape(crossed)) if np.ndim(crossed) else ()
            return node, tuple(int(d) for d in where)
    return None
