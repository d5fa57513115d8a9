"""Shape engine results into the wire report (plain dicts, ready for orjson)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from itertools import chain
from typing import Any

import numpy as np

from gradiag.engine import OPS, GraphDiagnostics, Program, Result
from gradiag.engine.diagnostics import Finding, GateStats
from gradiag.engine.explain import explain_leaves, local_grads
from gradiag.engine.gradcheck import GradcheckResult
from gradiag.engine.graph import OperandRows, ScalarColumn, batch_plan, op_rows
from gradiag.engine.tensors import to_wire
from gradiag.service.packed import pack_floats
from gradiag.service.summary import rows_for, summary_value


def health(findings: list[Finding], status: str) -> dict[str, Any]:
    return {
        "status": status,
        "findings": [  # unpacked: a big scalar graph may have a finding per node
            {"code": code, "severity": severity, "location": location, "message": message}
            for code, severity, location, message in findings
        ],
    }


def node_reports(result: Result, tensors: str = "full") -> dict[str, dict[str, Any]]:
    """Every node keyed by id, in the program's order: `op`, `shape`, `value`, `grad` (not
    for a const or a `no_grad` leaf), `role`, `inputs` (op nodes), `local_grad` (scalar op
    nodes). Each field is first made for all rows at once (NumPy, C-level maps), then one
    dict per node: per-row lookups were most of a 100k-node graph's report time."""
    program = result.program
    ids = list(program.ids)  # a columns body's `RowIds` would make each id per lookup
    wire_rows = rows_for(tensors, _wire_rows)  # the arrays, or their summaries
    grads = wire_rows(result.grads, program.shapes, result.flat_grads)
    for i in _gradless_rows(result):
        grads[i] = _ABSENT
    roles = {op: OPS[op].role if op in OPS else "leaf" for op in set(program.ops)}
    rows = zip(
        ids,
        program.ops,
        [list(shape) for shape in program.shapes],
        wire_rows(result.values, program.shapes, result.flat_values),
        grads,
        map(roles.__getitem__, program.ops),
        _input_ids(program, ids),
        _local_grad_rows(result),
        strict=True,
    )
    nodes: dict[str, dict[str, Any]] = {}
    for node_id, op, shape, value, grad, role, inputs, local in rows:
        report = {"op": op, "shape": shape, "value": value}
        if grad is not _ABSENT:
            report["grad"] = grad
        report["role"] = role
        if inputs:
            report["inputs"] = inputs
        if local is not None:
            report["local_grad"] = local
        nodes[node_id] = report
    return nodes


_ABSENT = object()  # a row without a gradient: no `grad` key (None would be `null`)


def _wire_rows(
    arrays: Sequence[Any], shapes: Sequence[tuple[int, ...]], flat: np.ndarray | None
) -> list[Any]:
    """Every row's array as wire numbers (None stays None): one NumPy call for scalar
    graphs, `to_wire` per row for tensors. A fresh list the caller may change."""
    wire = _scalars_wire(arrays, shapes, flat)
    if wire is None:
        wire = [None if a is None else to_wire(a) for a in arrays]
    return wire


def _gradless_rows(result: Result) -> Collection[int]:
    """The rows whose gradient is None: a batched run's column knows them (its consts)."""
    if isinstance(result.grads, ScalarColumn):
        return result.grads.missing
    return [i for i, grad in enumerate(result.grads) if grad is None]


def _input_ids(program: Program, ids: list[str]) -> list[list[str] | None]:
    """Each row's operand ids, in order (None for a leaf). A table's `OperandRows` or a
    batched run's plan hold them as operand columns: read those, the rows of each arity
    at once with C-level maps, rather than a tuple per row."""
    columns = _operand_columns(program)
    if columns is None:
        return [list(map(ids.__getitem__, ins)) if ins else None for ins in program.operands]
    arity = (np.asarray(columns) >= 0).sum(axis=0)  # operands fill the first positions
    inputs: list[list[str] | None] = [None] * len(ids)
    for k in range(1, len(columns) + 1):
        rows = np.flatnonzero(arity == k)
        named = [map(ids.__getitem__, column[rows].tolist()) for column in columns[:k]]
        for i, names in zip(rows.tolist(), map(list, zip(*named, strict=True)), strict=True):
            inputs[i] = names
    return inputs


def _operand_columns(program: Program) -> list[np.ndarray] | None:
    """`columns[k][i]`: row i's k-th operand (-1: none), when the program has them."""
    if isinstance(program.operands, OperandRows):
        return list(program.operands.columns)
    plan = batch_plan(program)  # built by the run already; its ops take at most 2 operands
    return None if plan is None else list(plan.edges)


def _local_grad_rows(result: Result) -> list[dict[str, Any] | None]:
    """Each row's `local_grad` (None where it has none). `local_grads` gives plain floats,
    the wire numbers already: only a dict holding a non-finite one is rewritten."""
    local = local_grads(result)
    rows: list[dict[str, Any] | None] = [None] * len(result.program)
    for i, grads in local.items():
        rows[i] = grads
    for i in _not_wire_ready(local):
        rows[i] = {name: to_wire(d) for name, d in local[i].items()}
    return rows


def _not_wire_ready(local: dict[int, dict[str, float]]) -> list[int]:
    """The rows whose local gradients are not all finite plain floats: one C-level pass over
    all of them (usually all are), then NumPy finds the rows, then only those in Python."""
    dicts = list(local.values())
    numbers = list(chain.from_iterable(map(dict.values, dicts)))
    if set(map(type, numbers)) - {float}:
        return list(local)
    if all(map(math.isfinite, numbers)):
        return []
    nonfinite = np.flatnonzero(~np.isfinite(np.array(numbers, np.float64)))
    ends = np.cumsum(list(map(len, dicts)))  # where each row's numbers end in `numbers`
    owners = np.unique(np.searchsorted(ends, nonfinite, side="right"))
    keys = list(local)
    return [keys[k] for k in owners.tolist()]


def columns_report(
    result: Result, *, ids: bool, packed: bool = False, tensors: str = "full"
) -> dict[str, Any]:
    """Every node as columns, row i for node i in the program's order (a columns body's own
    row order): `value`, `grad` (null for consts), `id` when asked, `shape` when a node is a
    tensor. A 100k-node scalar graph is two lists of floats, not 100k objects; `packed`:
    two base64 strings (float64, a const's gradient NaN)."""
    program = result.program
    report: dict[str, Any] = {}
    if ids:
        report["id"] = list(program.ids)
    const_rows = op_rows(program).get("const", np.empty(0, np.intp)).tolist()
    if packed:
        report["value"], report["grad"] = _packed_columns(result, const_rows)
        return report
    if any(program.shapes):  # tensors: one nested list per node (a shape () is falsy)
        report["shape"] = [list(shape) for shape in program.shapes]
    wire_rows = rows_for(tensors, _wire_rows)
    values = wire_rows(result.values, program.shapes, result.flat_values)
    grads = wire_rows(result.grads, program.shapes, result.flat_grads)
    for i in const_rows:
        grads[i] = None
    report["value"] = values
    report["grad"] = grads
    return report


def _packed_columns(result: Result, const_rows: Sequence[int]) -> tuple[Any, Any]:
    """The value and grad columns packed. Only a columns body asks, and its nodes are
    scalars (engine.columns refuses anything else), so both flat arrays always exist."""
    shapes = result.program.shapes
    values = _scalars_flat(result.values, shapes, result.flat_values)
    grads = _scalars_flat(result.grads, shapes, result.flat_grads)
    if values is None or grads is None:
        raise ValueError("a packed answer holds scalar nodes only")
    if len(const_rows):
        grads = grads.copy()  # the run's own array stays as it is
        grads[np.asarray(const_rows, np.intp)] = np.nan  # no null in a float array
    return pack_floats(values), pack_floats(grads)


def _scalars_flat(
    arrays: Sequence[Any], shapes: Sequence[tuple[int, ...]], flat: np.ndarray | None = None
) -> np.ndarray | None:
    """Scalar graphs: every value as one float64 array (the run's `flat` array when it kept
    one; a const's missing gradient is a NaN). None when a node is a tensor."""
    if flat is not None:
        return flat
    if any(shapes):  # a shape () is falsy: all scalars
        return None
    return np.array([np.nan if a is None else a for a in arrays], dtype=np.float64)


def _scalars_wire(
    arrays: Sequence[Any], shapes: Sequence[tuple[int, ...]], flat: np.ndarray | None = None
) -> list[Any] | None:
    """Every scalar as a wire number (a const's missing gradient is a NaN nobody reads), or
    None when a node is a tensor: then `to_wire` each. A batched run's flat array in one
    NumPy call; a per-node run's 0-d arrays as Python floats (the same float64 numbers,
    without three NumPy calls: such a graph is small or runs node by node anyway)."""
    if flat is None:
        if any(shapes):  # a shape () is falsy: all scalars
            return None
        return _wire_numbers([math.nan if a is None else float(a) for a in arrays])
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size > 64:  # many: NumPy puts the strings in (a const's NaN stays unused)
        wired: list[Any] = to_wire(flat)
        return wired
    wire: list[Any] = flat.tolist()
    for i in bad.tolist():
        wire[i] = to_wire(wire[i])
    return wire


def _wire_numbers(numbers: list[Any]) -> list[Any]:
    """Python floats as wire numbers, in place: a non-finite one becomes its string."""
    if not all(map(math.isfinite, numbers)):  # a C-level pass; usually all are finite
        for i, x in enumerate(numbers):
            if not math.isfinite(x):
                numbers[i] = to_wire(x)
    return numbers


def graph_report(
    result: Result,
    diagnostics: GraphDiagnostics,
    *,
    gradcheck: GradcheckResult | None = None,
    explain: bool = False,
    layout: str = "nodes",
    column_ids: bool = True,
    encoding: str = "lists",
    tensors: str = "full",
) -> dict[str, Any]:
    """The /v1/graph answer; `layout` "columns" puts `columns` where `nodes` would be,
    `encoding` "packed" writes its value and grad as base64 float64 arrays."""
    program = result.program
    out = program.output
    relu, sigmoid, tanh = diagnostics.relu, diagnostics.sigmoid, diagnostics.tanh
    report: dict[str, Any] = {
        "output": {
            "id": program.ids[out],
            "value": summary_value(result.values[out], tensors),
            "shape": list(program.shapes[out]),
        },
        **(
            {
                "columns": columns_report(
                    result, ids=column_ids, packed=encoding == "packed", tensors=tensors
                )
            }
            if layout == "columns"
            else {"nodes": node_reports(result, tensors)}
        ),
        "parameters": {
            "tensors": diagnostics.parameter_tensors,
            "total": diagnostics.parameter_total,
        },
        "diagnostics": {
            "relu": {
                "nodes": relu.nodes,
                "elements": relu.elements,
                "dead_elements": relu.flagged,
                "dead_fraction": relu.fraction,
            },
            "sigmoid": _saturation(sigmoid),
            "tanh": _saturation(tanh),
            "nonfinite_nodes": diagnostics.nonfinite_nodes,
        },
        "health": health(diagnostics.findings, diagnostics.status),
    }
    if gradcheck is not None:
        report["gradcheck"] = gradcheck_report(gradcheck)
    if explain:
        report["explanation"] = explanation(result)
    return report


def gradcheck_report(check: GradcheckResult) -> dict[str, Any]:
    return {
        "passed": check.passed,
        "max_relative_error": to_wire(check.max_relative_error),
        "per_node": {n.id: to_wire(n.max_relative_error) for n in check.nodes},
        "verdict": check.verdict,
        "kink_crossings": check.kink_crossings,
        "nodes": {
            n.id: {
                "max_relative_error": to_wire(n.max_relative_error),
                "verdict": n.verdict,
                "elements": n.elements,
                "checked": n.checked,
                "worst_element": None if n.worst_element is None else list(n.worst_element),
                "kink_crossings": n.kink_crossings,
                "kinks": [
                    {
                        "element": list(k.element),
                        "at": k.at,
                        "op": k.op,
                        "at_element": list(k.at_element),
                        "analytic": to_wire(k.analytic),
                        "numerical": to_wire(k.numerical),
                        "relative_error": to_wire(k.relative_error),
                    }
                    for k in n.kinks
                ],
                "undefined": n.undefined,
            }
            for n in check.nodes
        },
        "step": check.options.step,
        "tolerance": check.options.tolerance,
        "evaluations": check.evaluations,
        "complete": check.complete,
    }


def explanation(result: Result) -> dict[str, Any]:
    return {
        "leaves": [
            {
                "id": leaf.id,
                "shape": list(leaf.shape),
                "grad": to_wire(leaf.grad),
                "magnitude": to_wire(leaf.magnitude),
                "element": list(leaf.element),
                "sentence": leaf.sentence,
            }
            for leaf in explain_leaves(result)
        ]
    }


def _saturation(stats: GateStats) -> dict[str, Any]:
    return {
        "nodes": stats.nodes,
        "elements": stats.elements,
        "saturated_elements": stats.flagged,
        "saturated_fraction": stats.fraction,
    }
