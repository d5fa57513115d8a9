"""The training what-if of POST /v1/network (docs/training.md): the wire's `train` becomes the
engine's `Training`, and the engine's `TrainingOutcome` becomes the answer's `training`.

With one learning rate the answer is the report of the final weights, with `training` the
run's record. With a list (a sweep) the answer is the report of the initial weights (the
single pass every run starts from), and `training` holds every run, each with the report of
its final weights in `final`, and a table of the final dead fractions per rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradiag.engine.histograms import BINS, Histogram
from gradiag.engine.network import Stage
from gradiag.engine.tensors import to_wire
from gradiag.engine.training import (
    Pass,
    Run,
    StepRecord,
    Training,
    TrainingOutcome,
    UnitEvent,
    watched_layers,
)
from gradiag.schemas.network import TrainSpec

ReportOf = Callable[[Pass], dict[str, Any]]


def engine_training(wire: TrainSpec, examples: int, *, histograms: bool) -> Training:
    """The engine's form: `lr` always a tuple, `batch_size` the whole batch when absent."""
    lrs = tuple(wire.lr) if isinstance(wire.lr, list) else (wire.lr,)
    return Training(
        lrs=lrs,
        momentum=wire.momentum,
        steps=wire.steps,
        batch_size=wire.batch_size or examples,
        seed=wire.seed,
        record_every=wire.record_every,
        histograms=histograms,
    )


def training_answer(
    outcome: TrainingOutcome, report_of: ReportOf, *, sweep: bool
) -> dict[str, Any]:
    """The whole answer: a report (`report_of` shapes a pass as /v1/network does) and its
    `training`."""
    if not sweep:
        run = outcome.runs[0]
        report = report_of(run.final)
        report["training"] = run_record(run)
        return report
    report = report_of(outcome.start)
    report["training"] = {
        "runs": [{**run_record(run), "final": report_of(run.final)} for run in outcome.runs],
        "table": sweep_table(outcome),
    }
    return report


def run_record(run: Run) -> dict[str, Any]:
    return {
        "lr": run.lr,
        "updates": run.updates,
        "stopped_at": run.stopped_at,
        "steps": [step_record(step) for step in run.steps],
        "died": [unit_event(event) for event in run.died],
        "revived": [unit_event(event) for event in run.revived],
    }


def step_record(step: StepRecord) -> dict[str, Any]:
    layers = []
    for layer in step.layers:
        entry: dict[str, Any] = {
            "index": layer.index,
            "dead_units": layer.dead_units,
            "saturated_units": layer.saturated_units,
            "update_ratio": None if layer.update_ratio is None else to_wire(layer.update_ratio),
        }
        if layer.histograms is not None:
            entry["histograms"] = histograms_report(layer.histograms)
        layers.append(entry)
    return {"step": step.step, "loss": to_wire(step.loss), "layers": layers}


def unit_event(event: UnitEvent) -> dict[str, int]:
    return {"layer": event.layer, "unit": event.unit, "step": event.step}


def histograms_report(histograms: Mapping[str, Histogram]) -> dict[str, Any]:
    return {
        quantity: {
            "range": [h.lo, h.hi],
            "counts": h.counts,
            "below": h.below,
            "above": h.above,
            "nonfinite": h.nonfinite,
        }
        for quantity, h in histograms.items()
    }


def sweep_table(outcome: TrainingOutcome) -> dict[str, Any]:
    """Per rate: the final status, loss and dead fraction of each relu or leaky_relu layer."""
    rows = []
    for run in outcome.runs:
        d = run.final.diagnostics
        by_index = {layer.stage.index: layer for layer in d.layers}
        fractions = [
            len(by_index[i].dead_unit_indices) / by_index[i].units for i in outcome.dying_layers
        ]
        rows.append(
            {"lr": run.lr, "status": d.status, "loss": to_wire(d.loss), "dead_fraction": fractions}
        )
    return {"layers": list(outcome.dying_layers), "rows": rows}


# --- the answer's size, before any compute -----------------------------------------------

NUMBER_BYTES = 25  # the longest float64 text and a comma
INT_BYTES = 21  # an index or a step: up to 20 digits and a comma
STEP_BYTES = 60  # {"step":,"loss":,"layers":[]}, without the numbers
LAYER_STEP_BYTES = 80  # {"index":,"dead_units":,"saturated_units":,"update_ratio":},
HISTOGRAM_BYTES = 80  # "z":{"range":[,],"counts":[],"below":,"above":,"nonfinite":},
EVENT_BYTES = 40 + 3 * INT_BYTES  # {"layer":,"unit":,"step":},
RUN_BYTES = 200  # a run's keys, lr, updates, stopped_at
TABLE_ROW_BYTES = 80


def training_answer_bytes(training: Training, stages: Sequence[Stage], report_bytes: int) -> int:
    """An upper bound on what `train` adds to the /v1/network answer, from the definition
    alone: every run's recorded steps (and histograms), every unit of a dying layer once in
    `died` or `revived`, and for a sweep every run's `final` report (`report_bytes`: the
    estimate of one report, the answer without `train`, its histograms included: see
    `report_histogram_bytes`) and the table. To be added to the answer's estimate before any
    compute."""
    layers = watched_layers(stages)
    recorded = math.ceil(training.steps / training.record_every) + 1  # and the last
    per_step = STEP_BYTES + NUMBER_BYTES
    for layer in layers:
        per_step += LAYER_STEP_BYTES + 2 * INT_BYTES + NUMBER_BYTES
        if training.histograms:
            per_step += 4 * _histogram_bytes(layer.stage, training.batch_size)
    dying_units = sum(layer.stage.out[1] for layer in layers if layer.dies)
    per_run = RUN_BYTES + recorded * per_step + dying_units * EVENT_BYTES
    runs = len(training.lrs)
    if runs == 1:  # the final weights' report takes the place of the usual one
        return per_run
    dying = sum(layer.dies for layer in layers)
    table = runs * (TABLE_ROW_BYTES + dying * NUMBER_BYTES)
    return runs * (per_run + report_bytes) + table


def _histogram_bytes(stage: Stage, batch: int) -> int:
    """One histogram of the layer: its frame, range and counts, each count at most as many
    digits as the largest tensor it counts has elements."""
    largest = max(batch * math.prod(stage.out[1:]), math.prod(stage.params.get("W", (0,))))
    count_bytes = len(str(largest)) + 1
    return HISTOGRAM_BYTES + 2 * NUMBER_BYTES + (BINS + 3) * count_bytes


def report_histogram_bytes(stages: Sequence[Stage], examples: int) -> int:
    """What `include: ["histograms"]` adds to one report: four histograms per layer."""
    return sum(4 * _histogram_bytes(stage, examples) for stage in stages)
