"""The front ends of POST /v1/graph: a validated wire body becomes an engine program (the
graph JSON as a `Table`, an expression through `engine.expression`, a table through
`engine.columns`), all compiled by the one compiler, and `diagnose` runs it: forward,
backward, diagnostics, and the gradient check when asked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np

from gradiag.engine import (
    GraphDiagnostics,
    Limits,
    Program,
    Result,
    Table,
    Thresholds,
    compile_graph,
    compile_table,
    graph_diagnostics,
    run,
)
from gradiag.engine.columns import compile_columns
from gradiag.engine.compiler import RowLocs
from gradiag.engine.expression import parse_expression
from gradiag.engine.gradcheck import GradcheckOptions, GradcheckResult, evaluation_budget, gradcheck
from gradiag.engine.ops import Array
from gradiag.engine.plan import first_seen_codes
from gradiag.engine.tensors import to_array
from gradiag.schemas.common import Thresholds as WireThresholds
from gradiag.schemas.graph import (
    ColumnsRequest,
    ExpressionRequest,
    GraphRequest,
)
from gradiag.schemas.graph import GradcheckOptions as WireGradcheckOptions
from gradiag.service.config import Settings
from gradiag.service.packed import check_encoding, table_columns


@lru_cache(maxsize=16)
def engine_limits(settings: Settings) -> Limits:
    """The graph limits of the settings, for every front end (graph, expression, network).
    Kept per settings (both are frozen): asked on every request, and a frozen dataclass
    costs more to make than to look up."""
    return Limits(
        max_nodes=settings.max_nodes,
        max_tensor_elements=settings.max_tensor_elements,
        max_total_elements=settings.max_total_elements,
        max_flops=settings.max_flops,
        max_scratch_elements=settings.max_scratch_elements,
    )


def nodes_table(request: GraphRequest) -> Table:
    """A nodes body as the compiler's table, a column at a time (C-level maps over the
    nodes, which are dicts): a 100k-node scalar graph makes no object per node here. Tensor
    leaves become arrays (a ragged list is a 422 at its value)."""
    nodes = request.nodes
    names, codes = first_seen_codes(list(map(itemgetter("op"), nodes)))
    values: list[Any] = list(map(methodcaller("get", "value", 0.0), nodes))
    kinds = set(map(type, values))
    tensors: dict[int, Array] = {}
    if list in kinds:
        for row, value in enumerate(values):
            if type(value) is list:
                tensors[row] = to_array(value, ("nodes", row, "value"), node=nodes[row]["id"])
                values[row] = 0.0
    if str in kinds:  # "NaN", "Infinity", "-Infinity": Python's float reads them
        values = [float(v) if type(v) is str else v for v in values]
    attrs = list(map(methodcaller("get", "attrs"), nodes))
    return Table(
        names=names,
        codes=codes,
        scalars=np.fromiter(values, np.float64, len(values)),
        tensors=tensors,
        locs=RowLocs(("nodes",)),
        references=list(map(methodcaller("get", "inputs", ()), nodes)),
        ids=list(map(itemgetter("id"), nodes)),
        attrs=attrs if any(attrs) else None,
    )


def engine_thresholds(wire: WireThresholds) -> Thresholds:
    if not wire.model_fields_set:  # the defaults, as almost every body has them: made once
        return DEFAULT_THRESHOLDS
    return Thresholds(**wire.model_dump())


DEFAULT_THRESHOLDS = Thresholds(**WireThresholds().model_dump())


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
    """The body's front end, then the one compiler: the graph's nodes as a table, the table
    (packed columns decoded), or the parsed expression's nodes."""
    if isinstance(body, GraphRequest):
        return compile_table(nodes_table(body), body.output, limits=limits)
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
    budget: Callable[[Program], None] | None = None,
) -> Diagnosed:
    program = body_program(body, limits, max_expression_chars=max_expression_chars)
    if budget is not None:  # the answer and memory, from the shapes (service/budget.py)
        budget(program)
    output_grad = None if body.output_grad is None else to_array(body.output_grad, ("output_grad",))
    result = run(program, output_grad, deadline=deadline)
    diagnostics = graph_diagnostics(
        result, engine_thresholds(body.thresholds), batch_axis=body.batch_axis
    )
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
