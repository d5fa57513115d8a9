"""gradiag's autodiff engine: NumPy only (no Flask, no Pydantic).

Front ends (graph JSON, expressions, networks) build `NodeSpec`s; `compile_graph` checks and
orders them; `run` does one forward and one backward pass; `graph_diagnostics` reads health
off the result.
"""

from gradiag.engine.diagnostics import Finding, GraphDiagnostics, Thresholds, graph_diagnostics
from gradiag.engine.errors import EngineError, GraphError, LimitError, ShapeError, ValueDomainError
from gradiag.engine.graph import Limits, NodeSpec, Program, Result, compile_graph, run
from gradiag.engine.network import (
    NetworkDiagnostics,
    NetworkLimits,
    NetworkSpec,
    check_network,
    check_network_limits,
    lower,
    network_diagnostics,
)
from gradiag.engine.ops import LEAF_OPS, OPS, Op

__all__ = [
    "LEAF_OPS",
    "OPS",
    "EngineError",
    "Finding",
    "GraphDiagnostics",
    "GraphError",
    "LimitError",
    "Limits",
    "NetworkDiagnostics",
    "NetworkLimits",
    "NetworkSpec",
    "NodeSpec",
    "Op",
    "Program",
    "Result",
    "ShapeError",
    "Thresholds",
    "ValueDomainError",
    "check_network",
    "check_network_limits",
    "compile_graph",
    "graph_diagnostics",
    "lower",
    "network_diagnostics",
    "run",
]
