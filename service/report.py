"""Shape engine results into the wire report (plain dicts, ready for orjson)."""

from __future__ import annotations

from typing import Any

from engine import GraphDiagnostics, Result
from engine.diagnostics import Finding, GateStats
from engine.tensors import to_wire


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
    nodes: dict[str, dict[str, Any]] = {}
    for i, node_id in enumerate(program.ids):
        report: dict[str, Any] = {
            "op": program.ops[i],
            "shape": list(program.shapes[i]),
            "value": to_wire(result.values[i]),
        }
        grad = result.grads[i]
        if grad is not None:
            report["grad"] = to_wire(grad)
        nodes[node_id] = report
    return nodes


def graph_report(result: Result, diagnostics: GraphDiagnostics) -> dict[str, Any]:
    program = result.program
    out = program.output
    relu, sigmoid, tanh = diagnostics.relu, diagnostics.sigmoid, diagnostics.tanh
    return {
        "output": {
            "id": program.ids[out],
            "value": to_wire(result.values[out]),
            "shape": list(program.shapes[out]),
        },
        "nodes": node_reports(result),
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


def _saturation(stats: GateStats) -> dict[str, Any]:
    return {
        "nodes": stats.nodes,
        "elements": stats.elements,
        "saturated_elements": stats.flagged,
        "saturated_fraction": stats.fraction,
    }
