"""Expression node ids: the front end builds each node's text bottom-up from its operands'
texts; these tests hold it to `ast.unparse`, which defined the ids before (docs/expressions.md),
and hold the cheap nesting pre-check to the exact scan it short-cuts."""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradiag.engine import expression
from gradiag.engine.errors import LimitError
from gradiag.engine.expression import MAX_TEXT_ID, ExpressionError, parse_expression
from gradiag.engine.ops import Array

PROPERTY = settings(
    max_examples=150,
    derandomize=True,  # the same examples every run, like tests/test_fuzz.py
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
NAMES = ["a", "b", "x1", "w_0", "v" * (MAX_TEXT_ID + 1)]  # the last is too long to be in a text
LITERALS = [
    *["0", "00", "7", "10", "1_000", "0x1F", "0o17", "0b101", "9" * 70],
    *["2.", ".5", "0.1", "0.0", "3.14159", "1e-5", "1E5", "1e20", "1.5e+3", "1_0.0_1"],
    *["1e999", "5e-324", "1.7976931348623157e308", "123456789.123456789"],
]
CALLS = {"exp": 1, "sigmoid": 1, "max": 2, "mse": 2, "affine": 3}
BINARY = ["+", "-", "*", "/", "**", "@"]
# Keys of `values` that collide with likely texts or fallback ids, so `t<k>_` is exercised.
COLLIDING_KEYS = ["a + b", "-a", "a * b", "exp(a)", "t1", "t2", "t3", "t1_", "t4"]


# --- the oracle: the naming rules as they were, with ast.unparse per node --------------

OLD_BINARY_OPS = {
    ast.Add: "add",
    ast.Sub: "sub",
    ast.Mult: "mul",
    ast.Div: "div",
    ast.Pow: "pow",
    ast.MatMult: "matmul",
}


def old_program(source: str, values: Mapping[str, Array]) -> tuple[list[Any], str]:
    """(id, op, inputs, value) per node and the output id, named as before texts were built
    bottom-up: ast.unparse of each op node, None past MAX_TEXT_ID characters or a source
    span of twice that. Recursive, which is fine for the small trees drawn here."""
    limit = expression.MAX_TEXT_ID  # read at call time: some tests raise it
    lines = source.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    nodes: list[Any] = [(name, "input", (), value) for name, value in values.items()]
    used = set(values)
    shared: dict[Any, str] = {}
    created = 0

    def text_of(node: ast.expr) -> str | None:
        assert node.end_lineno is not None and node.end_col_offset is not None
        start = starts[node.lineno - 1] + node.col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        if end - start > 2 * limit:
            return None
        text = ast.unparse(node)
        return text if len(text) <= limit else None

    def make(key: Any, op: str, inputs: Any, text: str | None, value: Any) -> str:
        nonlocal created
        if key in shared:
            return shared[key]
        created += 1
        node_id = text if text is not None and text not in used else f"t{created}"
        while node_id in used:
            node_id += "_"
        used.add(node_id)
        shared[key] = node_id
        nodes.append((node_id, op, inputs, value))
        return node_id

    def emit(node: ast.expr) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Constant):
            literal = repr(node.value)
            try:
                number = float(node.value)
            except OverflowError:
                number = math.inf
            return make(("const", literal), "const", (), literal, number)
        if isinstance(node, ast.UnaryOp):
            operand = emit(node.operand)
            if isinstance(node.op, ast.UAdd):
                return operand
            return make(("neg", (operand,)), "neg", (operand,), text_of(node), None)
        if isinstance(node, ast.BinOp):
            op = OLD_BINARY_OPS[type(node.op)]
            inputs = (emit(node.left), emit(node.right))
            return make((op, inputs), op, inputs, text_of(node), None)
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        inputs = tuple(emit(arg) for arg in node.args)
        return make((node.func.id, inputs), node.func.id, inputs, text_of(node), None)

    output = emit(ast.parse(source, mode="eval").body)
    return nodes, output


def new_program(source: str, values: Mapping[str, Array]) -> tuple[list[Any], str]:
    parsed = parse_expression(source, values)
    nodes: list[Any] = []
    for node in parsed.nodes:
        value: Any = node.value
        if node.op == "const":
            assert value is not None and value.dtype == np.float64 and value.shape == ()
            value = float(value)
        nodes.append((node.id, node.op, node.inputs, value))
    return nodes, parsed.output


# --- random expressions: a tree, then text with random spacing and redundant brackets ---


def trees(unary_plus: bool = True) -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.tuples(st.just("name"), st.sampled_from(NAMES[:-1] * 6 + NAMES[-1:])),
        st.tuples(st.just("number"), st.sampled_from(LITERALS)),
    )
    signs = ["-", "+"] if unary_plus else ["-"]

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        calls = st.sampled_from(sorted(CALLS)).flatmap(
            lambda name: st.tuples(
                st.just("call"),
                st.just(name),
                st.lists(children, min_size=CALLS[name], max_size=CALLS[name]),
            )
        )
        return st.one_of(
            st.tuples(st.just("unary"), st.sampled_from(signs), children),
            st.tuples(st.just("binary"), st.sampled_from(BINARY), children, children),
            calls,
        )

    return st.recursive(leaves, extend, max_leaves=14)


@st.composite
def sources(draw: st.DrawFn, unary_plus: bool = True) -> str:
    """A drawn tree as text. Brackets around an operand are sometimes left out, so the
    parser may build another tree than the one drawn; any valid text is a fair test."""
    return render(draw, draw(trees(unary_plus)), bracketed=False)


def render(draw: st.DrawFn, tree: Any, *, bracketed: bool) -> str:
    kind = tree[0]
    if kind in ("name", "number"):
        text = str(tree[1])
    elif kind == "unary":
        text = tree[1] + gap(draw, bracketed) + operand(draw, tree[2], bracketed)
    elif kind == "binary":
        left = operand(draw, tree[2], bracketed)
        right = operand(draw, tree[3], bracketed)
        text = left + gap(draw, bracketed) + tree[1] + gap(draw, bracketed) + right
    else:
        args = [render(draw, arg, bracketed=True) for arg in tree[2]]
        text = tree[1] + "(" + gap(draw, True) + ("," + gap(draw, True)).join(args) + ")"
    if draw(st.integers(0, 6)) == 0:  # a redundant pair of brackets
        text = "(" + gap(draw, True) + text + gap(draw, True) + ")"
    return text


def operand(draw: st.DrawFn, tree: Any, bracketed: bool) -> str:
    if tree[0] in ("name", "number", "call") or draw(st.integers(0, 4)) == 0:
        return render(draw, tree, bracketed=bracketed)
    return "(" + render(draw, tree, bracketed=True) + ")"


def gap(draw: st.DrawFn, bracketed: bool) -> str:
    """Whitespace between tokens: a newline only inside brackets, and now and then wide
    enough that a short text spans more than 2 * MAX_TEXT_ID characters of source."""
    spaces = ["", " ", "  ", "\t"] + (["\n", " \n  "] if bracketed else [])
    text = draw(st.sampled_from(spaces))
    if draw(st.integers(0, 40)) == 0:
        text += " " * (2 * MAX_TEXT_ID)
    return text


def values_for(source: str, extra_keys: list[str]) -> dict[str, Array]:
    values = {name: np.asarray(float(k)) for k, name in enumerate(NAMES) if name in source}
    for key in extra_keys:
        values.setdefault(key, np.asarray(-1.0))
    return values


# --- properties -----------------------------------------------------------------------


@PROPERTY
@given(source=sources(), extra_keys=st.lists(st.sampled_from(COLLIDING_KEYS), max_size=4))
def test_random_expressions_give_the_program_the_old_naming_gave(
    source: str, extra_keys: list[str]
) -> None:
    """Ids (texts, t<k> fallbacks, sharing), ops, operands and values all match."""
    values = values_for(source, extra_keys)
    assert new_program(source, values) == old_program(source, values)


@PROPERTY
@given(source=sources())
def test_random_expressions_with_no_length_limit_name_every_node_in_full(source: str) -> None:
    """With MAX_TEXT_ID raised, every text is an id, so each one is checked in full."""
    values = values_for(source, [])
    with mock.patch.object(expression, "MAX_TEXT_ID", 100_000):
        assert new_program(source, values) == old_program(source, values)


@PROPERTY
@given(source=sources(unary_plus=False))
def test_every_op_node_id_is_ast_unparse_of_its_subexpression(source: str) -> None:
    """Without unary + (which shares a node between `+a * b` and `a * b`) and with no
    length limit, the op nodes' ids are exactly the unparsed op sub-expressions."""
    values = values_for(source, [])
    tree = ast.parse(source, mode="eval").body
    operations = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp | ast.UnaryOp | ast.Call)]
    with mock.patch.object(expression, "MAX_TEXT_ID", 100_000):
        parsed = parse_expression(source, values)
    op_ids = {node.id for node in parsed.nodes if node.op not in ("input", "const")}
    assert op_ids == {ast.unparse(n) for n in operations}
    if operations:
        assert parsed.output == ast.unparse(tree)


# --- corners, spelled out -------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "output"),
    [
        ("a - (b - c)", "a - (b - c)"),
        ("(a - b) - c", "a - b - c"),
        ("(a + b) * c", "(a + b) * c"),
        ("a * (b * c)", "a * (b * c)"),
        ("a / (b / c)", "a / (b / c)"),
        ("(a @ b) @ c", "a @ b @ c"),
        ("a @ (b + c)", "a @ (b + c)"),
        ("-a ** 2", "-a ** 2"),
        ("(-a) ** 2", "(-a) ** 2"),
        ("-(a ** 2)", "-a ** 2"),
        ("2 ** -1", "2 ** (-1)"),
        ("a ** b ** c", "a ** b ** c"),
        ("(a ** b) ** c", "(a ** b) ** c"),
        ("-(a + b)", "-(a + b)"),
        ("- - a", "--a"),
        ("-(+a)", "-+a"),
        ("+a * b", "+a * b"),
        ("a * -b", "a * -b"),
        ("-a * b", "-a * b"),
        ("exp(a + b) * c", "exp(a + b) * c"),
        ("max( (a) ,b ** -c )", "max(a, b ** (-c))"),
        ("affine(a, b, c)", "affine(a, b, c)"),
        ("1e-5 * a", "1e-05 * a"),
        ("0.1 + a", "0.1 + a"),
        ("1e20 * a", "1e+20 * a"),
        ("2. * a", "2.0 * a"),
        ("0x10 * a", "16 * a"),
        ("-1 * a", "-1 * a"),
        ("1e999 * a", "1e309 * a"),
        ("(a +\n b) * c", "(a + b) * c"),
    ],
)
def test_corner_texts_match_ast_unparse(source: str, output: str) -> None:
    assert ast.unparse(ast.parse(source, mode="eval")) == output  # the spec, restated
    values = {name: np.asarray(1.0) for name in "abc"}
    assert parse_expression(source, values).output == output


def test_a_short_text_from_a_wide_span_still_falls_back_to_a_t_id() -> None:
    """The old span rule (more than 2 * MAX_TEXT_ID characters of source) decides ids."""
    values = {"a": np.asarray(1.0), "b": np.asarray(2.0)}
    wide = "(a" + " " * (2 * MAX_TEXT_ID) + "+ b) * a"
    assert [node.id for node in parse_expression(wide, values).nodes] == ["a", "b", "t1", "t2"]
    assert parse_expression("(a + b) * a", values).output == "(a + b) * a"


def test_an_integer_too_long_to_print_is_refused_with_its_column() -> None:
    source = "x * 0x" + "f" * 4_000  # past sys.get_int_max_str_digits() in decimal
    with pytest.raises(ExpressionError) as err:
        parse_expression(source, {"x": np.ones(())})
    assert err.value.column == 5 and "too many digits" in err.value.message


# --- the nesting pre-check against the exact scan -------------------------------------


def outcome(check: Any, source: str, max_nesting: int) -> str | None:
    try:
        check(source, max_nesting)
    except LimitError as err:
        return err.message
    return None


@settings(max_examples=500, derandomize=True, deadline=None)
@given(
    source=st.text(alphabet="()[]{}-+~ \t\n\x0b\x1cx1*", min_size=1, max_size=40).filter(str.strip),
    max_nesting=st.integers(0, 6),
)
def test_the_nesting_pre_check_refuses_exactly_what_the_full_scan_refuses(
    source: str, max_nesting: int
) -> None:
    def checked(text: str, limit: int) -> None:
        expression._check_text(text, 10_000, limit)

    # the exact scan alone (no pre-check) is the oracle: every text it refuses, the checks
    # refuse with the same message, and they refuse nothing else
    assert outcome(checked, source, max_nesting) == outcome(
        expression._scan_nesting, source, max_nesting
    )
