"""The packed columns body over HTTP: a column as a little-endian binary array in base64
(`{"dtype", "base64"}`), the op column as a legend and codes, and `encoding: "packed"`
answers. A packed request gives exactly the list request's answer (per-node and level
batched, hypothesis tables included), a packed answer decodes to exactly the list answer's
numbers (non-finite ones and const rows included), every bad packed column is a 422 at its
field (never a 500), `gradiag check` counts packed rows, and the OpenAPI document lists it."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from test_columns import (
    CIRCUIT,
    CIRCUIT_GRADS,
    CIRCUIT_VALUES,
    NEURON,
    NEURON_GRADS,
    first_error,
    ok,
    post,
    random_table,
    table,
)

from gradiag.client.packed import pack, unpack
from gradiag.service import create_app
from gradiag.service.cli import main
from gradiag.service.config import Settings
from gradiag.service.packed import b64decode

# --- helpers -----------------------------------------------------------------------------


def packed(column: list[Any], dtype: str) -> dict[str, str]:
    """A column as the wire's PackedArray: null and the non-finite strings read as floats
    ("NaN", "Infinity" and "-Infinity" are Python's own spellings)."""
    numbers = [math.nan if v is None else float(v) if isinstance(v, str) else v for v in column]
    data = np.array(numbers, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"dtype": dtype, "base64": base64.b64encode(data).decode("ascii")}


def raw(data: bytes, dtype: str) -> dict[str, str]:
    return {"dtype": dtype, "base64": base64.b64encode(data).decode("ascii")}


def wire(numbers: np.ndarray) -> list[Any]:
    """Floats as the list answer writes them: non-finite ones as their strings."""
    names = {math.inf: "Infinity", -math.inf: "-Infinity"}
    return [x if math.isfinite(x) else "NaN" if math.isnan(x) else names[x] for x in numbers]


def legend(ops: list[str]) -> tuple[list[str], list[int]]:
    """Names in reverse order of first appearance, the first one listed twice and its rows
    alternating between both codes (a name listed twice is one op): the server must number
    the ops as it numbers the op list."""
    names = list(dict.fromkeys(ops))[::-1]
    names.append(names[0])
    twice = len(names) - 1
    return names, [
        twice if op == names[0] and i % 2 else names.index(op) for i, op in enumerate(ops)
    ]


def pack_table(
    columns: dict[str, Any],
    *,
    op: str | None = "uint8",
    inputs: tuple[str | None, ...] = ("int32", "int32", "int32"),
    value: str | None = "float64",
) -> dict[str, Any]:
    """The table with its op codes, each inputs list and its value column packed in the
    given dtypes (None: left a list; op "list": a legend with list codes)."""
    out = dict(columns)
    if op is not None:
        names, codes = legend(columns["op"])
        out["op"] = {"names": names, "codes": codes if op == "list" else packed(codes, op)}
    out["inputs"] = [
        row if dtype is None else packed(row, dtype)
        for row, dtype in zip(columns["inputs"], inputs, strict=False)
    ]
    if value is not None:
        out["value"] = packed(columns["value"], value)
    return out


def decoded(answer: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """A packed answer's value and grad columns, as the list answer writes them."""
    value, grad = (answer["columns"][name] for name in ("value", "grad"))
    assert value["dtype"] == grad["dtype"] == "float64"
    return wire(unpack(value)), wire(unpack(grad))


def padded_circuit(chain: int) -> dict[str, Any]:
    """f = (x + y) * z, then a const 1 and `chain` rows alternating identity(prev) and
    prev * 1: every value after f is -12, every gradient along the chain 1."""
    ops = [*CIRCUIT["op"], "const"]
    first, second = ([*r, -1] for r in CIRCUIT["inputs"])
    one = len(ops) - 1
    for k in range(chain):
        prev = one - 1 if k == 0 else len(ops) - 1
        ops.append("identity" if k % 2 else "mul")
        first.append(prev)
        second.append(-1 if k % 2 else one)
    return {
        "op": ops,
        "inputs": [first, second],
        "value": [*CIRCUIT["value"], 1.0, *[None] * chain],
    }


NONFINITE = {  # exp(1000) = inf; inf * 2 = inf; inf + NaN = NaN; a NaN leaf; const 2
    "op": ["input", "exp", "const", "mul", "input", "add", "neg"],
    "inputs": [[-1, 0, -1, 1, -1, 3, 5], [-1, -1, -1, 2, -1, 4, -1]],
    "value": [1000.0, None, 2.0, None, "NaN", None, None],
    "id": ["x", "e", "two", "m", "n", "s", "f"],
}

PADDED = padded_circuit(300)
BIG_RANDOM, BIG_RANDOM_OUTPUT, _ = random_table(1, 700, safe=False)  # infinities and NaNs
GRAPHS = {
    "circuit": {"columns": CIRCUIT},
    "neuron": {"columns": NEURON, "gradcheck": True, "explain": True},
    "nonfinite": {"columns": NONFINITE},
    "padded circuit": {"columns": PADDED},
    "random 700": {
        "columns": BIG_RANDOM,
        "output": BIG_RANDOM_OUTPUT,
        "thresholds": {"dead_warn": 0},
    },
}
PACKINGS = {
    "all packed": {},
    "narrow dtypes": {"op": "int8", "inputs": ("int16", "int16"), "value": "float64"},
    "wide dtypes": {"op": "int64", "inputs": ("int64", "int64"), "value": "float64"},
    "legend with list codes": {"op": "list", "inputs": (None, None), "value": None},
    "mixed": {"op": None, "inputs": ("int64", None), "value": "float64"},
    "value only": {"op": None, "inputs": (None, None)},
}


# --- 1. a packed request: the list request's answer, exactly --------------------------------


@pytest.mark.parametrize("packing", PACKINGS.values(), ids=PACKINGS.keys())
@pytest.mark.parametrize("body", GRAPHS.values(), ids=GRAPHS.keys())
def test_a_packed_request_gives_the_list_answer(
    client: FlaskClient, body: dict[str, Any], packing: dict[str, Any]
) -> None:
    expected = ok(post(client, body))
    packed_body = {**body, "columns": pack_table(body["columns"], **packing)}
    answer = ok(post(client, packed_body))
    assert answer == expected  # values, grads (bit for bit), findings, health, gradcheck


def test_float32_and_narrow_codes_read_as_their_numbers(client: FlaskClient) -> None:
    # the neuron's leaves are small integers: float32 holds them exactly
    columns = pack_table(NEURON, op="uint16", inputs=("int8", "int16"), value="float32")
    answer = ok(post(client, {"columns": columns}))
    assert answer == ok(post(client, {"columns": NEURON}))
    assert answer["output"]["value"] == pytest.approx(0.7311, abs=1e-4)
    grads = dict(zip(NEURON["id"], answer["columns"]["grad"], strict=True))
    assert {k: grads[k] for k in NEURON_GRADS} == pytest.approx(NEURON_GRADS, abs=1e-3)
    assert grads["one"] is None  # the const


def test_the_circuit_packed_in_and_out(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": pack_table(CIRCUIT), "encoding": "packed"}))
    assert answer["output"] == {"id": "4", "value": -12.0, "shape": []}
    assert set(answer["columns"]) == {"value", "grad"}  # no id column in, none out
    assert unpack(answer["columns"]["value"]).tolist() == CIRCUIT_VALUES
    assert unpack(answer["columns"]["grad"]).tolist() == CIRCUIT_GRADS


def test_the_padded_circuit_packed_in_and_out(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": pack_table(PADDED), "encoding": "packed"}))
    value = unpack(answer["columns"]["value"])
    grad = unpack(answer["columns"]["grad"])
    assert value.size == grad.size == len(PADDED["op"]) == 306
    assert value[:6].tolist() == [*CIRCUIT_VALUES, 1.0]
    assert (value[6:] == -12.0).all()
    assert grad[:5].tolist() == CIRCUIT_GRADS  # the chain multiplies f's gradient by 1s
    assert math.isnan(grad[5])  # the const 1
    assert (grad[6:] == 1.0).all()


# --- 2. a packed answer: the list answer's numbers -------------------------------------------


@pytest.mark.parametrize("body", GRAPHS.values(), ids=GRAPHS.keys())
def test_a_packed_answer_decodes_to_the_list_answer(
    client: FlaskClient, body: dict[str, Any]
) -> None:
    expected = ok(post(client, body))
    answer = ok(post(client, {**body, "encoding": "packed"}))
    values, grads = decoded(answer)
    assert values == expected["columns"]["value"]
    consts = [i for i, op in enumerate(body["columns"]["op"]) if op == "const"]
    assert all(grads[i] == "NaN" and expected["columns"]["grad"][i] is None for i in consts)
    assert [None if i in consts else g for i, g in enumerate(grads)] == expected["columns"]["grad"]
    assert {k: v for k, v in answer.items() if k != "columns"} == {
        k: v for k, v in expected.items() if k != "columns"
    }
    assert answer["columns"].get("id") == body["columns"].get("id")


def test_non_finite_numbers_in_a_packed_answer(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": pack_table(NONFINITE), "encoding": "packed"}))
    value, grad = decoded(answer)
    assert value == [1000.0, "Infinity", 2.0, "Infinity", "NaN", "NaN", "NaN"]
    # f = -s, s = m + n, m = e * 2, e = exp(x): df/dx = -2 exp(1000); the const's grad NaN
    assert grad == ["-Infinity", -2.0, "NaN", -1.0, -1.0, -1.0, 1.0]
    assert answer["diagnostics"]["nonfinite_nodes"] == ["x", "e", "m", "n", "s", "f"]
    assert answer["health"]["status"] == "fail"


def test_a_packed_nan_leaf_is_data(client: FlaskClient) -> None:
    # f = x * y with y NaN: a packed leaf may be NaN (only op rows must be)
    columns = {"op": ["input", "input", "mul"], "inputs": [[-1, -1, 0], [-1, -1, 1]]}
    columns["value"] = packed([3.0, math.nan, math.nan], "float64")
    answer = ok(post(client, {"columns": columns}))
    assert answer["columns"]["value"] == [3.0, "NaN", "NaN"]
    assert answer["columns"]["grad"] == ["NaN", 3.0, 1.0]


# --- 3. hypothesis: any small table packed is the same table ----------------------------------

UNARY = ["relu", "tanh", "sigmoid"]
BINARY = ["add", "mul"]
PROPERTY_CLIENT = create_app(Settings(), TESTING=True).test_client()


@st.composite
def small_packed_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a list body, the same table with a random choice of columns packed)."""
    leaves = draw(st.integers(1, 4))
    n = leaves + draw(st.integers(0, 30))
    ops: list[str] = []
    first: list[int] = []
    second: list[int] = []
    values: list[float | None] = []
    for i in range(n):
        if i < leaves:
            ops.append(draw(st.sampled_from(["input", "param", "const"])))
            values.append(draw(st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.5, 3.0, 40.0])))
            first.append(-1)
            second.append(-1)
            continue
        op = draw(st.sampled_from(UNARY + BINARY))
        ops.append(op)
        values.append(None)
        first.append(draw(st.integers(0, i - 1)))
        second.append(draw(st.integers(0, i - 1)) if op in BINARY else -1)
    columns = {"op": ops, "inputs": [first, second], "value": values}
    packing = {
        "op": draw(st.sampled_from([None, "list", "uint8", "int8", "int32", "uint32"])),
        "inputs": tuple(draw(st.sampled_from([None, "int8", "int16", "int64"])) for _ in "ab"),
        "value": draw(st.sampled_from([None, "float64", "float32"])),  # float32-exact values
    }
    body = {"columns": columns, "output": draw(st.integers(0, n - 1))}
    return body, {**body, "columns": pack_table(columns, **packing)}


@hypothesis_settings(max_examples=60, deadline=None)
@given(bodies=small_packed_bodies())
def test_small_tables_packed_equal_lists(bodies: tuple[dict[str, Any], dict[str, Any]]) -> None:
    lists, packed_body = bodies
    expected = ok(post(PROPERTY_CLIENT, lists))
    assert ok(post(PROPERTY_CLIENT, packed_body)) == expected
    answer = ok(post(PROPERTY_CLIENT, {**packed_body, "encoding": "packed"}))
    values, grads = decoded(answer)
    assert values == expected["columns"]["value"]
    consts = {i for i, op in enumerate(lists["columns"]["op"]) if op == "const"}
    assert [None if i in consts else g for i, g in enumerate(grads)] == expected["columns"]["grad"]


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=40),
    column=st.sampled_from(["value", "inputs", "codes"]),
    dtype=st.sampled_from(["float64", "float32", "int8", "int16", "int64", "uint8", "uint32"]),
)
def test_any_bytes_in_any_column_answer_200_or_422(data: bytes, column: str, dtype: str) -> None:
    columns = pack_table(CIRCUIT)
    if column == "value":
        columns["value"] = raw(data, dtype)
    elif column == "inputs":
        columns["inputs"] = [raw(data, dtype), columns["inputs"][1]]
    else:
        columns["op"] = {**columns["op"], "codes": raw(data, dtype)}
    response = post(PROPERTY_CLIENT, {"columns": columns})
    assert response.status_code in (200, 422), response.get_data(as_text=True)
    if response.status_code == 422:
        first_error(response)


# --- 4. every bad packed column is a 422 at its field -----------------------------------------

GOOD = pack_table(CIRCUIT)


def bad(**columns: Any) -> dict[str, Any]:
    return {**GOOD, **columns}


def codes(column: Any) -> dict[str, Any]:
    return {"names": GOOD["op"]["names"], "codes": column}


BAD_PACKED: list[tuple[str, dict[str, Any], list[Any]]] = [
    # base64 itself
    ("a character outside base64", bad(value={"dtype": "float64", "base64": "AAAA!AAA"}),
     ["columns", "value", "base64"]),
    ("missing padding", bad(inputs=[GOOD["inputs"][0], {"dtype": "int32", "base64": "AAA"}]),
     ["columns", "inputs", 1, "base64"]),
    ("a character outside ASCII", bad(op=codes({"dtype": "uint8", "base64": "AAé="})),
     ["columns", "op", "codes", "base64"]),
    ("url-safe alphabet", bad(value=raw(b"\xfb" * 40, "float64") | {"base64": "-_" * 20}),
     ["columns", "value", "base64"]),
    # bytes that are not whole elements
    ("4 bytes of float64", bad(value=raw(b"\0" * 44, "float64")), ["columns", "value", "base64"]),
    ("3 bytes of int16", bad(inputs=[raw(b"\0" * 11, "int16"), GOOD["inputs"][1]]),
     ["columns", "inputs", 0, "base64"]),
    # a dtype the column does not take
    ("float64 row numbers", bad(inputs=[packed([-1] * 5, "float64"), GOOD["inputs"][1]]),
     ["columns", "inputs", 0, "dtype"]),
    ("int64 values", bad(value=packed([1, 2, 3, 0, 0], "int64")), ["columns", "value", "dtype"]),
    ("float32 codes", bad(op=codes(packed([0] * 5, "float32"))),
     ["columns", "op", "codes", "dtype"]),
    ("uint64 codes", bad(op=codes(packed([0] * 5, "uint64"))),
     ["columns", "op", "codes", "dtype"]),
    ("no such dtype", bad(value={"dtype": "complex128", "base64": ""}),
     ["columns", "value", "dtype"]),
    ("big-endian name", bad(value={"dtype": ">f8", "base64": ""}), ["columns", "value", "dtype"]),
    ("no base64 member", bad(value={"dtype": "float64"}), ["columns", "value", "base64"]),
    ("an unknown member", bad(value={**GOOD["value"], "shape": [5]}),
     ["columns", "value", "shape"]),
    ("base64 as a list", bad(value={"dtype": "float64", "base64": [0]}),
     ["columns", "value", "base64"]),
    # the op legend and its codes
    ("a code past the legend", bad(op=codes(packed([0, 0, 0, 1, 4], "uint8"))),
     ["columns", "op", "codes", 4]),
    ("a negative packed code", bad(op=codes(packed([0, 0, -1, 1, 2], "int8"))),
     ["columns", "op", "codes", 2]),
    ("a negative list code", bad(op=codes([0, 0, 0, -1, 2])), ["columns", "op", "codes", 3]),
    ("a list code past the legend", bad(op=codes([0, 0, 0, 2, 7])),
     ["columns", "op", "codes", 4]),
    ("a code beyond int64", bad(op=codes([0, 0, 0, 2, 2**64])), ["columns", "op", "codes", 4]),
    ("an unknown name", bad(op={"names": ["input", "frob"], "codes": [0, 0, 0, 1, 1]}),
     ["columns", "op", "names", 1]),
    ("an empty legend", bad(op={"names": [], "codes": [0] * 5}), ["columns", "op", "names"]),
    ("no codes", bad(op={"names": ["input"]}), ["columns", "op", "codes"]),
    # the cells, as for lists
    ("an op row with a number", bad(value=packed([-2, 5, -4, 3, None], "float64")),
     ["columns", "value", 3]),
    ("an operand after its user", bad(inputs=[GOOD["inputs"][0], packed([-1, -1, -1, 1, 4],
                                                                        "int32")]),
     ["columns", "inputs", 1, 4]),
    ("a leaf with an operand", bad(inputs=[packed([1, -1, -1, 0, 3], "int8"), GOOD["inputs"][1]]),
     ["columns", "inputs"]),
    # lengths: every column against the op column
    ("a short packed value column", bad(value=packed([-2, 5, -4, None], "float64")),
     ["columns", "value"]),
    ("a long packed inputs list", bad(inputs=[packed([-1] * 6, "int32"), GOOD["inputs"][1]]),
     ["columns", "inputs", 0]),
    ("short packed codes", bad(op=codes(packed([0, 0, 0, 1], "uint8"))),
     ["columns", "inputs", 0]),
    ("no rows", {"op": codes(raw(b"", "uint8")), "value": raw(b"", "float64")},
     ["columns", "op"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("columns", "loc"), [case[1:] for case in BAD_PACKED], ids=[case[0] for case in BAD_PACKED]
)
def test_a_bad_packed_column_is_a_422_at_its_field(
    client: FlaskClient, columns: dict[str, Any], loc: list[Any]
) -> None:
    error = first_error(post(client, {"columns": columns}))
    assert error["loc"] == loc


def test_a_packed_table_over_max_nodes_names_the_limit() -> None:
    client = create_app(Settings(max_nodes=4), TESTING=True).test_client()
    response = post(client, {"columns": pack_table(CIRCUIT)})
    assert first_error(response)["loc"] == ["columns", "op"]
    assert (response.get_json()["limit"], response.get_json()["limit_value"]) == ("max_nodes", 4)


def test_bad_base64_says_why(client: FlaskClient) -> None:
    response = post(client, {"columns": bad(value=raw(b"\0" * 44, "float64"))})
    error = first_error(response)
    assert error["msg"] == "44 bytes is not a whole number of float64 elements (8 bytes each)"
    error = first_error(post(client, {"columns": bad(value={"dtype": "float64", "base64": "A"})}))
    assert error["msg"].startswith("not standard base64 with padding")


# --- 5. encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/v1/graph", "/v1/graph.svg"])
def test_a_packed_answer_needs_report_columns(client: FlaskClient, url: str) -> None:
    body = {"columns": CIRCUIT, "encoding": "packed", "report": "nodes"}
    response = post(client, body, url)
    error = first_error(response)
    assert error["loc"] == ["encoding"]
    assert 'report "nodes"' in error["msg"]
    assert response.get_json()["title"] == "Invalid request body"


def test_the_svg_of_a_packed_body_is_drawn(client: FlaskClient) -> None:
    body = {"columns": pack_table(CIRCUIT), "encoding": "packed"}
    response = post(client, body, "/v1/graph.svg")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "<title>gradiag graph: output 4 = -12</title>" in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"columns": CIRCUIT, "encoding": "base64"}, ["encoding"]),
        ({"columns": CIRCUIT, "encoding": None}, ["encoding"]),
        # only a columns body has `encoding`: a nodes body's answer has no float columns
        ({"nodes": [{"id": "x", "op": "input", "value": 1}], "output": "x", "encoding": "packed"},
         ["encoding"]),
    ],
)  # fmt: skip
def test_a_bad_encoding_is_a_422(client: FlaskClient, body: dict[str, Any], loc: list[Any]) -> None:
    assert first_error(post(client, body))["loc"] == loc


def test_encoding_lists_is_the_default(client: FlaskClient) -> None:
    answer = ok(post(client, {"columns": table(), "encoding": "lists"}))
    assert answer["columns"] == {"value": CIRCUIT_VALUES, "grad": CIRCUIT_GRADS}


# --- 6. gradiag check and the OpenAPI document -----------------------------------------------


def test_gradiag_check_counts_packed_rows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no pyproject.toml with [tool.gradiag] settings
    path = tmp_path / "padded.columns.json"
    path.write_text(json.dumps({"columns": pack_table(PADDED), "encoding": "packed"}))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    rows = len(PADDED["op"])
    assert out.startswith(f"OK    {path}  graph: output '{rows - 1}' = -12, {rows} nodes")


def test_openapi_lists_the_packed_forms(client: FlaskClient) -> None:
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def dtypes(name: str) -> list[str]:
        enum: list[str] = schemas[name]["properties"]["dtype"]["enum"]
        return enum

    assert dtypes("PackedValues") == ["float64", "float32"]
    assert dtypes("PackedRows") == ["int8", "int16", "int32", "int64"]
    assert set(dtypes("PackedCodes")) == {"uint8", "uint16", "uint32", *dtypes("PackedRows")}
    assert set(dtypes("PackedArray")) == {*dtypes("PackedValues"), *dtypes("PackedCodes")}
    for name in ("PackedArray", "PackedValues", "PackedRows", "PackedCodes"):
        assert schemas[name]["required"] == ["dtype", "base64"]
        assert "little-endian" in schemas[name]["properties"]["base64"]["description"]
    columns = schemas["GraphColumns"]["properties"]
    assert ref("PackedOps") in columns["op"]["anyOf"]
    assert ref("PackedRows") in columns["inputs"]["items"]["anyOf"]
    assert ref("PackedValues") in columns["value"]["anyOf"]
    assert ref("PackedCodes") in schemas["PackedOps"]["properties"]["codes"]["anyOf"]
    assert schemas["PackedOps"]["properties"]["names"]["minItems"] == 1
    encoding = schemas["ColumnsRequest"]["properties"]["encoding"]
    assert (encoding["enum"], encoding["default"]) == (["lists", "packed"], "lists")
    report = schemas["ColumnsReport"]["properties"]
    assert ref("PackedArray") in report["value"]["anyOf"]
    assert ref("PackedArray") in report["grad"]["anyOf"]


# --- the fast decoder is the standard library's, verdict for verdict ----------------------

_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# near-valid text: mostly alphabet, with padding, spaces, the URL-safe letters and non-ASCII
_near_base64 = st.text(alphabet=_B64_ALPHABET + "===  -_\n\xe9", max_size=40)


def _verdict(decode: Any, text: str) -> tuple[str, Any]:
    """("ok", the bytes) or (the error's type name, its message)."""
    try:
        return "ok", decode(text)
    except ValueError as err:
        return type(err).__name__, str(err)


def _stdlib(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.one_of(_near_base64, st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode())))
def test_b64decode_gives_the_standard_librarys_bytes_and_errors(text: str) -> None:
    assert _verdict(b64decode, text) == _verdict(_stdlib, text)


@pytest.mark.parametrize("text", ["abcd=", "ab=c", "abc", "YQ==YQ==", "a b c d", "\xe9", "ab=="])
def test_b64decode_corner_cases_match_the_standard_library(text: str) -> None:
    assert _verdict(b64decode, text) == _verdict(_stdlib, text)


# --- the Python client's pack / unpack ------------------------------------------------------

_CLIENT_DTYPES = ["uint8", "int8", "int16", "int32", "int64", "float32", "float64"]


@hypothesis_settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(_CLIENT_DTYPES),
    st.binary(max_size=64),
    st.booleans(),
)
def test_client_pack_is_the_wires_little_endian_base64(
    dtype: str, data: bytes, big_endian: bool
) -> None:
    """Any array of a wire dtype, in either byte order: pack writes exactly the standard
    library's base64 of its little-endian bytes, and unpack gives the same numbers back."""
    little = np.dtype(dtype).newbyteorder("<")
    array = np.frombuffer(data[: len(data) - len(data) % little.itemsize], little)
    given_array = array.astype(little.newbyteorder(">")) if big_endian else array
    column = pack(given_array)
    assert column == {"dtype": dtype, "base64": base64.b64encode(array.tobytes()).decode()}
    back = unpack(column)
    assert back.dtype == little and back.tobytes() == array.tobytes()


def test_client_pack_refuses_a_2d_array() -> None:
    with pytest.raises(ValueError, match=r"1-d; this array has shape \(2, 2\)"):
        pack(np.zeros((2, 2)))


def test_the_circuit_through_the_clients_pack_and_unpack(client: FlaskClient) -> None:
    """f = (x + y) * z as a client holding arrays sends it: every column packed by `pack`,
    the answer's columns read by `unpack`."""
    codes = np.array([0, 0, 0, 1, 2], np.uint8)  # CIRCUIT["op"] as a legend
    columns = {
        "op": {"names": ["input", "add", "mul"], "codes": pack(codes)},
        "inputs": [pack(np.array(r, np.int32)) for r in CIRCUIT["inputs"]],
        "value": pack(np.array(CIRCUIT["value"], dtype=float)),
    }
    answer = ok(post(client, {"columns": columns, "encoding": "packed"}))
    assert unpack(answer["columns"]["value"]).tolist() == CIRCUIT_VALUES
    assert unpack(answer["columns"]["grad"]).tolist() == CIRCUIT_GRADS
