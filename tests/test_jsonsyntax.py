"""Duplicate keys and bare NaN/Infinity literals are malformed JSON (400, naming the key or
the literal and where it is); an object of far more members than any of the API is one 422
(service/jsonsyntax.py)."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from gradiag.service.jsonsyntax import MAX_MEMBERS, check_json_syntax, fold_number_arrays

PROBLEM = "application/problem+json"


def post(client: FlaskClient, data: bytes, path: str = "/v1/graph") -> tuple[int, dict]:  # type: ignore[type-arg]
    r = client.post(path, data=data, content_type="application/json")
    assert r.content_type == PROBLEM or r.status_code == 200, r.data[:200]
    return r.status_code, r.get_json()


ONE_NODE = b'{"id":"x","op":"input","value":1}'
DUPLICATES = [
    (b'{"nodes":[' + ONE_NODE + b'],"output":"x","output":"x"}', ["output"], "output"),
    (b'{"nodes":[{"id":"x","op":"input","value":1,"value":2}],"output":"x"}', ["nodes", 0, "value"],
     "value"),
    (b'{"nodes":[{"id":"x","id":"y","op":"input","value":1}],"output":"x"}', ["nodes", 0, "id"],
     "id"),
    (b'{"expression":"a+a","values":{"a":1,"a":2}}', ["values", "a"], "a"),
    (
        b'{"expression":"a","values":{"a":1},"thresholds":{"dead_warn":0.1,"dead_warn":0.2}}',
        ["thresholds", "dead_warn"],
        "dead_warn",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "loc", "key"), DUPLICATES)
def test_a_duplicate_key_is_a_400_naming_it(
    client: FlaskClient, body: bytes, loc: list[object], key: str
) -> None:
    status, doc = post(client, body)
    assert status == 400
    assert doc["title"] == "Malformed JSON"
    assert doc["errors"] == [{"loc": loc, "msg": f"the key {key!r} appears twice in this object"}]
    assert ".".join(map(str, loc)) in doc["detail"]


@pytest.mark.parametrize(
    ("literal", "at"),
    [(b"NaN", 1), (b"Infinity", 0), (b"-Infinity", 2)],
)
def test_a_bare_non_finite_literal_is_a_400_naming_it(
    client: FlaskClient, literal: bytes, at: int
) -> None:
    values = [b"1.0", b"2.0", b"3.0"]
    values[at] = literal
    body = b'{"nodes":[{"id":"x","op":"input","value":[' + b",".join(values) + b']}],"output":"x"}'
    status, doc = post(client, body)
    assert status == 400
    name = literal.decode()
    assert doc["errors"] == [
        {
            "loc": ["nodes", 0, "value", at],
            "msg": f"bare {name} is not JSON; write it as the string {name!r}",
        }
    ]


def test_a_bare_literal_in_a_setting_is_a_400(client: FlaskClient) -> None:
    body = b'{"expression":"x","values":{"x":1},"thresholds":{"exploding_norm":Infinity}}'
    status, doc = post(client, body)
    assert status == 400
    assert doc["errors"][0]["loc"] == ["thresholds", "exploding_norm"]


def test_the_string_forms_and_keys_that_only_look_alike_are_accepted(client: FlaskClient) -> None:
    body = (
        b'{"nodes":[{"id":"x","op":"input","value":["NaN","Infinity",1.0]},'
        b'{"id":"a[1]","op":"input","value":1},{"id":"a[2]","op":"input","value":2},'
        b'{"id":"s","op":"add","inputs":["a[1]","a[2]"]}],"output":"s"}'
    )
    status, _ = post(client, body)
    assert status == 200
    # keys that fold alike: "a[1]" and "a[2]" are two names, not one twice
    status, doc = post(client, b'{"expression":"x","values":{"x":1,"q[1]":2,"q[2]":3}}')
    assert status != 400, doc


def test_network_bodies_are_checked_too(client: FlaskClient) -> None:
    body = b'{"input_dim":2,"input_dim":3,"layers":[{"units":2}],"loss":"sum"}'
    status, doc = post(client, body, "/v1/network")
    assert status == 400
    assert doc["errors"][0]["loc"] == ["input_dim"]


def test_an_object_of_a_million_unknown_fields_is_one_422(client: FlaskClient) -> None:
    extra = b",".join(b'"k%d":1' % i for i in range(200_000))
    body = b'{"nodes":[{"id":"x","op":"input","value":1,' + extra + b'}],"output":"x"}'
    status, doc = post(client, body)
    assert status == 422
    assert doc["errors"] == [
        {
            "loc": ["nodes", 0],
            "msg": f"the object has 200,003 members; at most {MAX_MEMBERS} are allowed here "
            "(the others would be unknown fields)",
        }
    ]


def test_an_expression_may_have_many_values() -> None:
    many = b",".join(b'"v%d":1' % i for i in range(500))
    body = b'{"expression":"v0","values":{' + many + b"}}"
    check_json_syntax(body, {("values",): 1000})  # allowed there
    with pytest.raises(ValueError, match="at most 100 are allowed"):
        check_json_syntax(body, {("values",): 100})


def test_folding_keeps_what_could_hide_a_duplicate_or_a_literal() -> None:
    assert fold_number_arrays(b"[[1,2],[3,4]]") == b"0"
    assert fold_number_arrays(b'{"a":[[true],[null]],"b":{}}') == b'{"a":0,"b":0}'
    assert fold_number_arrays(b"[1,NaN]") == b"[1,NaN]"
    assert fold_number_arrays(b'[{"a":1},[2]]') == b'[{"a":1},0]'
    assert fold_number_arrays(b'["x",[1]]') == b'["x",0]'
