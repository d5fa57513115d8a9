"""Per-request observability: a request id, one JSON log line, and the metrics.

`register_observability(app)` installs a before_request/after_request pair:

- the request id comes from `X-Request-ID` when it is printable ASCII of at most 128
  characters, else a fresh uuid4; it is on `g.request_id` and echoed in the response header;
- after the view, one JSON line goes to the `gradiag.access` logger (stdout): request id,
  method, path, route, status, duration_ms, body bytes, and graph nodes when a view put a
  `ReportSummary` on `g.report_summary`. Request bodies are never logged;
- the same hook feeds service.metrics (the only place that records metrics).

Every `gradiag*` logger writes JSON lines to stdout; a line logged inside a request carries
its request id.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Flask, Response, g, has_request_context, request

from gradiag.service.metrics import (
    ReportSummary,
    metrics_blueprint,
    observe_report,
    observe_request,
)

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
            line["exception"] = self.formatException(record.exc_info)
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
    body_bytes = state.body_bytes if "body_bytes" in state else req.content_length
    summary: ReportSummary | None = state.get("report_summary")
    status = response.status_code
    observe_request(req.method, endpoint, status, seconds, body_bytes)
    if summary is not None:
        observe_report(**summary._asdict())
    line: dict[str, Any] = {
        "event": "request",
        "method": req.method,
        "path": req.path,
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
