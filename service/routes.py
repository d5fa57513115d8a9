"""The HTTP views: parse, check limits, call the engine, shape the report. No maths here."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args, get_origin

import numpy as np
import orjson
from flask import Blueprint, Response, current_app, g

from gradiag.engine import (
    LEAF_OPS,
    OPS,
    EngineError,
    NodeSpec,
    compile_graph,
    run,
)
from gradiag.engine.ops import Attr
from gradiag.schemas.graph import ColumnsRequest, GraphBody, GraphRequest
from gradiag.service.body import parse_body
from gradiag.service.budget import AnswerPlan, budget_check, check_answer
from gradiag.service.deadline import check_request_deadline, request_deadline
from gradiag.service.errors import engine_problem
from gradiag.service.frontend import diagnose, engine_limits
from gradiag.service.metrics import ReportSummary
from gradiag.service.network import network_report_of_request
from gradiag.service.onnx import onnx_report_of_request
from gradiag.service.report import graph_report
from gradiag.service.svg import graph_svg, network_svg

api = Blueprint("api", __name__)
probes = Blueprint("probes", __name__)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def svg_response(svg: str) -> Response:
    return Response(svg, mimetype="image/svg+xml")


def graph_report_of_request(*, picture: bool = False) -> dict[str, Any]:
    """The /v1/graph report of this request's body, for the JSON and the SVG views alike
    (a picture needs `nodes` with their edges, `explain`, and tensors summarised:
    service.summary). A graph (`nodes`), an expression (`expression`) or a table
    (`columns`); service.frontend tells them apart. The answer's size and the memory are
    checked from the shapes before the engine runs."""
    parsed = parse_body(
        GraphBody,
        first=(b'"columns"', ColumnsRequest),
        unless=((b'"expression"', b'"columns"'), GraphRequest),
    )
    body = parsed.root if isinstance(parsed, GraphBody) else parsed
    settings = current_app.config["GRADIAG"]
    tensors = "picture" if picture else body.tensors
    plan = AnswerPlan(
        tensors,
        columns=body.report == "columns" and not picture,
        gradcheck=body.gradcheck is not False,
        explain=body.explain or picture,
        body_bytes=g.body_bytes,
    )
    try:
        done = diagnose(
            body,
            engine_limits(settings),
            max_expression_chars=settings.max_expression_chars,
            deadline=request_deadline(),
            budget=budget_check(plan),
        )
    except EngineError as err:
        raise engine_problem(err) from None
    check_request_deadline()  # the report, then the picture, are inside the budget too
    g.report_summary = ReportSummary.of_graph(len(done.result.program), done.diagnostics)
    return graph_report(
        done.result,
        done.diagnostics,
        gradcheck=done.gradcheck,
        explain=done.explain or picture,
        layout="nodes" if picture else body.report,
        column_ids=not isinstance(body, ColumnsRequest) or body.columns.id is not None,
        encoding=body.encoding if isinstance(body, ColumnsRequest) else "lists",
        tensors=tensors,
    )


def report_response(report: dict[str, Any]) -> Response:
    """A report as JSON, its length checked once more (findings depend on the values)."""
    encoded = orjson.dumps(report)
    check_answer(encoded, current_app.config["GRADIAG"])
    return Response(encoded, mimetype="application/json")


def picture_response(draw: Any, report: dict[str, Any], *args: Any) -> Response:
    """An SVG answer, drawn inside the request's deadline (dot's timeout too)."""
    check_request_deadline()
    return svg_response(draw(report, *args, deadline=request_deadline()))


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection during one request: a 100k-node graph makes millions of
    short-lived objects (freed by reference counting), and the collector's passes over them
    took ~40% of the request (docs/performance.md). It runs again when the request is done."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@api.post("/v1/graph")
def post_graph() -> Response:
    with paused_gc():
        return report_response(graph_report_of_request())


@api.post("/v1/graph.svg")
def post_graph_svg() -> Response:
    """The same body and errors as POST /v1/graph; the answer is the picture."""
    with paused_gc():
        return picture_response(graph_svg, graph_report_of_request(picture=True))


@api.post("/v1/network")
def post_network() -> Response:
    """A fully-connected network, lowered to a graph and run once (service.network)."""
    with paused_gc():
        return report_response(network_report_of_request())


@api.post("/v1/network.svg")
def post_network_svg() -> Response:
    """The same body and errors as POST /v1/network; the answer is the layer chain."""
    with paused_gc():
        report = network_report_of_request(picture=True)
        return picture_response(network_svg, report, report["input_dim"])


@api.post("/v1/onnx")
def post_onnx() -> Response:
    """A model exported to ONNX, lowered to a graph and run once (service.onnx)."""
    with paused_gc():
        return json_response(onnx_report_of_request())


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
            "attrs": {
                name: attr_words(attr, default)
                for (name, attr), default in zip(
                    op.attrs.items(), op.attr_defaults().values(), strict=True
                )
            },
            "meaning": op.meaning,
            "role": op.role,
        }
        for op in OPS.values()
    ]
    return json_response({"ops": leaves + ops})


def attr_words(attr: Attr, default: Any) -> str:
    """ "number; the slope for x <= 0 (default 0.01)": an attr's type, meaning and default."""
    shown = "" if default is None else f" (default {orjson.dumps(default).decode()})"
    return f"{type_words(attr.kind)}; {attr.doc}{shown}"


def type_words(kind: Any) -> str:
    """An attr's wire type in words: `int | list[int] | None` is "int or list of ints"."""
    words = {float: "number", int: "int", bool: "bool", str: "string"}
    if kind in words:
        return words[kind]
    args = get_args(kind)
    if get_origin(kind) is list:
        return f"list of {type_words(args[0])}s"
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, args))
    return " or ".join(type_words(arg) for arg in args if arg is not type(None))


@probes.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "alive"})


@probes.get("/readyz")
def readyz() -> Response:
    """Ready when the engine answers: a one-node graph goes through forward and backward."""
    program = compile_graph([NodeSpec("x", "input", value=np.ones(()))], "x")
    ready = run(program).grads[0] == 1.0
    return json_response({"status": "ready" if ready else "not ready"}, 200 if ready else 503)
