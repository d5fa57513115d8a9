"""Security basics: no eval/exec/pickle, optional bearer token, CORS only when configured,
no debug mode, no stack traces in error bodies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import Flask

from gradiag.service import create_app
from gradiag.service.config import Settings

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"
PROBLEM = "application/problem+json"
GRAPH = {"expression": "x * 2", "values": {"x": 1.0}}


def test_no_eval_exec_or_pickle_in_the_code() -> None:
    banned = re.compile(r"\b(eval|exec)\s*\(|\bpickle\b|\bmarshal\b|\byaml\.load\(|shelve")
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for package in ("engine", "service", "schemas")
        for path in sorted((REPO / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if banned.search(line) and not line.lstrip().startswith("#")
    ]
    assert hits == []


# --- bearer token --------------------------------------------------------------------------


@pytest.fixture
def locked() -> Flask:
    return create_app(Settings(api_token=TOKEN))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/graph"),
        ("POST", "/v1/graph.svg"),
        ("POST", "/v1/network"),
        ("POST", "/v1/network.svg"),
        ("GET", "/v1/ops"),
    ],
)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"]
)
def test_v1_needs_the_token(
    locked: Flask, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    r = locked.test_client().open(path, method=method, json=GRAPH, headers=headers)
    assert r.status_code == 401
    assert r.content_type == PROBLEM
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in r.get_data(as_text=True)


def test_the_right_token_is_let_in(locked: Flask) -> None:
    client = locked.test_client()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/graph", json=GRAPH, headers=headers).status_code == 200
    assert client.get("/v1/ops", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/"])
def test_probes_metrics_openapi_and_page_stay_open(locked: Flask, path: str) -> None:
    with locked.test_client().get(path) as r:  # closes the page's file response
        assert r.status_code == 200


def test_without_a_token_setting_v1_is_open(app: Flask) -> None:
    assert app.test_client().post("/v1/graph", json=GRAPH).status_code == 200


def test_the_openapi_document_lists_401_and_the_scheme(app: Flask) -> None:
    doc = app.test_client().get("/openapi.json").get_json()
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "401" in doc["paths"]["/v1/graph"]["post"]["responses"]


# --- CORS ----------------------------------------------------------------------------------


def test_no_cors_headers_unless_configured(app: Flask) -> None:
    r = app.test_client().post("/v1/graph", json=GRAPH, headers={"Origin": "https://a.example"})
    assert r.status_code == 200
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.fixture
def cors_app() -> Flask:
    return create_app(Settings(cors_origins=("https://a.example", "http://localhost:3000")))


def test_a_configured_origin_is_allowed(cors_app: Flask) -> None:
    r = cors_app.test_client().post(
        "/v1/graph", json=GRAPH, headers={"Origin": "http://localhost:3000"}
    )
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "Origin" in r.headers["Vary"]


def test_another_origin_gets_no_allow_header(cors_app: Flask) -> None:
    r = cors_app.test_client().post(
        "/v1/graph", json=GRAPH, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 200
    assert "Access-Control-Allow-Origin" not in r.headers


def test_a_preflight_is_answered_even_with_a_token(cors_app: Flask) -> None:
    app = create_app(Settings(api_token=TOKEN, cors_origins=("https://a.example",)))
    r = app.test_client().options(
        "/v1/graph",
        headers={
            "Origin": "https://a.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]


def test_a_wildcard_allows_any_origin() -> None:
    app = create_app(Settings(cors_origins=("*",)))
    r = app.test_client().get("/v1/ops", headers={"Origin": "https://b.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"


# --- debug and stack traces ----------------------------------------------------------------


def test_debug_is_off_even_with_flask_debug_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_DEBUG", "1")
    monkeypatch.setenv("FLASK_ENV", "development")
    app = create_app(Settings())
    assert app.debug is False


def test_the_gunicorn_entry_point_is_not_in_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn loads `service:create_app()` with no arguments: settings from the environment."""
    monkeypatch.setenv("FLASK_DEBUG", "1")
    assert create_app().debug is False


def test_a_500_never_echoes_the_stack_trace() -> None:
    app = create_app(Settings())

    @app.get("/test-only/boom")
    def boom() -> str:
        raise RuntimeError("secret internal detail at /srv/engine.py line 42")

    r = app.test_client().get("/test-only/boom", headers={"X-Request-ID": "req-123"})
    assert r.status_code == 500
    assert r.content_type == PROBLEM
    text = r.get_data(as_text=True)
    assert "Traceback" not in text
    assert "secret internal detail" not in text
    assert "RuntimeError" not in text
    assert r.get_json()["request_id"] == "req-123"
