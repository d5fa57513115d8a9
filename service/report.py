"""Shape engine results into the wire report (plain dicts, ready for orjson)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine import OPS, GraphDiagnostics, Result
from engine.diagnostics import Finding, GateStats
from engine.explain import explain_leaves, local_grads
from engine.gradcheck import GradcheckResult
from engine.graph import op_rows
from engine.tensors import to_wire
from service.packed import pack_floats


def health(findings: list[Finding], status: str) -> dict[str, Any]:
    return {
        "status": status,
        "findings": [
            {"code": f.code, "severity": f.severity, "location": f.location, "message": f.message}
            for f in findings
        ],
    }


def node_reports(result: Result) -> dict[str, dict[str, Any]]:
    program = result.program
    local = local_grads(result)
    values = _scalars_wire(result.values, program.shapes, result.flat_values)
    grads = _scalars_wire(result.grads, program.shapes, result.flat_grads)
    roles = {op: OPS[op].role if op in OPS else "leaf" for op in set(program.ops)}
    ids = program.ids
    nodes: dict[str, dict[str, Any]] = {}
    for i, node_id in enumerate(ids):
        op = program.ops[i]
        report: dict[str, Any] = {
            "op": op,
            "shape": list(program.shapes[i]),
            "value": values[i] if values is not None else to_wire(result.values[i]),
        }
        grad = result.grads[i]
        if grad is not None:
            report["grad"] = grads[i] if grads is not None else to_wire(grad)
        report["role"] = roles[op]
        if program.operands[i]:
            report["inputs"] = [ids[j] for j in program.operands[i]]
        if i in local:
            report["local_grad"] = {name: to_wire(d) for name, d in local[i].items()}
        nodes[node_id] = report
    return nodes


def columns_report(result: Result, *, ids: bool, packed: bool = False) -> dict[str, Any]:
    """Every node as columns, row i for node i in the program's order (a columns body's own
    row order): `value`, `grad` (null for consts), `id` when asked, `shape` when a node is a
    tensor. A 100k-node scalar graph is two lists of floats, not 100k objects; `packed`:
    two base64 strings (float64, a const's gradient NaN)."""
    program = result.program
    report: dict[str, Any] = {}
    if ids:
        report["id"] = list(program.ids)
    const_rows = op_rows(program).get("const", ())
    if packed:
        report["value"], report["grad"] = _packed_columns(result, const_rows)
        return report
    values = _scalars_wire(result.values, program.shapes, result.flat_values)
    grads = _scalars_wire(result.grads, program.shapes, result.flat_grads)
    if values is None or grads is None:  # tensors: one nested list per node
        report["shape"] = [list(shape) for shape in program.shapes]
        values = [to_wire(v) for v in result.values]
        grads = [None if g is None else to_wire(g) for g in result.grads]
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
    """`_scalars_flat` as wire numbers in one NumPy call, non-finite ones as their strings
    (a const's missing gradient is a NaN nobody reads). None when a node is a tensor: then
    `to_wire` each."""
    flat = _scalars_flat(arrays, shapes, flat)
    if flat is None:
        return None
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size > 64:  # many: NumPy puts the strings in (a const's NaN stays unused)
        wired: list[Any] = to_wire(flat)
        return wired
    wire: list[Any] = flat.tolist()
    for i in bad.tolist():
        wire[i] = to_wire(wire[i])
    return wire


def graph_report(
    result: Result,
    diagnostics: GraphDiagnostics,
    *,
    gradcheck: GradcheckResult | None = None,
    explain: bool = False,
    layout: str = "nodes",
    column_ids: bool = True,
    encoding: str = "lists",
) -> dict[str, Any]:
    """The /v1/graph answer; `layout` "columns" puts `columns` where `nodes` would be,
    `encoding` "packed" writes its value and grad as base64 float64 arrays."""
    program = result.program
    out = program.output
    relu, sigmoid, tanh = diagnostics.relu, diagnostics.sigmoid, diagnostics.tanh
    report: dict[str, Any] = {
        "output": {
            "id": program.ids[out],
            "value": to_wire(result.values[out]),
            "shape": list(program.shapes[out]),
        },
        **(
            {"columns": columns_report(result, ids=column_ids, packed=encoding == "packed")}
            if layout == "columns"
            else {"nodes": node_reports(result)}
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
