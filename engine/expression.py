"""The expression front end: `"(x + y) * z"` becomes the engine's `NodeSpec`s.

The text is parsed with `ast.parse(mode="eval")` and walked against an explicit whitelist;
nothing is ever evaluated, executed or compiled to code, and no constant is folded with
Python numbers (a number becomes a `const` leaf that NumPy computes with in float64, so
`9**9**9**9` is Infinity reported as data, not a hanging worker).

Allowed: numbers (int or float literals), names (each must be a key of `values`), the binary
operators `+ - * / ** @`, unary `-` and `+`, parentheses, and calls of catalogue ops by name
with positional arguments (`exp(a)`, `max(a, b)`, `mse(s, y)`), arity checked against
`engine.ops.OPS`. Everything else is refused with an `ExpressionError` that quotes the part
at fault and its (1-based) column.

Node ids (docs/expressions.md has the full story):
- every key of `values` is an `input` node with that id (used in the expression or not);
- a number is a `const` node whose id is its normalised literal (`"2"`, `"1.0"`, `"1e-05"`);
- any other sub-expression is a node whose id is its normalised text (`ast.unparse`, so
  `(x+y)*z` gives `"(x + y) * z"`); when that text is longer than `MAX_TEXT_ID` characters
  or already names another node, the id is `t<k>`, k the node's 1-based position in
  creation order (post-order, left to right), with `_` appended until it is free;
- identical sub-expressions share one node (hash-consing on op and operand ids), so fan-out
  is visible: in `(a + b) * (a + b)` the node `a + b` is used twice and its gradient is the
  sum of both paths. Unary `+` makes no node.

Cost is bounded before parsing: the length (`max_chars`), the bracket depth and runs of
unary operators (`max_nesting`) are counted in one pass over the text, because `ast.parse`
itself raises RecursionError or MemoryError on deeply nested input; those and SyntaxError
are caught and refused as well. The walk is iterative.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from engine.errors import EngineError, LimitError
from engine.graph import NodeSpec
from engine.ops import OPS, Array

MAX_TEXT_ID = 60
DEFAULT_MAX_CHARS = 10_000
DEFAULT_MAX_NESTING = 100
LOC = ("expression",)
Positioned = ast.expr | ast.keyword

_BINARY_OPS: dict[type[ast.operator], str] = {
    ast.Add: "add",
    ast.Sub: "sub",
    ast.Mult: "mul",
    ast.Div: "div",
    ast.Pow: "pow",
    ast.MatMult: "matmul",
}

# Friendly names for refused syntax, by AST class; anything not listed is "this syntax".
_REFUSED: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "subscripts are not allowed",
    ast.Lambda: "lambdas are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.Compare: "comparisons are not allowed",
    ast.BoolOp: "boolean operators are not allowed",
    ast.IfExp: "conditional expressions are not allowed",
    ast.List: "lists are not allowed",
    ast.Tuple: "tuples are not allowed",
    ast.Dict: "dicts are not allowed",
    ast.Set: "sets are not allowed",
    ast.Starred: "starred arguments are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.NamedExpr: "assignment expressions are not allowed",
    ast.Await: "await is not allowed",
    ast.Slice: "slices are not allowed",
}
_REFUSED_OPERATORS: dict[type[ast.AST], str] = {
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Not: "not",
    ast.Invert: "~",
}


class ExpressionError(EngineError):
    """An expression outside the grammar; `column` is 1-based (None: the whole text)."""

    def __init__(self, message: str, *, column: int | None = None):
        super().__init__(message, loc=LOC)
        self.column = column


@dataclass(frozen=True)
class Expression:
    """What the front end hands to `compile_graph`: the nodes and the output's id."""

    nodes: list[NodeSpec]
    output: str


def parse_expression(
    source: str,
    values: Mapping[str, Array],
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_nesting: int = DEFAULT_MAX_NESTING,
    max_nodes: int = 0,
) -> Expression:
    """Parse `source` into input nodes (one per key of `values`, in the order given), const
    nodes and op nodes. Raises ExpressionError (grammar) or LimitError (size, nesting)."""
    _check_text(source, max_chars, max_nesting)
    tree = _parse(source)
    return _Builder(source, values, max_nodes).build(tree.body)


# --- before parsing: cheap checks on the text ----------------------------------------


def _check_text(source: str, max_chars: int, max_nesting: int) -> None:
    if max_chars and len(source) > max_chars:
        raise LimitError(
            f"the expression has {len(source)} characters; the limit max_expression_chars "
            f"is {max_chars}",
            limit="max_expression_chars",
            value=max_chars,
            loc=LOC,
        )
    if not source.strip():
        raise ExpressionError("the expression is empty")
    if not source.isascii():
        k = next(k for k, ch in enumerate(source) if not ch.isascii())
        raise ExpressionError(
            f"character {source[k]!r} at column {k + 1} is not allowed: an expression is "
            "written in ASCII",
            column=k + 1,
        )
    depth = run = 0
    for k, ch in enumerate(source):
        if ch in "([{":
            depth += 1
            run = 0
        elif ch in ")]}":
            depth -= 1
        elif ch in "-+~":
            run += 1
        elif not ch.isspace():
            run = 0
        if depth > max_nesting or run > max_nesting:
            what = "brackets" if depth > max_nesting else "unary operators"
            raise LimitError(
                f"the expression nests {what} more than {max_nesting} deep (at column "
                f"{k + 1}); the limit is {max_nesting}",
                limit="max_expression_nesting",
                value=max_nesting,
                loc=LOC,
            )


def _parse(source: str) -> ast.Expression:
    try:
        return ast.parse(source, mode="eval")
    except SyntaxError as err:
        column = err.offset if err.lineno in (None, 1) else None
        where = f" at column {column}" if column else f" on line {err.lineno}"
        near = ""
        if column and 0 < column <= len(source):
            near = f" near {source[column - 1 : column + 19]!r}"
        raise ExpressionError(f"syntax error{where}{near}: {err.msg}", column=column) from None
    except (RecursionError, MemoryError):
        raise ExpressionError(
            "the expression is nested too deeply for the parser; split it into smaller "
            "parts or use the graph body"
        ) from None


# --- the whitelist walk ---------------------------------------------------------------


class _Builder:
    def __init__(self, source: str, values: Mapping[str, Array], max_nodes: int) -> None:
        self.source = source
        self.lines = source.split("\n")
        self.starts = [0]
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)
        self.values = values
        self.max_nodes = max_nodes
        self.nodes = [
            NodeSpec(name, "input", value=value, loc=("values", name))
            for name, value in values.items()
        ]
        self.used: set[str] = set(values)
        self.shared: dict[tuple[Any, ...], str] = {}
        self.created = 0

    def build(self, root: ast.expr) -> Expression:
        """Post-order over the tree with an explicit stack; children are checked when
        their parent is first seen, so the first error reported is the outermost one."""
        ids: dict[int, str] = {}  # id(ast node) -> node id
        stack: list[tuple[ast.expr, bool]] = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if not ready:
                children = self._check(node)
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(children))
                continue
            ids[id(node)] = self._emit(node, ids)
        return Expression(self.nodes, ids[id(root)])

    def _check(self, node: ast.expr) -> list[ast.expr]:
        """Refuse anything off the whitelist; return the operands to walk."""
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                kind = "booleans" if isinstance(value, bool) else _constant_kind(value)
                self._refuse(node, f"{kind} are not allowed; numbers are")
            return []
        if isinstance(node, ast.Name):
            if node.id not in self.values:
                hint = f" ({node.id} is an op: call it as {node.id}(...))" if node.id in OPS else ""
                known = ", ".join(sorted(self.values)[:20]) or "none"
                raise ExpressionError(
                    f"unknown name {node.id!r} at {self._where(node)}: every name must be a key "
                    f"of `values` (given: {known}){hint}",
                    column=self._column(node),
                )
            return []
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY_OPS:
                symbol = _REFUSED_OPERATORS.get(type(node.op), type(node.op).__name__)
                self._refuse(node, f"the operator {symbol} is not allowed; use + - * / ** @")
            return [node.left, node.right]
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub | ast.UAdd):
                symbol = _REFUSED_OPERATORS.get(type(node.op), type(node.op).__name__)
                self._refuse(node, f"the operator {symbol} is not allowed; unary - and + are")
            return [node.operand]
        if isinstance(node, ast.Call):
            return self._check_call(node)
        self._refuse(node, _REFUSED.get(type(node), "this syntax is not allowed"))

    def _check_call(self, node: ast.Call) -> list[ast.expr]:
        if not isinstance(node.func, ast.Name):
            self._refuse(node.func, "only catalogue ops can be called, by name (exp(a), max(a, b))")
        name = node.func.id
        op = OPS.get(name)
        if op is None:
            known = ", ".join(OPS)
            raise ExpressionError(
                f"unknown function {name!r} at {self._where(node.func)}: the ops are {known}",
                column=self._column(node.func),
            )
        if node.keywords:
            self._refuse(
                node.keywords[0],
                "keyword arguments are not allowed (op attributes need the graph body)",
            )
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self._refuse(arg, "starred arguments are not allowed")
        if len(node.args) != op.arity:
            raise ExpressionError(
                f"{name} takes {op.arity} argument(s), got {len(node.args)}: "
                f"{self._segment(node)!r} at {self._where(node)}",
                column=self._column(node),
            )
        return list(node.args)

    def _emit(self, node: ast.expr, ids: Mapping[int, str]) -> str:
        """The node id of a checked sub-expression whose operands already have ids."""
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd):
            return ids[id(node.operand)]
        if isinstance(node, ast.Constant):
            number = node.value
            assert isinstance(number, int | float)  # _check refused every other constant
            text = repr(number)
            return self._node(node, ("const", text), "const", (), text, _to_float(number))
        operands: tuple[str, ...]
        if isinstance(node, ast.BinOp):
            op = _BINARY_OPS[type(node.op)]
            operands = (ids[id(node.left)], ids[id(node.right)])
        elif isinstance(node, ast.UnaryOp):
            op, operands = "neg", (ids[id(node.operand)],)
        else:
            assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            op, operands = node.func.id, tuple(ids[id(arg)] for arg in node.args)
        return self._node(node, (op, operands), op, operands, self._text(node), None)

    def _node(
        self,
        node: ast.expr,
        key: tuple[Any, ...],
        op: str,
        operands: tuple[str, ...],
        text: str | None,
        value: float | None,
    ) -> str:
        existing = self.shared.get(key)
        if existing is not None:
            return existing
        self.created += 1
        if self.max_nodes and len(self.nodes) >= self.max_nodes:
            raise LimitError(
                f"the expression makes more than {self.max_nodes} nodes; the limit "
                f"max_nodes is {self.max_nodes}",
                limit="max_nodes",
                value=self.max_nodes,
                loc=LOC,
            )
        node_id = text if text is not None and text not in self.used else self._fallback()
        self.used.add(node_id)
        self.shared[key] = node_id
        leaf = None if value is None else np.asarray(value, dtype=np.float64)
        self.nodes.append(NodeSpec(node_id, op, operands, value=leaf, loc=LOC))
        return node_id

    def _fallback(self) -> str:
        node_id = f"t{self.created}"
        while node_id in self.used:
            node_id += "_"
        return node_id

    # --- source positions -------------------------------------------------------------

    def _offset(self, node: Positioned) -> int:
        return self.starts[node.lineno - 1] + node.col_offset

    def _column(self, node: Positioned) -> int:
        return self._offset(node) + 1

    def _where(self, node: Positioned) -> str:
        return f"column {self._column(node)}"

    def _span(self, node: Positioned) -> tuple[int, int]:
        start = self._offset(node)
        end_line, end_col = node.end_lineno, node.end_col_offset
        end = self.starts[end_line - 1] + end_col if end_line and end_col is not None else start
        return start, end

    def _segment(self, node: Positioned) -> str:
        """The part of the source at fault, shortened for messages."""
        start, end = self._span(node)
        text = self.source[start:end]
        return text if len(text) <= 80 else text[:77] + "..."

    def _text(self, node: ast.expr) -> str | None:
        """The normalised source text, or None when it would be longer than MAX_TEXT_ID.
        Only short spans are unparsed, so the cost per node is bounded."""
        start, end = self._span(node)
        if end - start > 2 * MAX_TEXT_ID:
            return None
        text = ast.unparse(node)
        return text if len(text) <= MAX_TEXT_ID else None

    def _refuse(self, node: Positioned, why: str) -> NoReturn:
        raise ExpressionError(
            f"{self._segment(node)!r} at {self._where(node)}: {why}", column=self._column(node)
        )


def _constant_kind(value: object) -> str:
    if isinstance(value, str):
        return "strings"
    if isinstance(value, bytes):
        return "bytes"
    if value is None:
        return "None values"
    if isinstance(value, complex):
        return "complex numbers"
    return "constants of this kind"


def _to_float(value: int | float) -> float:
    """A literal as float64 without Python big-number arithmetic: a huge int is Infinity."""
    try:
        return float(value)
    except OverflowError:
        return math.inf
