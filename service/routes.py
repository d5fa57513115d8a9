"""The HTTP views: parse, check limits, call the engine, shape the report. No maths here."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from flask import Blueprint, Response, current_app

from engine import (
    LEAF_OPS,
    OPS,
    EngineError,
    Limits,
    NodeSpec,
    compile_graph,
    graph_diagnostics,
    run,
)
from engine.tensors import to_array
from schemas.graph import GraphRequest
from service.body import parse_body
from service.errors import engine_problem
from service.frontend import engine_thresholds, graph_nodes
from service.report import graph_report

api = Blueprint("api", __name__)
probes = Blueprint("probes", __name__)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def engine_limits() -> Limits:
    settings = current_app.config["GRADIAG"]
    return Limits(
        max_nodes=settings.max_nodes,
        max_tensor_elements=settings.max_tensor_elements,
        max_total_elements=settings.max_total_elements,
        max_flops=settings.max_flops,
    )


@api.post("/v1/graph")
def post_graph() -> Response:
    request = parse_body(GraphRequest)
    try:
        program = compile_graph(graph_nodes(request), request.output, limits=engine_limits())
        output_grad = (
            None if request.output_grad is None else to_array(request.output_grad, ("output_grad",))
        )
        result = run(program, output_grad)
    except EngineError as err:
        raise engine_problem(err) from None
    diagnostics = graph_diagnostics(result, engine_thresholds(request.thresholds))
    return json_response(graph_report(result, diagnostics))


@api.get("/v1/ops")
def list_ops() -> Response:
    leaves = [
        {"name": name, "arity": 0, "attrs": {}, "meaning": meaning, "role": "leaf"}
        for name, meaning in LEAF_OPS.items()
    ]
    ops = [
        {
            "name": op.name,
            "arity": op.arity,
            "attrs": dict(op.attrs),
            "meaning": op.meaning,
            "role": op.role,
        }
        for op in OPS.values()
    ]
    return json_response({"ops": leaves + ops})


@probes.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "alive"})


@probes.get("/readyz")
def readyz() -> Response:
    """Ready when the engine answers: a one-node graph goes through forward and backward."""
    program = compile_graph([NodeSpec("x", "input", value=np.ones(()))], "x")
    ready = run(program).grads[0] == 1.0
    return json_response({"status": "ready" if ready else "not ready"}, 200 if ready else 503)
