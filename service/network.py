"""The network front end of POST /v1/network: the validated wire request becomes an
`engine.network.NetworkSpec`, which is checked, limited, lowered and run like any graph;
the report is shaped from that one run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import current_app, g

from gradiag.engine import EngineError, LimitError, Program, Result, compile_graph, run
from gradiag.engine.network import (
    Batch,
    Init,
    Layer,
    LayerDiagnostics,
    NetworkDiagnostics,
    NetworkLimits,
    NetworkSpec,
    RandomBatch,
    Weights,
    check_network,
    check_network_limits,
    lower,
    network_diagnostics,
    unread_gradients,
)
from gradiag.engine.tensors import to_array, to_wire
from gradiag.schemas.network import NetworkRequest
from gradiag.service.body import parse_body
from gradiag.service.budget import AnswerPlan, budget_check
from gradiag.service.config import Settings
from gradiag.service.deadline import check_request_deadline, request_deadline
from gradiag.service.errors import ProblemError, engine_problem
from gradiag.service.frontend import engine_limits, engine_thresholds
from gradiag.service.metrics import ReportSummary
from gradiag.service.report import health, node_reports


def network_spec(request: NetworkRequest) -> NetworkSpec:
    """Wire tensors become arrays here (a ragged list is a 422 at its field)."""
    weights = None
    if request.weights is not None:
        weights = tuple(
            Weights(to_array(w.W, ("weights", k, "W")), to_array(w.b, ("weights", k, "b")))
            for k, w in enumerate(request.weights)
        )
    batch: Batch | RandomBatch
    wire = request.batch
    if wire.random is not None:
        batch = RandomBatch(wire.random.size, wire.random.seed)
    else:
        assert wire.x is not None  # BatchSpec: x or random
        y = None if wire.y is None else to_array(wire.y, ("batch", "y"))
        batch = Batch(to_array(wire.x, ("batch", "x")), y)
    return NetworkSpec(
        input_dim=request.input_dim,
        layers=tuple(Layer(s.units, s.activation, s.alpha) for s in request.layers),
        loss=request.loss,
        weights=weights,
        init=None if request.init is None else Init(request.init.scheme, request.init.seed),
        batch=batch,
        l2=request.l2,
        dtype=request.dtype,
    )


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


def diagnose_network(
    request: NetworkRequest,
    limits: NetworkLimits,
    deadline: float | None = None,
    budget: Callable[[Program], None] | None = None,
) -> DiagnosedNetwork:
    """Check, check the limits (nothing drawn yet), lower, run once, read the health."""
    spec = network_spec(request)
    check_network(spec)
    check_network_limits(spec, limits)
    nodes, output = lower(spec)
    # X's gradient is a matmul as big as layer 1's: computed only when the report returns it
    no_grad = unread_gradients(gradients="gradients" in request.include)
    program = compile_graph(
        nodes, output, limits=limits.graph, dtype=np.dtype(spec.dtype), no_grad=no_grad
    )
    if budget is not None:  # the answer and memory, from the shapes (service/budget.py)
        budget(program)
    result = run(program, deadline=deadline)
    diagnostics = network_diagnostics(result, spec, engine_thresholds(request.thresholds))
    return DiagnosedNetwork(spec, result, diagnostics)


def network_report_of_request(*, picture: bool = False) -> dict[str, Any]:
    """The /v1/network report of this request's body (for the JSON and SVG views alike; a
    picture draws the layers, never `nodes`)."""
    request = parse_body(NetworkRequest)
    settings = current_app.config["GRADIAG"]
    gradients = "gradients" in request.include and not picture
    plan = AnswerPlan(request.tensors, nodes=gradients, body_bytes=g.body_bytes)
    budget = budget_check(plan, field="include")
    try:
        done = diagnose_network(request, network_limits(settings), request_deadline(), budget)
    except EngineError as err:
        raise network_problem(err) from None
    check_request_deadline()
    g.report_summary = report_summary(done)
    return network_report(done, gradients=gradients, tensors=request.tensors)


def network_problem(err: EngineError) -> ProblemError:
    problem = engine_problem(err)
    if not isinstance(err, LimitError):
        problem.title = "Invalid network"
    return problem


def network_report(
    done: DiagnosedNetwork, *, gradients: bool, tensors: str = "full"
) -> dict[str, Any]:
    d = done.diagnostics
    report: dict[str, Any] = {
        "name": d.name,
        "loss": to_wire(d.loss),
        "data_loss": to_wire(d.data_loss),
        "l2_loss": to_wire(d.l2_loss),
        "input_dim": done.spec.input_dim,
        "batch_size": done.spec.batch_size,
        "dtype": done.spec.dtype,
        "parameters": {
            "neurons": d.parameters.neurons,
            "weights": d.parameters.weights,
            "biases": d.parameters.biases,
            "total": d.parameters.total,
        },
        "layers": [layer_report(layer) for layer in d.layers],
        "gradient_ratio": None if d.gradient_ratio is None else to_wire(d.gradient_ratio),
        "signal_ratio": None if d.signal_ratio is None else to_wire(d.signal_ratio),
        "health": health(d.findings, d.status),
    }
    if gradients:
        report["nodes"] = node_reports(done.result, tensors)
    return report


def layer_report(layer: LayerDiagnostics) -> dict[str, Any]:
    ratio = layer.update_ratio
    return {
        "index": layer.index,
        "units": layer.units,
        "activation": layer.activation,
        "fan_in": layer.fan_in,
        "parameters": {"weights": layer.weights, "biases": layer.biases},
        "dead_units": layer.dead_units,
        "dead_unit_indices": layer.dead_unit_indices,
        "dead_fraction": layer.dead_fraction,
        "dead_activation_fraction": layer.dead_activation_fraction,
        "saturated_units": layer.saturated_units,
        "saturated_unit_indices": layer.saturated_unit_indices,
        "saturated_fraction": layer.saturated_fraction,
        "saturated_activation_fraction": layer.saturated_activation_fraction,
        "activation_mean": to_wire(layer.activation_mean),
        "activation_std": to_wire(layer.activation_std),
        "weight_norm": to_wire(layer.weight_norm),
        "grad_norm": {
            "W": to_wire(layer.grad_norm_W),
            "b": to_wire(layer.grad_norm_b),
            "z": to_wire(layer.grad_norm_z),
        },
        "update_ratio": None if ratio is None else to_wire(ratio),
        "status": layer.status,
    }


def report_summary(done: DiagnosedNetwork) -> ReportSummary:
    """For the metrics hook: dead and saturated fractions over the units that can be so."""
    layers = done.diagnostics.layers
    relu = [(layer.dead_units, layer.units) for layer in layers if layer.activation == "relu"]
    gates = [
        (layer.saturated_units, layer.units)
        for layer in layers
        if layer.activation in ("sigmoid", "tanh")
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
