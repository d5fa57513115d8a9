"""The network front end of POST /v1/network: the validated wire request becomes an
`engine.network.NetworkSpec`, which is checked, limited, lowered and run like any graph;
the report is shaped from that one run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flask import current_app, g

from gradiag.engine import EngineError, LimitError, Program, Result, run
from gradiag.engine.histograms import Histogram, layer_histograms, layer_ranges
from gradiag.engine.network import (
    Batch,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    Init,
    Layer,
    LayerDiagnostics,
    NetworkDiagnostics,
    NetworkLimits,
    NetworkSpec,
    Pool,
    RandomBatch,
    check_network,
    compile_network,
    leaf_values,
    network_diagnostics,
    with_leaves,
)
from gradiag.engine.tensors import to_array, to_wire
from gradiag.engine.training import Pass, train
from gradiag.schemas.network import (
    BatchNormLayer,
    Conv2dLayer,
    DenseLayer,
    FlattenLayer,
    NetworkRequest,
    PoolLayer,
)
from gradiag.service.body import parse_body
from gradiag.service.budget import AnswerPlan, Budget, budget_check
from gradiag.service.config import Settings
from gradiag.service.deadline import check_request_deadline, request_deadline
from gradiag.service.errors import ProblemError, engine_problem
from gradiag.service.frontend import engine_limits, engine_thresholds
from gradiag.service.metrics import ReportSummary
from gradiag.service.report import health, node_reports
from gradiag.service.training import (
    engine_training,
    histograms_report,
    report_histogram_bytes,
    training_answer,
    training_answer_bytes,
)


def network_spec(request: NetworkRequest) -> NetworkSpec:
    """Wire tensors become arrays here (a ragged list is a 422 at its field)."""
    weights = None
    if request.weights is not None:
        weights = tuple(
            {
                name: to_array(value, ("weights", k, name))
                for name, value in entry.model_dump(exclude_none=True).items()
            }
            for k, entry in enumerate(request.weights)
        )
    batch: Batch | RandomBatch
    wire = request.batch
    if wire.random is not None:
        batch = RandomBatch(wire.random.size, wire.random.seed)
    else:
        assert wire.x is not None  # BatchSpec: x or random
        y = None if wire.y is None else to_array(wire.y, ("batch", "y"))
        batch = Batch(to_array(wire.x, ("batch", "x")), y)
    shape = (request.input_dim,) if request.input_dim is not None else request.input_shape
    assert shape is not None  # NetworkRequest: input_dim or input_shape
    return NetworkSpec(
        input_shape=tuple(shape),
        layers=tuple(map(engine_layer, request.layers)),
        loss=request.loss,
        weights=weights,
        init=None if request.init is None else Init(request.init.scheme, request.init.seed),
        batch=batch,
        l2=request.l2,
        l2_biases=request.l2_biases,
        dtype=request.dtype,
    )


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def engine_layer(wire: Any) -> Layer:
    """A wire layer as the engine's (a kernel, stride or padding given as one int is square)."""
    if isinstance(wire, DenseLayer):
        return Dense(wire.units, wire.activation, wire.alpha)
    if isinstance(wire, Conv2dLayer):
        pairs = (_pair(wire.kernel), _pair(wire.stride), _pair(wire.padding))
        return Conv2d(wire.filters, *pairs, activation=wire.activation, alpha=wire.alpha)
    if isinstance(wire, PoolLayer):
        stride = None if wire.stride is None else _pair(wire.stride)
        return Pool(wire.type, _pair(wire.kernel), stride, _pair(wire.padding))
    if isinstance(wire, BatchNormLayer):
        return BatchNorm(wire.mode, wire.activation, wire.alpha, wire.eps)
    assert isinstance(wire, FlattenLayer)
    return Flatten()


def network_limits(settings: Settings) -> NetworkLimits:
    return NetworkLimits(
        max_layers=settings.max_layers,
        max_units=settings.max_units,
        max_batch=settings.max_batch,
        graph=engine_limits(settings),
    )


@dataclass
class DiagnosedNetwork:
    spec: NetworkSpec
    result: Result
    diagnostics: NetworkDiagnostics
    histograms: Sequence[Mapping[str, Histogram]] | None = None  # per layer, when asked


def diagnose_network(
    request: NetworkRequest,
    limits: NetworkLimits,
    deadline: float | None = None,
    budget: Budget | None = None,
) -> DiagnosedNetwork:
    """Check, compile (the limits: nothing drawn yet), draw the leaves, run once, read the
    health (and, asked for, the histograms, over this pass's own ranges)."""
    spec = network_spec(request)
    stages = check_network(spec)
    program = compile_network(spec, limits, gradients="gradients" in request.include)
    histograms = "histograms" in request.include
    if budget is not None:  # the answer and memory, from the shapes (service/budget.py)
        added = report_histogram_bytes(stages, spec.batch_size) if histograms else 0
        budget(program, lambda _: added)
    result = run(with_leaves(program, leaf_values(spec)), deadline=deadline)
    diagnostics = network_diagnostics(result, spec, engine_thresholds(request.thresholds))
    layers = None
    if histograms:
        index = {node: i for i, node in enumerate(program.node_ids())}
        names = [stage.name for stage in stages]
        layers = layer_histograms(result, index, names, layer_ranges(result, index, names))
    return DiagnosedNetwork(spec, result, diagnostics, layers)


def network_report_of_request(*, picture: bool = False) -> dict[str, Any]:
    """The /v1/network report of this request's body (for the JSON and SVG views alike; a
    picture draws the layers, never `nodes`)."""
    request = parse_body(NetworkRequest)
    settings = current_app.config["GRADIAG"]
    gradients = "gradients" in request.include and not picture
    plan = AnswerPlan(
        request.tensors, nodes=gradients, explain=request.explain, body_bytes=g.body_bytes
    )
    budget = budget_check(plan, field="include")
    try:
        if request.train is not None:
            return trained_report(request, settings, budget, gradients=gradients)
        done = diagnose_network(request, network_limits(settings), request_deadline(), budget)
    except EngineError as err:
        raise network_problem(err) from None
    check_request_deadline()
    g.report_summary = report_summary(done)
    return network_report(
        done, gradients=gradients, explain=request.explain, tensors=request.tensors
    )


def trained_report(
    request: NetworkRequest, settings: Settings, budget: Budget, *, gradients: bool
) -> dict[str, Any]:
    """`train`: every run (engine.training), then the answer (service.training). The whole
    answer (every run's records, a sweep's reports) is estimated before the first step."""
    assert request.train is not None
    spec = network_spec(request)
    stages = check_network(spec)
    histograms = "histograms" in request.include
    training = engine_training(request.train, spec.batch_size, histograms=histograms)
    per_report = report_histogram_bytes(stages, spec.batch_size) if histograms else 0

    def check_answer(program: Program) -> None:
        budget(program, lambda report: training_answer_bytes(training, stages, report + per_report))

    outcome = train(
        spec,
        training,
        stages,
        network_limits(settings),
        engine_thresholds(request.thresholds),
        gradients=gradients,
        max_training_flops=settings.max_training_flops,
        deadline=request_deadline(),
        check=check_answer,
    )

    def report_of(done: Pass) -> dict[str, Any]:
        diagnosed = DiagnosedNetwork(spec, done.result, done.diagnostics, done.histograms)
        return network_report(
            diagnosed, gradients=gradients, explain=request.explain, tensors=request.tensors
        )

    sweep = isinstance(request.train.lr, list)
    headline = outcome.start if sweep else outcome.runs[0].final
    g.report_summary = report_summary(DiagnosedNetwork(spec, headline.result, headline.diagnostics))
    return training_answer(outcome, report_of, sweep=sweep)


def network_problem(err: EngineError) -> ProblemError:
    problem = engine_problem(err)
    if not isinstance(err, LimitError):
        problem.title = "Invalid network"
    return problem


def network_report(
    done: DiagnosedNetwork, *, gradients: bool, explain: bool = False, tensors: str = "full"
) -> dict[str, Any]:
    d, spec = done.diagnostics, done.spec
    report: dict[str, Any] = {
        "name": d.name,
        "loss": to_wire(d.loss),
        "data_loss": to_wire(d.data_loss),
        "l2_loss": to_wire(d.l2_loss),
        "input_dim": spec.input_shape[0] if len(spec.input_shape) == 1 else None,
        "input_shape": list(spec.input_shape),
        "batch_size": spec.batch_size,
        "dtype": spec.dtype,
        "parameters": {
            "neurons": d.parameters.neurons,
            "weights": d.parameters.weights,
            "biases": d.parameters.biases,
            **({"batchnorm": d.parameters.batchnorm} if d.parameters.batchnorm else {}),
            "total": d.parameters.total,
        },
        "layers": [layer_report(layer) for layer in d.layers],
        "gradient_ratio": None if d.gradient_ratio is None else to_wire(d.gradient_ratio),
        "signal_ratio": None if d.signal_ratio is None else to_wire(d.signal_ratio),
        "health": health(d.findings, d.status),
    }
    if done.histograms is not None:
        for entry, histograms in zip(report["layers"], done.histograms, strict=True):
            entry["histograms"] = histograms_report(histograms)
    if gradients:
        report["nodes"] = node_reports(done.result, explain=explain, tensors=tensors)
    return report


def layer_report(layer: LayerDiagnostics) -> dict[str, Any]:
    """A layer's entry: what it is, its parameters, its units' health, its norms."""
    stage, reading = layer.stage, layer.reading
    params = {name: math.prod(shape) for name, shape in stage.params.items()}
    units = layer.units
    dead, saturated = layer.dead_unit_indices, layer.saturated_unit_indices
    gate = reading.fraction if reading is not None else 0.0
    dying = reading is not None and reading.op in ("relu", "leaky_relu")
    report: dict[str, Any] = {
        "index": stage.index,
        "type": stage.layer.type,
        "shape": list(stage.out[1:]),
        "units": units,
        "activation": getattr(stage.layer, "activation", None),
        "parameters": {
            "weights": params.get("W", 0),
            "biases": params.get("b", 0),
            **({"batchnorm": params["gamma"] + params["beta"]} if "gamma" in params else {}),
        },
        "dead_units": len(dead),
        "dead_unit_indices": dead,
        "dead_fraction": len(dead) / units,
        "dead_activation_fraction": gate if dying else 0.0,
        "saturated_units": len(saturated),
        "saturated_unit_indices": saturated,
        "saturated_fraction": len(saturated) / units,
        "saturated_activation_fraction": gate if saturated or (not dying and reading) else 0.0,
        "activation_mean": to_wire(layer.activation_mean),
        "activation_std": to_wire(layer.activation_std),
        "weight_norm": None if layer.weight_norm is None else to_wire(layer.weight_norm),
        "grad_norm": {part: to_wire(value) for part, value in layer.grad_norms.items()},
        "update_ratio": None if layer.update_ratio is None else to_wire(layer.update_ratio),
        "status": layer.status,
    }
    if "W" in stage.params:
        report["fan_in"] = stage.layer.fan_in(stage.x)
    if isinstance(stage.layer, Conv2d):
        report["filters"] = stage.layer.filters
    if layer.channel_active_fraction is not None:
        report["channel_active_fraction"] = layer.channel_active_fraction
    return report


def report_summary(done: DiagnosedNetwork) -> ReportSummary:
    """For the metrics hook: dead and saturated fractions over the units that can be so."""
    layers = done.diagnostics.layers
    readings = [(layer.reading, layer) for layer in layers if layer.reading is not None]
    relu = [(len(layer.dead_unit_indices), layer.units) for r, layer in readings if r.op == "relu"]
    gates = [
        (len(layer.saturated_unit_indices), layer.units)
        for r, layer in readings
        if r.op in ("sigmoid", "tanh")
    ]
    return ReportSummary(
        kind="network",
        nodes=len(done.result.program),
        dead_fraction=_fraction(relu),
        saturated_fraction=_fraction(gates),
        status=done.diagnostics.status,
        finding_codes=[f.code for f in done.diagnostics.findings],
    )


def _fraction(counts: list[tuple[int, int]]) -> float | None:
    """Flagged units over all units of the layers given; None when there are none."""
    units = sum(total for _, total in counts)
    return sum(flagged for flagged, _ in counts) / units if units else None
