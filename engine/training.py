"""The training what-if (docs/training.md): K steps of SGD on the network's own batch, each a
forward, a backward and an update on the one executor, and what happened to the units.

The network is compiled once per minibatch size (`compile_network` on placeholders: the batch
size, and the last partial slice's when the batch does not divide and the run reaches it);
each step hands the executor that step's minibatch and the current weights as the program's
leaves (`run(program, leaves=...)`), reads the loss, the units and the gradients off the
result, and updates the weights. Nothing is compiled or checked again inside the loop.

Conventions (the same as PyTorch's recorded answers, tests/fixtures/oracle/README.md):

- Minibatches: order_rng = default_rng(seed); each epoch perm = order_rng.permutation(N), cut
  into consecutive slices of batch_size (a final partial slice is used as it is); steps run
  on across epochs.
- SGD as torch.optim.SGD: v = momentum * v + g (no dampening, not Nesterov; v = g on the first
  step), W -= lr * v. g is the gradient of the total loss, whose l2 term gives l2 * W for the
  weights (and the biases with `l2_biases`). Batchnorm's gamma and beta train; its running
  statistics are never updated.
- Step k's loss is the loss on step k's minibatch with the weights after k updates (step 0:
  the initial weights), before the k-th update; its dead and saturated units are read on that
  minibatch; its update ratio per layer is ||lr * v|| / ||W|| of the update it makes, W before.
- Start and end are the network's single pass on the whole batch with the initial and the
  final weights (the report of the final weights is that pass). `died` lists the units alive
  at the start and dead at the end, each with the step from which it read dead on every
  minibatch (the number of updates when it was alive on the last one); `revived` the units
  dead at the start and alive at the end, with the step from which they read alive.
- A non-finite loss stops the run at that step (recorded; no update is made from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from gradiag.engine.compiler import Program
from gradiag.engine.diagnostics import (
    DEAD_RELU_ADVICE,
    Finding,
    Thresholds,
    cap_findings,
    flagged,
    grade,
    norm_of_sum_of_squares,
    sum_of_squares,
    unit_axes,
    worst_status,
)
from gradiag.engine.errors import ShapeError, ValueDomainError, check_limits
from gradiag.engine.executor import Result, check_deadline, run
from gradiag.engine.histograms import Histogram, Ranges, layer_histograms, layer_ranges
from gradiag.engine.network import (
    ACTIVATION_OPS,
    NetworkDiagnostics,
    NetworkLimits,
    NetworkSpec,
    Stage,
    compile_network,
    leaf_values,
    network_diagnostics,
    with_leaves,
)
from gradiag.engine.ops import OPS, Array, Op

# Work per step, for the training budget: the backward pass computes two products for every
# one of the forward's (d input and d weights), so forward + backward is about three
# forwards; the update touches every parameter twice (v, then W).
PASSES_PER_STEP = 3
UPDATE_FLOPS_PER_PARAMETER = 2


@dataclass(frozen=True)
class Training:
    """What to train: one SGD run per learning rate in `lrs`, all from the same start."""

    lrs: tuple[float, ...]
    momentum: float = 0.0
    steps: int = 100
    batch_size: int = 32
    seed: int = 0
    record_every: int = 1
    histograms: bool = False


# --- the record --------------------------------------------------------------------------


@dataclass
class LayerStep:
    """One layer at one recorded step. `update_ratio` is None for a layer without W, when
    ||W|| is 0, and at a step that made no update (the run stopped there)."""

    index: int
    dead_units: int
    saturated_units: int
    update_ratio: float | None
    histograms: dict[str, Histogram] | None = None


@dataclass
class StepRecord:
    step: int
    loss: float
    layers: list[LayerStep]


@dataclass(frozen=True)
class UnitEvent:
    """Unit `unit` (0-based; a filter of a conv layer) of layer `layer` died (or revived)
    from step `step` on."""

    layer: int
    unit: int
    step: int


@dataclass
class Pass:
    """The network's single pass on the whole batch: its result, its health, and (asked
    for) its layers' histograms."""

    result: Result
    diagnostics: NetworkDiagnostics
    histograms: list[dict[str, Histogram]] | None = None


@dataclass
class Run:
    """One learning rate's run: the recorded steps, the units that died and revived, the
    final pass (its findings include `findings`, this run's training findings)."""

    lr: float
    steps: list[StepRecord]
    died: list[UnitEvent]
    revived: list[UnitEvent]
    updates: int
    stopped_at: int | None
    final: Pass
    findings: list[Finding] = field(default_factory=list)


@dataclass
class TrainingOutcome:
    training: Training
    start: Pass
    runs: list[Run]
    dying_layers: list[int]  # indices of the relu and leaky_relu layers (the table's columns)


# --- checks and the budget ---------------------------------------------------------------


def check_training(spec: NetworkSpec, training: Training) -> None:
    """What the wire's bounds cannot see: the minibatch fits the batch; the numbers are
    finite (the engine's own guard: the schema refuses them first)."""
    examples = spec.batch_size
    if training.batch_size > examples:
        raise ShapeError(
            f"train.batch_size is {training.batch_size}, larger than the batch ({examples} "
            "examples): minibatches are drawn from the request's batch",
            loc=("train", "batch_size"),
        )
    for k, lr in enumerate(training.lrs):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueDomainError(
                f"lr must be a finite number > 0, got {lr}", loc=("train", "lr", k)
            )
    if not (math.isfinite(training.momentum) and training.momentum >= 0):
        raise ValueDomainError(
            f"momentum must be a finite number >= 0, got {training.momentum}",
            loc=("train", "momentum"),
        )


def step_flops(program: Program, parameters: int) -> int:
    """Estimated FLOPs of one training step on `program` (a minibatch's)."""
    return PASSES_PER_STEP * program.flops + UPDATE_FLOPS_PER_PARAMETER * parameters


def training_flops(training: Training, program: Program, parameters: int) -> int:
    """Runs x steps x FLOPs per step: what `max_training_flops` bounds."""
    return len(training.lrs) * training.steps * step_flops(program, parameters)


def check_training_budget(
    training: Training, program: Program, parameters: int, limit: int
) -> None:
    total = training_flops(training, program, parameters)
    what = (
        f"{len(training.lrs)} run(s) x {training.steps} steps x "
        f"{step_flops(program, parameters)} estimated FLOPs per step come to"
    )
    check_limits([("max_training_flops", limit, total, what)], loc=("train", "steps"))


def minibatch_order(seed: int, examples: int, batch_size: int) -> Iterator[Array]:
    """Each step's example indices, endlessly (see the module's docstring)."""
    order_rng = np.random.default_rng(seed)
    while True:
        perm = order_rng.permutation(examples)
        for start in range(0, examples, batch_size):
            yield perm[start : start + batch_size]


def minibatch_sizes(examples: int, training: Training) -> list[int]:
    """The minibatch sizes the run reaches: batch_size, and the last partial slice's."""
    full, rest = divmod(examples, training.batch_size)
    return [training.batch_size] + ([rest] if rest and training.steps > full else [])


# --- the network's pieces as the loop reads them ----------------------------------------


@dataclass(frozen=True)
class Compiled:
    """A program and the rows of the nodes the loop reads and sets."""

    program: Program
    index: Mapping[str, int]

    @classmethod
    def of(cls, program: Program) -> Compiled:
        return cls(program, {node: i for i, node in enumerate(program.node_ids())})


@dataclass(frozen=True)
class Watched:
    """A layer the record follows: one with weights or a gated activation."""

    stage: Stage
    gate: Op | None  # relu, leaky_relu (dies, leaks), sigmoid, tanh (saturates)
    weighted: bool
    name: str  # the stage's (layer1, ...) and its W's node (layer1.W): made once, read
    weight: str  # on every step

    @property
    def dies(self) -> bool:
        return self.gate is not None and self.gate.gate in ("dies", "leaks")


def watched_layers(stages: Sequence[Stage]) -> list[Watched]:
    layers = []
    for stage in stages:
        activation = getattr(stage.layer, "activation", None)
        op = OPS[ACTIVATION_OPS[activation]] if activation else None
        gate = op if op is not None and op.gate is not None else None
        weighted = "W" in stage.params
        if gate is not None or weighted:
            layers.append(Watched(stage, gate, weighted, stage.name, f"{stage.name}.W"))
    return layers


def unit_mask(result: Result, index: Mapping[str, int], layer: Watched, eps: float) -> Array:
    """(units,) which units of the layer are flagged in this pass: dead (z <= 0 at every
    example and position: the unit's largest z is <= 0), or saturated (`flagged` at all of
    them). A NaN z reads as alive, as in the report."""
    assert layer.gate is not None
    z = result.value(index[f"{layer.name}.z"])
    axes = unit_axes(z.ndim, 0)  # a layer's output is (N, units) or (N, C, H, W)
    if layer.dies:
        return np.asarray(z.max(axis=axes) <= 0).reshape(-1)
    a = result.value(index[f"{layer.name}.a"])
    return flagged(layer.gate, z, a, eps).all(axis=axes).reshape(-1)


def dead_mask(diagnostics: NetworkDiagnostics, layer: Watched) -> Array:
    """(units,) the dead units of a dying layer in a whole-batch pass."""
    found = next(d for d in diagnostics.layers if d.name == layer.name)
    mask = np.zeros(found.units, bool)
    mask[found.dead_unit_indices] = True
    return mask


# --- the loop ----------------------------------------------------------------------------


@dataclass
class _Setup:
    """Everything the runs share: the data, the programs, the start, the layers."""

    spec: NetworkSpec
    training: Training
    thresholds: Thresholds
    leaves: dict[str, Array]
    params: list[str]  # the trained leaves: every param node (W, b, gamma, beta)
    full: Compiled
    minibatch: dict[int, Compiled]
    layers: list[Watched]
    ranges: dict[str, Ranges] | None  # the histograms' ranges per layer name
    deadline: float | None

    def whole_batch_pass(self, weights: Mapping[str, Array]) -> Pass:
        program = with_leaves(self.full.program, {**self.leaves, **weights})
        result = run(program, deadline=self.deadline)
        diagnostics = network_diagnostics(result, self.spec, self.thresholds)
        names = [f"layer{k}" for k in range(1, len(self.spec.layers) + 1)]
        return Pass(result, diagnostics, self.histograms(result, self.full.index, names))

    def histograms(
        self, result: Result, index: Mapping[str, int], names: Sequence[str]
    ) -> list[dict[str, Histogram]] | None:
        if self.ranges is None:
            return None
        return layer_histograms(result, index, names, [self.ranges[name] for name in names])


def train(
    spec: NetworkSpec,
    training: Training,
    stages: Sequence[Stage],
    limits: NetworkLimits,
    thresholds: Thresholds,
    *,
    gradients: bool,
    max_training_flops: int,
    deadline: float | None = None,
    check: Callable[[Program], None] | None = None,
) -> TrainingOutcome:
    """Every run of `training` on a checked network (`stages` from `check_network`). The
    programs are compiled and the training budget checked before a weight or an example is
    drawn. `gradients`: the whole-batch passes keep d loss / d X (the report's `nodes`).
    `check`: the caller's own look at the whole-batch program (the service's answer and
    memory budget), also before anything is drawn."""
    check_training(spec, training)
    full = Compiled.of(compile_network(spec, limits, gradients=gradients))
    minibatch = {
        size: full
        if size == spec.batch_size and not gradients
        else Compiled.of(compile_network(spec, limits, gradients=False, batch=size))
        for size in minibatch_sizes(spec.batch_size, training)
    }
    program = full.program
    params = program.node_ids(program.rows_of("param"))
    parameters = sum(math.prod(program.shapes[full.index[name]]) for name in params)
    budget_program = minibatch[training.batch_size].program
    check_training_budget(training, budget_program, parameters, max_training_flops)
    if check is not None:
        check(program)
    leaves = leaf_values(spec)
    setup = _Setup(
        spec, training, thresholds, leaves, params, full, minibatch, watched_layers(stages),
        None, deadline,
    )  # fmt: skip
    start = setup.whole_batch_pass({})
    if training.histograms:
        names = [stage.name for stage in stages]
        ranges = layer_ranges(start.result, full.index, names)
        setup.ranges = dict(zip(names, ranges, strict=True))
        start.histograms = setup.histograms(start.result, full.index, names)
    runs = [_sgd_run(setup, start, lr) for lr in training.lrs]
    dying = [layer.stage.index for layer in setup.layers if layer.dies]
    return TrainingOutcome(training, start, runs, dying)


class _UnitTracker:
    """Per dying layer, the last step each unit read alive and the last it read dead."""

    def __init__(self, layers: Sequence[Watched], start: NetworkDiagnostics) -> None:
        self.layers = [layer for layer in layers if layer.dies]
        self.start = [dead_mask(start, layer) for layer in self.layers]
        self.last_alive = [np.full(mask.size, -1) for mask in self.start]
        self.last_dead = [np.full(mask.size, -1) for mask in self.start]

    def see(self, step: int, dead: Sequence[Array]) -> None:
        for alive_at, dead_at, mask in zip(self.last_alive, self.last_dead, dead, strict=True):
            alive_at[~mask] = step
            dead_at[mask] = step

    def events(self, end: NetworkDiagnostics) -> tuple[list[UnitEvent], list[UnitEvent]]:
        """(died, revived), by layer and unit."""
        died: list[UnitEvent] = []
        revived: list[UnitEvent] = []
        for k, layer in enumerate(self.layers):
            before, after = self.start[k], dead_mask(end, layer)
            index = layer.stage.index
            for unit in np.flatnonzero(~before & after).tolist():
                died.append(UnitEvent(index, unit, int(self.last_alive[k][unit]) + 1))
            for unit in np.flatnonzero(before & ~after).tolist():
                revived.append(UnitEvent(index, unit, int(self.last_dead[k][unit]) + 1))
        return died, revived


def _sgd_run(setup: _Setup, start: Pass, lr: float) -> Run:
    """One learning rate, from the start's weights (copied: every run starts there)."""
    training, spec = setup.training, setup.spec
    x, y = setup.leaves["X"], setup.leaves.get("y")
    weights = {name: setup.leaves[name].copy() for name in setup.params}
    velocity = {name: np.zeros_like(w) for name, w in weights.items()}
    names = [layer.name for layer in setup.layers]
    gated = [layer for layer in setup.layers if layer.gate]
    weighted = [layer for layer in setup.layers if layer.weighted]
    eps = setup.thresholds.saturation_eps
    tracker = _UnitTracker(setup.layers, start.diagnostics)
    losses: list[float] = []
    ratios = np.full((training.steps, len(weighted)), np.nan)
    records: list[StepRecord] = []
    stopped = None
    order = minibatch_order(training.seed, spec.batch_size, training.batch_size)
    for step, idx in enumerate(islice(order, training.steps)):
        check_deadline(setup.deadline)
        compiled = setup.minibatch[idx.size]
        index = compiled.index
        leaves = {index["X"]: x[idx], **{index[name]: w for name, w in weights.items()}}
        if y is not None:
            leaves[index["y"]] = y[idx]
        result = run(compiled.program, leaves=leaves, deadline=setup.deadline)
        loss = float(result.value(index["loss"]))
        losses.append(loss)
        masks = {layer.name: unit_mask(result, index, layer, eps) for layer in gated}
        tracker.see(step, [masks[layer.name] for layer in tracker.layers])
        recorded = step % training.record_every == 0 or step == training.steps - 1
        histograms = setup.histograms(result, index, names) if recorded else None
        if not math.isfinite(loss):
            stopped = step
            records.append(_record(step, loss, setup.layers, masks, {}, histograms))
            break
        for name in setup.params:
            grad = result.grad(index[name])
            assert grad is not None  # a param always gets a gradient
            velocity[name] = _velocity(velocity[name], grad, training.momentum)
        step_ratios = {
            layer.name: update_ratio(lr, velocity[layer.weight], weights[layer.weight])
            for layer in weighted
        }
        ratios[step] = [math.nan if r is None else r for r in step_ratios.values()]
        for name, w in weights.items():
            w -= lr * velocity[name]
        if recorded:
            records.append(_record(step, loss, setup.layers, masks, step_ratios, histograms))
    updates = len(losses) - (stopped is not None)
    final = setup.whole_batch_pass(weights)
    died, revived = tracker.events(final.diagnostics)
    findings = _training_findings(
        setup, lr, losses, ratios[:updates], weighted, final, died, tracker
    )
    _merge_findings(final.diagnostics, findings)
    return Run(lr, records, died, revived, updates, stopped, final, findings)


def _velocity(v: Array, grad: Array, momentum: float) -> Array:
    """torch.optim.SGD's buffer: v = momentum * v + g; with no momentum, g itself (no 0 * v,
    which a non-finite v would turn into NaN)."""
    if not momentum:
        return grad
    v *= momentum
    v += grad
    return v


def update_ratio(lr: float, v: Array, w: Array) -> float | None:
    """||lr * v|| / ||W||, W before the update; None when ||W|| is 0. The norms are
    `diagnostics.norm`'s, from each array's sum of squares (one BLAS dot each)."""
    w_norm = norm_of_sum_of_squares(sum_of_squares(w), w)
    return lr * norm_of_sum_of_squares(sum_of_squares(v), v) / w_norm if w_norm else None


def _record(
    step: int,
    loss: float,
    layers: Sequence[Watched],
    masks: Mapping[str, Array],
    ratios: Mapping[str, float | None],
    histograms: Sequence[dict[str, Histogram]] | None,
) -> StepRecord:
    entries = []
    for k, layer in enumerate(layers):
        flagged_units = int(np.count_nonzero(masks[layer.name])) if layer.gate else 0
        entries.append(
            LayerStep(
                layer.stage.index,
                dead_units=flagged_units if layer.dies else 0,
                saturated_units=flagged_units if layer.gate and not layer.dies else 0,
                update_ratio=ratios.get(layer.name),
                histograms=None if histograms is None else histograms[k],
            )
        )
    return StepRecord(step, loss, entries)


# --- findings ----------------------------------------------------------------------------


def _training_findings(
    setup: _Setup,
    lr: float,
    losses: Sequence[float],
    ratios: Array,
    weighted: Sequence[Watched],
    final: Pass,
    died: Sequence[UnitEvent],
    tracker: _UnitTracker,
) -> list[Finding]:
    """`diverged`, then `dead_relu_onset` and `update_ratio` per layer, of one run."""
    t = setup.thresholds
    findings = []
    diverged = diverged_finding(lr, losses, final.diagnostics.loss, ratios, weighted, t)
    if diverged is not None:
        findings.append(diverged)
    for k, layer in enumerate(tracker.layers):
        assert layer.gate is not None
        if layer.gate.name == "relu":
            mine = [event for event in died if event.layer == layer.stage.index]
            finding = onset_finding(
                layer.name, lr, mine, int(np.count_nonzero(~tracker.start[k])), t
            )
            if finding is not None:
                findings.append(finding)
    for k, layer in enumerate(weighted):
        finding = ratio_finding(layer.name, lr, ratios[:, k], t)
        if finding is not None:
            findings.append(finding)
    return findings


def diverged_finding(
    lr: float,
    losses: Sequence[float],
    final_loss: float,
    ratios: Array,
    weighted: Sequence[Watched],
    t: Thresholds,
) -> Finding | None:
    """The first step whose loss is not finite or above `diverged_factor` x step 0's (only
    when step 0's is finite and positive), else the final whole-batch loss (at the step after
    the last update). Located at the layer whose update just before was the largest."""
    start = losses[0]
    limit = t.diverged_factor * start if math.isfinite(start) and start > 0 else math.inf
    with np.errstate(invalid="ignore"):
        curve = np.asarray(losses, np.float64)
        bad = np.flatnonzero(~np.isfinite(curve) | (curve > limit))
    if bad.size:
        step, loss, what = int(bad[0]), float(curve[bad[0]]), "the loss"
    elif not math.isfinite(final_loss) or final_loss > limit:
        step, loss, what = len(losses), final_loss, "the final loss on the whole batch"
    else:
        return None
    where, before = _largest_update(ratios, step - 1, weighted)
    stopped = next((k for k, loss in enumerate(losses) if not math.isfinite(loss)), None)
    shown = f"{loss:.4g}" if math.isfinite(loss) else str(loss)
    if not math.isfinite(loss):
        happened = f"{what} is {shown} at step {step} (lr {lr:g}); training stopped there"
    else:
        happened = (
            f"{what} reaches {shown} at step {step} (lr {lr:g}), above {t.diverged_factor:g}x "
            f"its start ({start:.4g})"
        )
    if stopped is not None and stopped != step:
        happened += f"; the loss is {losses[stopped]} at step {stopped}, where training stopped"
    return Finding(
        "diverged",
        "fail",
        where,
        f"training diverges: {happened}{before}; lower the learning rate or clip gradients.",
    )


def _largest_update(ratios: Array, step: int, weighted: Sequence[Watched]) -> tuple[str, str]:
    """The layer with the largest update ratio at `step` and words for it; the first
    weighted layer (no words) when that step made no finite update."""
    if not weighted:
        return "loss", ""
    row = ratios[step] if 0 <= step < len(ratios) else np.full(len(weighted), np.nan)
    if not np.isfinite(row).any():
        return weighted[0].name, ""
    k = int(np.argmax(np.where(np.isfinite(row), row, -np.inf)))
    name = weighted[k].name
    return name, f"; the largest update just before was {name}'s (update ratio {row[k]:.2g})"


def onset_finding(
    name: str, lr: float, died: Sequence[UnitEvent], alive: int, t: Thresholds
) -> Finding | None:
    """Units that died during the run, graded on the fraction of those alive at the start."""
    if not died or not alive:
        return None
    fraction = len(died) / alive
    severity = grade(fraction, t.dead_warn, t.dead_fail)
    if severity == "ok":
        return None
    steps = sorted(event.step for event in died)
    message = (
        f"{len(died)} of the {alive} relu units of {name} alive at the start ({fraction:.0%}) "
        f"died during training at lr {lr:g}, the first from step {steps[0]}, half of them by "
        f"step {steps[(len(steps) - 1) // 2]}: {DEAD_RELU_ADVICE}."
    )
    return Finding("dead_relu_onset", severity, name, message)


def ratio_finding(name: str, lr: float, ratios: Array, t: Thresholds) -> Finding | None:
    """A layer's median update ratio outside [update_ratio_low, update_ratio_high]."""
    finite = np.isfinite(ratios)
    if not finite.any():
        return None
    median = float(np.median(ratios[finite]))
    if median > t.update_ratio_high:
        step = int(np.argmax(np.where(finite, ratios, -np.inf)))
        bound, side, extreme = t.update_ratio_high, "above", "largest"
        advice = "the steps are too large for this layer's weights; lower the learning rate"
    elif median < t.update_ratio_low:
        step = int(np.argmin(np.where(finite, ratios, np.inf)))
        bound, side, extreme = t.update_ratio_low, "below", "smallest"
        advice = (
            "no gradient reaches these weights on most steps (dead units?): a larger learning "
            "rate will not help"
            if median == 0
            else "the weights barely move; raise the learning rate"
        )
    else:
        return None
    message = (
        f"the median update ratio ||lr * update|| / ||W|| of {name} at lr {lr:g} is "
        f"{median:.2g} over {int(finite.sum())} updates, {side} {bound:g} (about 1e-3 is "
        f"healthy); the {extreme}, {ratios[step]:.2g}, at step {step}: {advice}."
    )
    return Finding("update_ratio", "warn", name, message)


def _merge_findings(diagnostics: NetworkDiagnostics, findings: Sequence[Finding]) -> None:
    """The final pass's findings and the run's, capped; each layer's status again."""
    diagnostics.findings = cap_findings([*diagnostics.findings, *findings])
    for layer in diagnostics.layers:
        layer.status = worst_status(f for f in diagnostics.findings if f.location == layer.name)
