"""POST /v1/onnx: a real model, exported to ONNX (docs/onnx.md).

The view reads the multipart parts (`model`, `request`, optional `batch`), validates the
request part, hands the model's bytes and the batch to the ONNX front end
(onnx_import.frontend: parse, check, lower, compile, run, read the health) and shapes the
report in /v1/network's form. Status codes: 415 not multipart, 413 over the body limit, 400
a body that does not split into parts, a `request` that is not JSON, or a `model` that is not
an ONNX file at all (it does not decode as one: as malformed JSON is 400); 422 for the rest
(a part missing, an invalid request, a model the front end cannot take, a batch that does
not fit, a limit).
"""

from __future__ import annotations

from typing import Any

from flask import current_app, g
from pydantic import ValidationError

from gradiag.engine import EngineError, LimitError
from gradiag.engine.network import Batch, RandomBatch
from gradiag.engine.tensors import to_array, to_wire
from gradiag.onnx_import.batch import read_npz
from gradiag.onnx_import.diagnostics import LayerHealth
from gradiag.onnx_import.frontend import DiagnosedModel, OnnxOptions, batch_of, diagnose_model
from gradiag.onnx_import.lower import UnsupportedOpsError
from gradiag.onnx_import.model import NotOnnxError
from gradiag.schemas.onnx import OnnxRequest
from gradiag.service.body import check_syntax
from gradiag.service.budget import AnswerPlan, budget_check
from gradiag.service.config import Settings
from gradiag.service.deadline import check_request_deadline, request_deadline
from gradiag.service.errors import ProblemError, engine_problem, validation_problem
from gradiag.service.frontend import engine_limits, engine_thresholds
from gradiag.service.metrics import ReportSummary
from gradiag.service.multipart import read_parts
from gradiag.service.report import health, node_reports

PARTS = ("model", "request", "batch")
TITLES = {"model": "Invalid model", "batch": "Invalid batch", "request": "Invalid request body"}
NOT_ONNX = "urn:gradiag:problem:not-onnx"  # a 400 of its own: not malformed JSON
GRAD_ROLES = ("W", "b", "gamma", "beta", "running_mean", "running_var", "z")


def onnx_report_of_request() -> dict[str, Any]:
    parts = read_parts(PARTS, required=("model", "request"))
    request = parse_request(parts["request"])
    settings: Settings = current_app.config["GRADIAG"]
    gradients = "gradients" in request.include
    plan = AnswerPlan(
        request.tensors, nodes=gradients, explain=request.explain, body_bytes=g.body_bytes
    )
    try:
        batch = request_batch(request, parts.get("batch"), settings)
        done = diagnose_model(
            parts["model"],
            batch,
            onnx_options(request, settings),
            deadline=request_deadline(),
            check=budget_check(plan, field="include"),
        )
    except EngineError as err:
        raise onnx_problem(err) from None
    check_request_deadline()
    g.report_summary = report_summary(done)
    return onnx_report(
        done, request.dtype, gradients=gradients, explain=request.explain, tensors=request.tensors
    )


def parse_request(part: bytes) -> OnnxRequest:
    """The `request` part, checked as any JSON body (service.body) and validated once; its
    errors located under `request`."""
    try:
        check_syntax(part)
        return OnnxRequest.model_validate_json(part)
    except ValidationError as err:
        problem = validation_problem(err, part)
    except ProblemError as err:
        problem = err
    problem.detail = f"request: {problem.detail}"
    for item in problem.fields.get("errors") or ():
        item["loc"] = ["request", *item["loc"]]
    raise problem


def onnx_options(request: OnnxRequest, settings: Settings) -> OnnxOptions:
    return OnnxOptions(
        loss=request.loss,
        input=request.input,
        output=request.output,
        dtype=request.dtype,
        gradients="gradients" in request.include,
        thresholds=engine_thresholds(request.thresholds),
        limits=engine_limits(settings),
        max_batch=settings.max_batch,
    )


def request_batch(
    request: OnnxRequest, npz: bytes | None, settings: Settings
) -> Batch | RandomBatch | None:
    """The `batch` part (.npz), or `request.batch`, or None (a random batch)."""
    wire = request.batch
    if npz is not None:
        if wire is not None:
            raise ProblemError(
                422,
                "Invalid request body",
                "the batch is given twice: as the part `batch` and as `request.batch`",
                errors=[{"loc": ["request", "batch"], "msg": "give the batch in one place"}],
            )
        return batch_of(read_npz(npz, max_tensor_elements=settings.max_tensor_elements))
    if wire is None:
        return None
    if wire.random is not None:
        return RandomBatch(wire.random.size, wire.random.seed)
    y = None if wire.y is None else to_array(wire.y, ("request", "batch", "y"))
    return Batch(to_array(wire.x, ("request", "batch", "x")), y)


def onnx_problem(err: EngineError) -> ProblemError:
    if isinstance(err, NotOnnxError):
        return ProblemError(400, "Not an ONNX model", err.message, type=NOT_ONNX,
                            errors=[{"loc": list(err.loc), "msg": err.message}])  # fmt: skip
    if isinstance(err, UnsupportedOpsError):
        return unsupported_problem(err)
    problem = engine_problem(err)
    if not isinstance(err, LimitError):
        problem.title = TITLES.get(str(err.loc[0]) if err.loc else "", "Invalid model")
    return problem


def unsupported_problem(err: UnsupportedOpsError) -> ProblemError:
    """One error per unsupported op type, at its first node, naming every node using it."""
    errors = []
    for op_type, nodes in err.nodes.items():
        names = [node.name for node in nodes]
        errors.append(
            {
                "loc": list(nodes[0].loc),
                "msg": f"op type {op_type} is not supported; used by "
                f"{', '.join(repr(name) for name in names)}",
                "node": names[0],
                "op_type": op_type,
                "nodes": names,
            }
        )
    return ProblemError(
        422, "Unsupported ONNX ops", err.message, errors=errors, unsupported=err.unsupported
    )


# --- the report ----------------------------------------------------------------------------


def onnx_report(
    done: DiagnosedModel,
    dtype: str,
    *,
    gradients: bool,
    explain: bool = False,
    tensors: str = "full",
) -> dict[str, Any]:
    h, model, lowered = done.health, done.model, done.lowered
    p = h.parameters
    x_shape = lowered.shapes[lowered.source.name]
    report: dict[str, Any] = {
        "name": h.name,
        "loss": to_wire(h.loss),
        "data_loss": to_wire(h.loss),
        "l2_loss": 0.0,
        "input_dim": None,
        "input_shape": list(x_shape[1:]),
        "batch_size": done.batch_size,
        "dtype": dtype,
        "model": {
            "producer": model.producer,
            "opset": model.opset,
            "ir_version": model.ir_version,
            "graph": model.graph_name,
            "input": lowered.source.name,
            "output": lowered.scores,
            "nodes": len(model.nodes),
        },
        "parameters": {
            "neurons": p.neurons,
            "weights": p.weights,
            "biases": p.biases,
            "batchnorm": p.batchnorm,
            "running_stats": p.running_stats,
            "other": p.other,
            "tensors": p.tensors,
            "total": p.total,
        },
        "layers": [layer_report(layer) for layer in h.layers],
        "gradient_ratio": None if h.gradient_ratio is None else to_wire(h.gradient_ratio),
        "signal_ratio": None if h.signal_ratio is None else to_wire(h.signal_ratio),
        "health": health(h.findings, h.status),
    }
    if gradients:
        report["nodes"] = node_reports(done.result, explain=explain, tensors=tensors)
    return report


def layer_report(layer: LayerHealth) -> dict[str, Any]:
    """A node's entry: the fields of a /v1/network layer, plus its ONNX name, op type and
    initializers by role."""
    nodes, reading, units = layer.layer, layer.reading, max(layer.units, 1)
    dead, saturated = layer.flagged_units("dies", "leaks"), layer.flagged_units("saturates")
    gate = reading.fraction if reading is not None else 0.0
    dying = reading is not None and reading.op in ("relu", "leaky_relu")
    sizes = layer.parameters
    report: dict[str, Any] = {
        "index": nodes.index,
        "name": nodes.node.name,
        "op_type": nodes.node.op_type,
        "type": nodes.node.op_type,
        "shape": list(layer.shape[1:]),
        "units": units,
        "activation": nodes.activation,
        "initializers": dict(nodes.params),
        "parameters": {
            "weights": sizes.get("W", 0),
            "biases": sizes.get("b", 0),
            "batchnorm": sizes.get("gamma", 0) + sizes.get("beta", 0),
            "running_stats": sizes.get("running_mean", 0) + sizes.get("running_var", 0),
            "other": sum(n for role, n in sizes.items() if role not in GRAD_ROLES),
        },
        "dead_units": len(dead),
        "dead_unit_indices": dead,
        "dead_fraction": len(dead) / units,
        "dead_activation_fraction": gate if dying else 0.0,
        "saturated_units": len(saturated),
        "saturated_unit_indices": saturated,
        "saturated_fraction": len(saturated) / units,
        "saturated_activation_fraction": gate if reading is not None and not dying else 0.0,
        "activation_mean": to_wire(layer.activation_mean),
        "activation_std": to_wire(layer.activation_std),
        "weight_norm": None if layer.weight_norm is None else to_wire(layer.weight_norm),
        "grad_norm": {
            role: to_wire(value) for role, value in layer.grad_norms.items() if role in GRAD_ROLES
        },
        "update_ratio": None if layer.update_ratio is None else to_wire(layer.update_ratio),
        "status": layer.status,
    }
    if "W" in sizes:
        report["fan_in"] = sizes["W"] // units
    if nodes.node.op_type == "Conv":
        report["filters"] = units
    if layer.channel_active_fraction is not None:
        report["channel_active_fraction"] = layer.channel_active_fraction
    return report


def report_summary(done: DiagnosedModel) -> ReportSummary:
    """For the metrics hook: dead and saturated fractions over the activation nodes' units."""
    counts: dict[str, list[int]] = {"dies": [0, 0], "saturates": [0, 0]}
    for layer in done.health.layers:
        if layer.reading is not None and layer.reading.units:
            gate = "dies" if layer.reading.op == "relu" else "saturates"
            if layer.reading.op in ("relu", "sigmoid", "tanh"):
                counts[gate][0] += len(layer.reading.flagged_units)
                counts[gate][1] += layer.reading.units
    dead, saturated = (flagged / units if units else None for flagged, units in counts.values())
    return ReportSummary(
        kind="onnx",
        nodes=len(done.result.program),
        dead_fraction=dead,
        saturated_fraction=saturated,
        status=done.health.status,
        finding_codes=[f.code for f in done.health.findings],
    )
