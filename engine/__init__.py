"""gradiag's autodiff engine: NumPy only (no Flask, no Pydantic).

Front ends (graph JSON, expressions, tables, networks) hand a `Table` (or `NodeSpec`s) to the
one compiler, `compile_table` / `compile_graph`, which checks it and plans the walk; `run`
does one forward and one backward pass over that plan; `graph_diagnostics` and
`network_diagnostics` read health off the `Result`. The op table, `OPS`, is the only place
that knows what an op does.
"""

from gradiag.engine.compiler import (
    Limits,
    NodeSpec,
    Program,
    Table,
    compile_graph,
    compile_table,
)
from gradiag.engine.diagnostics import Finding, GraphDiagnostics, Thresholds, graph_diagnostics
from gradiag.engine.errors import EngineError, GraphError, LimitError, ShapeError, ValueDomainError
from gradiag.engine.executor import Result, forward, run
from gradiag.engine.network import (
    NetworkDiagnostics,
    NetworkLimits,
    NetworkSpec,
    check_network,
    compile_network,
    network_diagnostics,
    with_leaves,
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
    "Table",
    "Thresholds",
    "ValueDomainError",
    "check_network",
    "compile_graph",
    "compile_network",
    "compile_table",
    "forward",
    "graph_diagnostics",
    "network_diagnostics",
    "run",
    "with_leaves",
]
