"""One deadline per request, from the moment the app has its headers: reading the body,
parsing, the engine, shaping the report and drawing the picture all run against it, so the
longest request the time budget allows is also the longest a shutdown waits for
(GRADIAG_GRACEFUL_TIMEOUT >= GRADIAG_TIME_BUDGET_SECONDS + 5, checked at start)."""

from __future__ import annotations

from flask import Flask, current_app, g, has_request_context

from gradiag.engine import LimitError
from gradiag.engine.executor import check_deadline
from gradiag.service.config import Settings
from gradiag.service.errors import engine_problem


def _start_clock() -> None:
    settings: Settings = current_app.config["GRADIAG"]
    g.deadline = settings.deadline()


def request_deadline() -> float:
    """This request's deadline (`time.monotonic()`); a fresh one outside a request."""
    if has_request_context() and "deadline" in g:
        deadline: float = g.deadline
        return deadline
    settings: Settings = current_app.config["GRADIAG"]
    return settings.deadline()


def check_request_deadline() -> None:
    """The time-budget 422 once the deadline has passed (between the engine's stages)."""
    try:
        check_deadline(request_deadline())
    except LimitError as err:
        raise engine_problem(err) from None


def register_deadline(app: Flask) -> None:
    app.before_request(_start_clock)
