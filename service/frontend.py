"""The front ends of POST /v1/graph: a validated wire body becomes an engine program (graph
JSON node by node through `NodeSpec`s, an expression through `engine.expression`, a table
through `engine.columns`), and `diagnose` runs it: forward, backward, diagnostics, and the
gradient check when asked.

A big all-scalar graph JSON in topological order (micrograd style) is also a table: it goes
through `engine.columns` too (`scalar_nodes_program`), without a `NodeSpec` or a 0-d array
per node, and gives the program `compile_graph` would give."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any, get_args

import numpy as np

from gradiag.engine import (
    LEAF_OPS,
    OPS,
    EngineError,
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
from gradiag.engine import graph as engine_graph
from gradiag.engine.columns import RowLocs, compile_columns
from gradiag.engine.expression import parse_expression
from gradiag.engine.gradcheck import GradcheckOptions, GradcheckResult, evaluation_budget, gradcheck
from gradiag.engine.ops import Array
from gradiag.engine.tensors import to_array
from gradiag.schemas.common import Thresholds as WireThresholds
from gradiag.schemas.graph import ColumnsRequest, ExpressionRequest, GraphRequest, LeafNode, Node
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
            attrs = node_attrs(node)
            specs.append(NodeSpec(node.id, node.op, tuple(node.inputs), attrs, loc=loc))
    return specs


def node_attrs(node: Any) -> dict[str, Any]:
    """A node's settings as the engine takes them: only those off their default."""
    # a class lookup, not hasattr: a missing attribute costs Pydantic an exception
    if type(node) in NODES_WITH_ATTRS:
        attrs: dict[str, Any] = node.attrs.model_dump(exclude_defaults=True)
        return attrs
    return {}


def graph_program(request: GraphRequest, limits: Limits) -> Program:
    """A nodes body's program: through the table when `scalar_nodes_program` takes the body,
    else node by node through `compile_graph`."""
    program = scalar_nodes_program(request, limits)
    if program is None:
        program = compile_graph(graph_nodes(request), request.output, limits=limits)
    return program


# the most operands an elementwise op takes: the operand columns of an all-elementwise table
ELEMENTWISE_ARITY = max(op.arity for op in OPS.values() if op.elementwise)


def scalar_nodes_program(request: GraphRequest, limits: Limits) -> Program | None:
    """A big graph of one-number leaves and elementwise ops, in topological request order, as
    `engine.columns` compiles a table: whole-column checks, no `NodeSpec` or 0-d array per
    node. The same program as `compile_graph`'s (ids, request order, output, leaf values,
    `("nodes", k)` locs, level plan). None for any other body, and whenever the table route
    refuses it (unknown or duplicate id, not topological, a limit): the per-node route then
    answers, so an error is the same whichever route a body looked fit for."""
    nodes = request.nodes
    # read at call time: a test forcing the per-node walk patches engine.graph's constant
    if len(nodes) < engine_graph.BATCH_MIN_NODES:
        return None
    ops = [node.op for node in nodes]
    if not all(op in LEAF_OPS or OPS[op].elementwise for op in set(ops)):
        return None
    values = [node.value if type(node) is LeafNode else None for node in nodes]
    if list in set(map(type, values)):  # a tensor leaf
        return None
    ids = [node.id for node in nodes]
    inputs = _operand_rows(nodes, ids)
    if inputs is None or not _in_topological_order(inputs):
        return None
    with_attrs = not NODES_WITH_ATTRS.isdisjoint(set(map(type, nodes)))
    try:
        return compile_columns(
            ops,
            inputs,
            values,
            output=request.output,
            ids=ids,
            attrs=[node_attrs(node) for node in nodes] if with_attrs else None,
            limits=limits,
            locs=RowLocs(len(nodes), ("nodes",)),
        )
    except EngineError:
        return None


def _operand_rows(nodes: list[Node], ids: list[str]) -> list[Array] | None:
    """`inputs[k][i]`: the row of node i's k-th operand (-1: none), or None when an input
    names no node. A duplicated id maps to one of its rows; compile_columns refuses it.
    Every input id is looked up in one C-level map; NumPy spreads them into columns."""
    row = dict(zip(ids, range(len(ids)), strict=True))
    operands = [node.inputs if not isinstance(node, LeafNode) else () for node in nodes]
    arity = np.fromiter(map(len, operands), np.intp, len(operands))
    try:
        named = np.fromiter(map(row.__getitem__, chain.from_iterable(operands)), np.intp)
    except KeyError:
        return None
    flat = np.append(named, -1)  # the -1 a missing operand reads
    starts = np.cumsum(arity) - arity
    return [flat[np.where(arity > k, starts + k, flat.size - 1)] for k in range(ELEMENTWISE_ARITY)]


def _in_topological_order(inputs: list[Array]) -> bool:
    """Every operand's row before its user's. Otherwise compile_graph sorts the nodes; the
    table route would only refuse them, after some work."""
    rows = np.arange(inputs[0].size)
    return not any((column >= rows).any() for column in inputs)


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
    """The body's front end: the graph's nodes or the parsed expression through
    `compile_graph`, or the table (packed columns decoded) through `compile_columns`."""
    if isinstance(body, GraphRequest):
        return graph_program(body, limits)
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
