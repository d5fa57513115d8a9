"""Shape engine results into the wire report (plain dicts, ready for orjson)."""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import numpy as np

from gradiag.engine import OPS, GraphDiagnostics, Result
from gradiag.engine.diagnostics import Finding, KindStats
from gradiag.engine.explain import explain_leaves, local_grads
from gradiag.engine.gradcheck import GradcheckResult
from gradiag.engine.tensors import to_wire
from gradiag.service.packed import pack_floats
from gradiag.service.summary import scalar_writer, summary_value, tensor_writer


def health(findings: list[Finding], status: str) -> dict[str, Any]:
    return {"status": status, "findings": [finding_report(finding) for finding in findings]}


def finding_report(finding: Finding) -> dict[str, Any]:
    code, severity, location, message, count = finding
    report: dict[str, Any] = {
        "code": code,
        "severity": severity,
        "location": location,
        "message": message,
    }
    if count is not None:
        report["count"] = count
    return report


_ABSENT = object()  # a row without a gradient: no `grad` key (None would be `null`)


def node_reports(
    result: Result, *, explain: bool = False, tensors: str = "full"
) -> dict[str, dict[str, Any]]:
    """Every node keyed by id, in the program's order: `op`, `shape`, `value`, `grad` (not
    for a const or a `no_grad` node); with `explain`, also `role`, `inputs` (op nodes) and
    `local_grad` (scalar op nodes). Each field is made for all rows at once (NumPy, C-level
    maps), then one dict per node."""
    program = result.program
    ids = program.node_ids()
    ops = program.ops()
    columns = [
        ids,
        ops,
        [list(shape) for shape in program.shapes],
        _wire_rows(result, gradients=False, tensors=tensors),
        _wire_rows(result, gradients=True, tensors=tensors),
    ]
    if not explain:
        nodes: dict[str, dict[str, Any]] = {}
        for node_id, op, shape, value, grad in zip(*columns, strict=True):
            report = {"op": op, "shape": shape, "value": value}
            if grad is not _ABSENT:
                report["grad"] = grad
            nodes[node_id] = report
        return nodes
    roles = {op: OPS[op].role if op in OPS else "leaf" for op in program.names}
    columns += [map(roles.__getitem__, ops), _input_ids(result, ids), _local_grad_rows(result)]
    nodes = {}
    for node_id, op, shape, value, grad, role, inputs, local in zip(*columns, strict=True):
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


def _wire_rows(result: Result, *, gradients: bool, tensors: str = "full") -> list[Any]:
    """Every row's value (or gradient) as wire numbers: the scalar rows in one NumPy call
    (only non-finite ones looked at again), each tensor row on its own, as the `tensors`
    mode writes it (service/summary.py). With `gradients`, a row without one is `_ABSENT`
    and an unreached tensor row is zeros."""
    program = result.program
    slots = result.grads if gradients else result.values
    flat = result.scalar_grads if gradients else result.scalar_values
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size > 64:  # many: NumPy puts the strings in
        wire: list[Any] = to_wire(flat)
    else:
        wire = flat.tolist()
        for i in bad.tolist():
            wire[i] = to_wire(wire[i])
    write_scalar = scalar_writer(tensors)
    if write_scalar is not None:
        wire = list(map(write_scalar, wire))
    write_tensor = tensor_writer(tensors)
    for i in result.values.tensors:  # every tensor row has a value; an unreached one no grad
        tensor = slots.tensors.get(i)
        wire[i] = write_tensor(np.zeros(program.shapes[i]) if tensor is None else tensor)
    if gradients:
        for i in _gradless_rows(result):
            wire[i] = _ABSENT
    return wire


def _gradless_rows(result: Result) -> list[int]:
    program = result.program
    return sorted({*program.rows_of("const").tolist(), *program.no_grad})


def _input_ids(result: Result, ids: list[str]) -> list[list[str] | None]:
    """Each row's operand ids, in order (None for a leaf), read off the operand columns:
    the rows of each arity at once, with C-level maps, rather than a tuple per row."""
    program = result.program
    inputs: list[list[str] | None] = [None] * len(ids)
    for k in range(1, int(program.arity.max(initial=0)) + 1):
        rows = np.flatnonzero(program.arity == k)
        named = [map(ids.__getitem__, program.operands[j, rows].tolist()) for j in range(k)]
        for i, names in zip(rows.tolist(), map(list, zip(*named, strict=True)), strict=True):
            inputs[i] = names
    return inputs


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
    two base64 strings (float64, a const's gradient NaN; a columns body holds scalars
    only)."""
    program = result.program
    report: dict[str, Any] = {}
    if ids:
        report["id"] = program.node_ids()
    gradless = _gradless_rows(result)
    if packed:
        grads = result.scalar_grads
        if gradless:
            grads = grads.copy()  # the result's own column stays as it is
            grads[gradless] = np.nan  # no null in a float array
        report["value"] = pack_floats(result.scalar_values)
        report["grad"] = pack_floats(grads)
        return report
    if any(program.shapes):  # tensors: one nested list per node (a shape () is falsy)
        report["shape"] = [list(shape) for shape in program.shapes]
    report["value"] = _wire_rows(result, gradients=False, tensors=tensors)
    grads_wire = _wire_rows(result, gradients=True, tensors=tensors)
    for i in gradless:
        grads_wire[i] = None
    report["grad"] = grads_wire
    return report


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
    relu, sigmoid, tanh = (diagnostics.kinds[kind] for kind in ("relu", "sigmoid", "tanh"))
    report: dict[str, Any] = {
        "output": {
            "id": program.node_id(out),
            "value": summary_value(result.value(out), tensors),
            "shape": list(program.shapes[out]),
        },
        **(
            {
                "columns": columns_report(
                    result, ids=column_ids, packed=encoding == "packed", tensors=tensors
                )
            }
            if layout == "columns"
            else {"nodes": node_reports(result, explain=explain, tensors=tensors)}
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
                "units": relu.units,
                "dead_units": relu.flagged_units,
                "dead_unit_fraction": relu.unit_fraction,
                "margin_nodes": relu.margins,
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


def _saturation(stats: KindStats) -> dict[str, Any]:
    return {
        "nodes": stats.nodes,
        "elements": stats.elements,
        "saturated_elements": stats.flagged,
        "saturated_fraction": stats.fraction,
        "units": stats.units,
        "saturated_units": stats.flagged_units,
        "saturated_unit_fraction": stats.unit_fraction,
    }
