"""The front ends of POST /v1/graph: a validated wire body becomes an engine program (graph
JSON node by node through `NodeSpec`s, an expression through `engine.expression`, a table
through `engine.columns`), and `diagnose` runs it: forward, backward, diagnostics, and the
gradient check when asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from engine import (
    GraphDiagnostics,
    Limits,
    NodeSpec,
    Program,
    Result,
    Thresholds,
    compile_graph,
    graph_diagnostics,
    run,
)
from engine.columns import compile_columns
from engine.expression import parse_expression
from engine.gradcheck import GradcheckOptions, GradcheckResult, evaluation_budget, gradcheck
from engine.tensors import to_array
from schemas.common import Thresholds as WireThresholds
from schemas.graph import ColumnsRequest, ExpressionRequest, GraphRequest, LeafNode, Node
from schemas.graph import GradcheckOptions as WireGradcheckOptions
from service.config import Settings
from service.packed import check_encoding, table_columns


def engine_limits(settings: Settings) -> Limits:
    """The graph limits of the settings, for every front end (graph, expression, network)."""
    return Limits(
        max_nodes=settings.max_nodes,
        max_tensor_elements=settings.max_tensor_elements,
        max_total_elements=settings.max_total_elements,
        max_flops=settings.max_flops,
    )


NODES_WITH_ATTRS = frozenset(
    cls for cls in get_args(get_args(Node)[0]) if "attrs" in cls.model_fields
)


def graph_nodes(request: GraphRequest) -> list[NodeSpec]:
    specs = []
    for k, node in enumerate(request.nodes):
        loc = ("nodes", k)
        if isinstance(node, LeafNode):
            value = to_array(node.value, (*loc, "value"), node=node.id)
            specs.append(NodeSpec(node.id, node.op, value=value, loc=loc))
        else:
            # a class lookup, not hasattr: a missing attribute costs Pydantic an exception
            has_attrs = type(node) in NODES_WITH_ATTRS
            attrs = node.attrs.model_dump(exclude_defaults=True) if has_attrs else {}
            specs.append(NodeSpec(node.id, node.op, tuple(node.inputs), attrs, loc=loc))
    return specs


def engine_thresholds(wire: WireThresholds) -> Thresholds:
    return Thresholds(**wire.model_dump())


# --- POST /v1/graph: either body, then forward, backward, diagnostics, gradcheck ---------


@dataclass
class Diagnosed:
    """One run of a graph body, with what the report needs."""

    result: Result
    diagnostics: GraphDiagnostics
    gradcheck: GradcheckResult | None
    explain: bool


GraphBodies = GraphRequest | ExpressionRequest | ColumnsRequest


def body_program(body: GraphBodies, limits: Limits, *, max_expression_chars: int) -> Program:
    """The body's front end: the graph's nodes or the parsed expression through
    `compile_graph`, or the table (packed columns decoded) through `compile_columns`."""
    if isinstance(body, GraphRequest):
        return compile_graph(graph_nodes(body), body.output, limits=limits)
    if isinstance(body, ColumnsRequest):
        check_encoding(body)
        table = body.columns
        attrs = None
        if table.attrs is not None:
            attrs = [None if a is None else a.model_dump(exclude_none=True) for a in table.attrs]
        return compile_columns(
            *table_columns(table),
            output=body.output,
            ids=table.id,
            attrs=attrs,
            limits=limits,
        )
    values = {
        name: to_array(value, ("values", name), node=name) for name, value in body.values.items()
    }
    parsed = parse_expression(
        body.expression,
        values,
        max_chars=max_expression_chars,
        max_nodes=limits.max_nodes,
    )
    return compile_graph(parsed.nodes, parsed.output, limits=limits)


def diagnose(
    body: GraphBodies,
    limits: Limits,
    *,
    max_expression_chars: int,
    deadline: float | None = None,
) -> Diagnosed:
    program = body_program(body, limits, max_expression_chars=max_expression_chars)
    output_grad = None if body.output_grad is None else to_array(body.output_grad, ("output_grad",))
    result = run(program, output_grad, deadline=deadline)
    diagnostics = graph_diagnostics(result, engine_thresholds(body.thresholds))
    check = None
    if body.gradcheck is not False:
        options = gradcheck_options(body.gradcheck, program, limits)
        check = gradcheck(result, output_grad, options, deadline=deadline)
    return Diagnosed(result, diagnostics, check, body.explain)


def gradcheck_options(
    wire: bool | WireGradcheckOptions, program: Program, limits: Limits
) -> GradcheckOptions:
    """The request's options (defaults for `true`), with max_evaluations cut to the budget."""
    chosen = WireGradcheckOptions() if isinstance(wire, bool) else wire
    budget = evaluation_budget(program, limits.max_flops)
    return GradcheckOptions(
        step=chosen.step,
        tolerance=chosen.tolerance,
        max_elements_per_node=chosen.max_elements_per_node,
        max_evaluations=min(chosen.max_evaluations, budget),
        seed=chosen.seed,
    )
