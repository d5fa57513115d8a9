"""Error floods: any invalid body is answered quickly with at most 100 errors (then a count),
no step is quadratic in the errors, and nothing of a body reaches a log, not even when an
exception's message quotes it (service/errors.py, service/observability.py)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydantic import BaseModel, ValidationError

from gradiag.service import frontend
from gradiag.service.errors import MAX_ERRORS, validation_problem
from gradiag.service.observability import JsonFormatter, SafeTextFormatter

PROBLEM = "application/problem+json"
HANG = 30.0  # seconds: a bound against a hang (the quadratic step took minutes), not a speed


def test_the_issues_80000_booleans_get_one_error_at_the_first(client: FlaskClient) -> None:
    value = b",".join([b"true"] * 80_000)
    body = b'{"nodes":[{"id":"x","op":"input","value":[' + value + b']}],"output":"x"}'
    r = client.post("/v1/graph", data=body, content_type="application/json")
    assert r.status_code == 422
    doc = r.get_json()
    assert [e["loc"] for e in doc["errors"]] == [["nodes", 0, "value", 0]]
    assert doc["errors"][0]["node"] == "x"
    assert len(r.data) < 1000


@pytest.mark.parametrize(
    "body",
    [
        b'{"nodes":[' + b",".join([b"{}"] * 300_000) + b'],"output":"x"}',
        b'{"nodes":[' + b",".join([b'{"id":"x","op":"nope"}'] * 100_000) + b'],"output":"x"}',
        b'{"expression":"a","values":{'
        + b",".join(b'"v%d":true' % i for i in range(100_000))
        + b"}}",
        b'{"input_dim":2,"layers":[{"units":1}],"loss":"sum","include":['
        + b",".join([b'"x"'] * 300_000)
        + b"]}",
    ],
    ids=["empty nodes", "unknown ops", "bad values", "bad include"],
)
def test_a_flood_of_bad_items_is_answered_with_few_errors(client: FlaskClient, body: bytes) -> None:
    path = "/v1/network" if b"input_dim" in body else "/v1/graph"
    started = time.monotonic()
    r = client.post(path, data=body, content_type="application/json")
    assert time.monotonic() - started < HANG
    assert r.status_code == 422
    assert r.content_type == PROBLEM
    assert 1 <= len(r.get_json()["errors"]) <= MAX_ERRORS
    assert len(r.data) < 5000


class Many(BaseModel):
    numbers: list[int]  # no fail-fast: every bad item is an error


def test_at_most_100_errors_are_listed_then_a_count() -> None:
    body = json.dumps({"numbers": ["x"] * 5000}).encode()
    with pytest.raises(ValidationError) as caught:
        Many.model_validate_json(body)
    problem = validation_problem(caught.value, body)
    assert len(problem.fields["errors"]) == MAX_ERRORS
    assert problem.fields["error_count"] == 5000
    assert problem.fields["errors"][0]["loc"] == ["numbers", 0]


def test_shaping_errors_is_linear_in_their_number() -> None:
    """The deepest-path rule compared every path with every other: 8k errors took 2 s, so
    200k would take ~20 minutes; with a set of prefixes it is a pass over the paths."""
    body = json.dumps({"numbers": ["x"] * 200_000}).encode()
    with pytest.raises(ValidationError) as caught:
        Many.model_validate_json(body)
    started = time.monotonic()
    problem = validation_problem(caught.value, body)
    assert time.monotonic() - started < HANG
    assert problem.fields["error_count"] == 200_000


def test_an_echoed_id_is_clipped(client: FlaskClient) -> None:
    long_id = "a" * 1_000_000
    body = {"nodes": [{"id": long_id, "op": "input", "value": 1}], "output": "x"}
    r = client.post("/v1/graph", json=body)
    assert r.status_code == 422
    assert len(r.data) < 2000
    assert "(1000000 characters)" in r.get_json()["errors"][0]["node"]


# --- logs -----------------------------------------------------------------------------------

SECRET = "s3cr3t-value-from-the-body"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))


@pytest.fixture
def logged(app: Flask) -> Iterator[list[str]]:
    handler = Lines()
    logger = logging.getLogger("gradiag")
    logger.addHandler(handler)
    try:
        yield handler.text
    finally:
        logger.removeHandler(handler)


def test_an_exception_quoting_the_body_is_logged_without_its_message(
    client: FlaskClient, logged: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(body: Any, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"could not use {body.values}")  # as a careless message might

    monkeypatch.setattr(frontend, "body_program", fail)
    r = client.post("/v1/graph", json={"expression": "x", "values": {"x": 1.0, SECRET: 2.0}})
    assert r.status_code == 500
    text = "\n".join(logged)
    assert "ValueError: (message withheld)" in text
    assert SECRET not in text
    assert SECRET not in r.get_data(as_text=True)


def test_a_chained_exception_keeps_every_message_out() -> None:
    try:
        try:
            raise KeyError(SECRET)
        except KeyError as inner:
            raise RuntimeError(f"while reading {SECRET}") from inner
    except RuntimeError:
        record = logging.LogRecord("gunicorn.error", logging.ERROR, "", 0, "Error", (), None)
        record.exc_info = sys.exc_info()
    text = SafeTextFormatter().format(record)
    assert SECRET not in text
    assert "KeyError: (message withheld)" in text
    assert "RuntimeError: (message withheld)" in text
