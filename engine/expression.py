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
- any other sub-expression is a node whose id is its normalised text, exactly as
  `ast.unparse` prints it (`(x+y)*z` gives `"(x + y) * z"`); when that text is longer than
  `MAX_TEXT_ID` characters, or spans more than twice that in the source, or already names
  another node, the id is `t<k>`, k the node's 1-based position in creation order
  (post-order, left to right), with `_` appended until it is free;
- identical sub-expressions share one node (hash-consing on op and operand ids), so fan-out
  is visible: in `(a + b) * (a + b)` the node `a + b` is used twice and its gradient is the
  sum of both paths. Unary `+` makes no node.

Cost is bounded before parsing: the length (`max_chars`), the bracket depth and runs of
unary operators (`max_nesting`) are checked on the text (a C-speed count and regex first;
the exact pass that finds the column only when the limit may be hit), because `ast.parse`
itself raises RecursionError or MemoryError on deeply nested input; those and SyntaxError
are caught and refused as well. The walk is iterative, and each node's text is built once
from its operands' texts (ast.unparse's rules for this small grammar), so naming costs
O(text) per node rather than a re-walk of the subtree.
"""

from __future__ import annotations

import ast
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, ClassVar, NamedTuple, NoReturn

import numpy as np

from gradiag.engine.compiler import NodeSpec
from gradiag.engine.errors import EngineError, LimitError
from gradiag.engine.ops import OPS, Array

MAX_TEXT_ID = 60
DEFAULT_MAX_CHARS = 10_000
DEFAULT_MAX_NESTING = 100
LOC = ("expression",)
Positioned = ast.expr | ast.keyword

# How tightly each form binds, as ast.unparse ranks them (ast._Precedence, the forms this
# grammar allows): unparse parenthesises an operand that binds less tightly than its slot
# needs, so `(a + b) * c`, `a - (b - c)`, `(-x) ** 2` but `-x ** 2`, and `2 ** (-1)`.
_ANY_SLOT = 0  # a call's argument: never parenthesised
_ARITH = 1  # + -
_TERM = 2  # * / @
_FACTOR = 3  # unary - +
_POWER = 4  # **
_ABOVE_POWER = 5  # the left slot of ** (ast's AWAIT): `(a ** b) ** c`
_ATOM = 6  # names, numbers, calls

# unparse writes an infinite float (a literal such as 1e999) as this overflowing literal
_INFINITY_TEXT = "1e" + repr(sys.float_info.max_10_exp + 1)


class _Binary(NamedTuple):
    op: str  # the catalogue op
    symbol: str
    binds: int
    left_needs: int
    right_needs: int


def _left_associative(op: str, symbol: str, binds: int) -> _Binary:
    return _Binary(op, symbol, binds, binds, binds + 1)  # a - (b - c), but a - b - c


_BINARY_OPS: dict[type[ast.operator], _Binary] = {
    ast.Add: _left_associative("add", "+", _ARITH),
    ast.Sub: _left_associative("sub", "-", _ARITH),
    ast.Mult: _left_associative("mul", "*", _TERM),
    ast.Div: _left_associative("div", "/", _TERM),
    ast.MatMult: _left_associative("matmul", "@", _TERM),
    ast.Pow: _Binary("pow", "**", _POWER, _ABOVE_POWER, _POWER),  # a ** b ** c
}
_UNARY_SYMBOLS: dict[type[ast.unaryop], str] = {ast.USub: "-", ast.UAdd: "+"}

# A finished sub-expression: its node id, its text and how tightly it binds. The text is
# None when it cannot name a node (too long, or from too wide a span); then no enclosing
# text can either, as it contains this text and its span contains this span.
_Done = tuple[str, str | None, int]

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
    if _may_nest_too_deep(source, max_nesting):
        _scan_nesting(source, max_nesting)


def _scan_nesting(source: str, max_nesting: int) -> None:
    """The exact check, character by character, so the error names the column."""
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


def _may_nest_too_deep(source: str, max_nesting: int) -> bool:
    """False when the text provably stays within the limit, found by C-speed counting and
    one regex search instead of a Python loop over every character; only a text that may
    be too deep pays for the exact scan that finds the column."""
    opening = source.count("(") + source.count("[") + source.count("{")
    return opening > max_nesting or _unary_run(max_nesting).search(source) is not None


@cache
def _unary_run(max_nesting: int) -> re.Pattern[str]:
    """More than `max_nesting` unary operators with nothing between them that ends a run
    in the exact scan (only spaces and closing brackets)."""
    return re.compile(rf"(?:[-+~][\s)\]}}]*){{{max_nesting + 1}}}")


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
        # A span is never longer than the whole text, so a short text skips the span rule.
        self.spans_matter = len(source) > 2 * MAX_TEXT_ID
        self.values = values
        self.max_nodes = max_nodes
        self.nodes = [
            NodeSpec(name, "input", value=value, loc=("values", name))
            for name, value in values.items()
        ]
        self.used: set[str] = set(values)
        self.shared: dict[tuple[Any, ...], str] = {}
        self.created = 0

    @cached_property
    def starts(self) -> list[int]:
        """The offset of each line's first character (only errors and long texts ask)."""
        starts = [0]
        for line in self.source.split("\n")[:-1]:
            starts.append(starts[-1] + len(line) + 1)
        return starts

    def build(self, root: ast.expr) -> Expression:
        """Post-order over the tree with an explicit stack; children are checked when
        their parent is first seen, so the first error reported is the outermost one.
        A stack entry is (node, -1) before its check, then (node, number of operands);
        finished operands wait on `done`, in order, until their parent takes them."""
        done: list[_Done] = []
        stack: list[tuple[ast.expr, int]] = [(root, -1)]
        while stack:
            node, waiting = stack.pop()
            operands: Sequence[_Done] = ()
            if waiting < 0:
                children = self._check(node)
                if children:
                    stack.append((node, len(children)))
                    for child in reversed(children):
                        stack.append((child, -1))
                    continue
            else:
                operands = done[-waiting:]
                del done[-waiting:]
            done.append(self._FINISH[type(node)](self, node, operands))
        return Expression(self.nodes, done[-1][0])

    # --- checks: refuse anything off the whitelist, return the operands to walk ----------

    def _check(self, node: ast.expr) -> Sequence[ast.expr]:
        check = self._CHECK.get(type(node))
        if check is None:
            self._refuse(node, _REFUSED.get(type(node), "this syntax is not allowed"))
        return check(self, node)

    def _check_constant(self, node: ast.Constant) -> Sequence[ast.expr]:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "booleans" if isinstance(value, bool) else _constant_kind(value)
            self._refuse(node, f"{kind} are not allowed; numbers are")
        return ()

    def _check_name(self, node: ast.Name) -> Sequence[ast.expr]:
        if node.id not in self.values:
            hint = f" ({node.id} is an op: call it as {node.id}(...))" if node.id in OPS else ""
            known = ", ".join(sorted(self.values)[:20]) or "none"
            raise ExpressionError(
                f"unknown name {node.id!r} at {self._where(node)}: every name must be a key "
                f"of `values` (given: {known}){hint}",
                column=self._column(node),
            )
        return ()

    def _check_binary(self, node: ast.BinOp) -> Sequence[ast.expr]:
        if type(node.op) not in _BINARY_OPS:
            symbol = _REFUSED_OPERATORS.get(type(node.op), type(node.op).__name__)
            self._refuse(node, f"the operator {symbol} is not allowed; use + - * / ** @")
        return (node.left, node.right)

    def _check_unary(self, node: ast.UnaryOp) -> Sequence[ast.expr]:
        if type(node.op) not in _UNARY_SYMBOLS:
            symbol = _REFUSED_OPERATORS.get(type(node.op), type(node.op).__name__)
            self._refuse(node, f"the operator {symbol} is not allowed; unary - and + are")
        return (node.operand,)

    def _check_call(self, node: ast.Call) -> Sequence[ast.expr]:
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
        return node.args

    # --- finishing: a checked node whose operands are done becomes a node id and a text ---

    def _finish_constant(self, node: ast.Constant, _: Sequence[_Done]) -> _Done:
        number = node.value
        assert isinstance(number, int | float)  # _check_constant refused every other constant
        try:
            literal = repr(number)
        except ValueError:  # an int past sys.get_int_max_str_digits(), e.g. a long hex literal
            self._refuse(node, "this integer has too many digits; write a float such as 1e400")
        node_id = self._node(("const", literal), "const", (), literal, _to_float(number))
        text = _INFINITY_TEXT if literal == "inf" else literal
        return node_id, self._short(node, text), _ATOM

    def _finish_name(self, node: ast.Name, _: Sequence[_Done]) -> _Done:
        name = node.id
        return name, name if len(name) <= MAX_TEXT_ID else None, _ATOM

    def _finish_binary(self, node: ast.BinOp, operands: Sequence[_Done]) -> _Done:
        form = _BINARY_OPS[type(node.op)]
        texts = _in_slots(operands, (form.left_needs, form.right_needs))
        text = None if texts is None else self._short(node, f"{texts[0]} {form.symbol} {texts[1]}")
        return self._op_node(form.op, operands, text), text, form.binds

    def _finish_unary(self, node: ast.UnaryOp, operands: Sequence[_Done]) -> _Done:
        symbol = _UNARY_SYMBOLS[type(node.op)]
        texts = _in_slots(operands, (_FACTOR,))
        text = None if texts is None else self._short(node, symbol + texts[0])
        if symbol == "+":  # unary + makes no node, but its parent's text still shows it
            return operands[0][0], text, _FACTOR
        return self._op_node("neg", operands, text), text, _FACTOR

    def _finish_call(self, node: ast.Call, operands: Sequence[_Done]) -> _Done:
        assert isinstance(node.func, ast.Name)  # _check_call refused every other callee
        name = node.func.id
        texts = _in_slots(operands, (_ANY_SLOT,) * len(operands))
        text = None if texts is None else self._short(node, f"{name}({', '.join(texts)})")
        return self._op_node(name, operands, text), text, _ATOM

    _CHECK: ClassVar[dict[type[ast.expr], Callable[[_Builder, Any], Sequence[ast.expr]]]] = {
        ast.Constant: _check_constant,
        ast.Name: _check_name,
        ast.BinOp: _check_binary,
        ast.UnaryOp: _check_unary,
        ast.Call: _check_call,
    }
    _FINISH: ClassVar[dict[type[ast.expr], Callable[[_Builder, Any, Sequence[_Done]], _Done]]] = {
        ast.Constant: _finish_constant,
        ast.Name: _finish_name,
        ast.BinOp: _finish_binary,
        ast.UnaryOp: _finish_unary,
        ast.Call: _finish_call,
    }

    def _short(self, node: ast.expr, text: str) -> str | None:
        """`text` when it can name a node: at most MAX_TEXT_ID characters, from a source span
        of at most twice that. (The span rule once bounded the cost of ast.unparse; it
        stays because it decides ids, e.g. `(x + <200 spaces> y)` is named `t1`.)"""
        if len(text) > MAX_TEXT_ID:
            return None
        if self.spans_matter:
            start, end = self._span(node)
            if end - start > 2 * MAX_TEXT_ID:
                return None
        return text

    def _op_node(self, op: str, operands: Sequence[_Done], text: str | None) -> str:
        inputs = tuple([operand[0] for operand in operands])
        return self._node((op, inputs), op, inputs, text, None)

    def _node(
        self,
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

    def _refuse(self, node: Positioned, why: str) -> NoReturn:
        raise ExpressionError(
            f"{self._segment(node)!r} at {self._where(node)}: {why}", column=self._column(node)
        )


def _in_slots(operands: Sequence[_Done], needs: Sequence[int]) -> list[str] | None:
    """The operands' texts as ast.unparse writes them in slots that need these binding
    strengths (parenthesised when they bind less tightly), or None when one is too long."""
    texts = []
    for (_, text, binds), need in zip(operands, needs, strict=True):
        if text is None:
            return None
        texts.append(f"({text})" if binds < need else text)
    return texts


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
