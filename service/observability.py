"""Per-request observability: a request id, one JSON log line, and the metrics.

`register_observability(app)` installs a before_request/after_request pair:

- the request id comes from `X-Request-ID` when it is printable ASCII of at most 128
  characters, else a fresh uuid4; it is on `g.request_id` and echoed in the response header;
- after the view, one JSON line goes to the `gradiag.access` logger (stdout): request id,
  method, path, route, status, duration_ms, body bytes, and graph nodes when a view put a
  `ReportSummary` on `g.report_summary`. Request bodies are never logged;
- the same hook feeds service.metrics (the only place that records metrics).

Every `gradiag*` logger writes JSON lines to stdout; a line logged inside a request carries
its request id. A logged exception shows where it happened (frames and exception types) but
never its message: messages may quote request values (a Pydantic error lists the body's
values), and nothing of a body may reach a log. gunicorn's own lines use the same rule
(`SafeTextFormatter`, service/gunicorn_conf.py).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Flask, Response, g, has_request_context, request

from gradiag.service.metrics import (
    ReportSummary,
    method_label,
    metrics_blueprint,
    observe_report,
    observe_request,
)
from gradiag.service.text import clip

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 128

access_log = logging.getLogger("gradiag.access")


def valid_request_id(value: str | None) -> bool:
    """A client's id is used when it is 1-128 printable ASCII characters."""
    if not value or len(value) > MAX_REQUEST_ID:
        return False
    return value.isascii() and value.isprintable()


def request_id() -> str | None:
    """The current request's id (None outside a request)."""
    return g.get("request_id") if has_request_context() else None


def safe_traceback(exc_info: Any) -> str:
    """A traceback with every frame and exception type of the chain, and no exception
    message (`KeyError: (message withheld)`)."""
    _, value, _ = exc_info
    blocks: list[str] = []
    seen: set[int] = set()
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        frames = "".join(traceback.format_tb(value.__traceback__))
        name = type(value).__qualname__
        blocks.append(f"Traceback (most recent call last):\n{frames}{name}: (message withheld)")
        value = value.__cause__ or (None if value.__suppress_context__ else value.__context__)
    return "\n\nwhile handling:\n".join(reversed(blocks))


class SafeTextFormatter(logging.Formatter):
    """gunicorn's plain text lines, with tracebacks as `safe_traceback` writes them."""

    def formatException(self, ei: Any) -> str:
        return safe_traceback(ei)


class JsonFormatter(logging.Formatter):
    """One JSON object per line. A dict message is merged in; text becomes `message`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        rid = getattr(record, "request_id", None) or request_id()
        if rid:
            line["request_id"] = rid
        if isinstance(record.msg, dict):
            line.update(record.msg)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = safe_traceback(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stdout is at the time (so test capture sees it too)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stdout)
        super().emit(record)


def configure_logging(level: str) -> None:
    """JSON lines on stdout for every `gradiag*` logger; idempotent (one app per test)."""
    root = logging.getLogger("gradiag")
    root.setLevel(level.upper())
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.propagate = False


def _begin() -> None:
    state = g._get_current_object()  # one context lookup, not one per read or write
    state.started = time.perf_counter()
    given = request.headers.get(REQUEST_ID_HEADER)
    state.request_id = given if valid_request_id(given) else str(uuid.uuid4())


def _finish(response: Response) -> Response:
    # every request passes here (/healthz too): the request and g are looked up once each,
    # not through their context proxies on every read
    req = request._get_current_object()  # type: ignore[attr-defined]
    state = g._get_current_object()
    seconds = time.perf_counter() - state.get("started", time.perf_counter())
    rid = state.get("request_id") or str(uuid.uuid4())
    response.headers[REQUEST_ID_HEADER] = rid
    endpoint = req.url_rule.rule if req.url_rule is not None else "unmatched"
    method = method_label(req.method)  # a label and a log field: only known values
    body_bytes = state.body_bytes if "body_bytes" in state else req.content_length
    summary: ReportSummary | None = state.get("report_summary")
    status = response.status_code
    observe_request(method, endpoint, status, seconds, body_bytes)
    if summary is not None:
        observe_report(**summary._asdict())
    line: dict[str, Any] = {
        "event": "request",
        "method": method,
        "path": clip(req.path),
        "route": endpoint,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "body_bytes": body_bytes,
    }
    if summary is not None:
        line.update(nodes=summary.nodes, kind=summary.kind, health=summary.status)
    access_log.info(line, extra={"request_id": rid})
    return response


def register_observability(app: Flask) -> None:
    configure_logging(app.config["GRADIAG"].log_level)
    app.before_request(_begin)
    app.after_request(_finish)
    app.register_blueprint(metrics_blueprint)
