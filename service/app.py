"""The Flask application factory: settings, error handlers, observability, security and
the blueprints (the Flask tutorial's `create_app`)."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response

from gradiag.service.config import Settings
from gradiag.service.errors import register_error_handlers


def create_app(settings: Settings | None = None, **flask_config: Any) -> Flask:
    """Build the app. Settings come from the environment unless given (tests give them)."""
    app = Flask(__name__)
    app.config.update(
        GRADIAG=settings or Settings.from_env(),
        MAX_CONTENT_LENGTH=None,  # enforced in service.body, chunked uploads included
        DEBUG=False,
        **flask_config,
    )
    register_error_handlers(app)

    # first before_request hook: request id, timing, JSON access log, metrics, GET /metrics
    from gradiag.service.observability import register_observability

    register_observability(app)

    # one deadline for the whole request; the worker's memory ledger (service/budget.py)
    from gradiag.service.budget import register_budget
    from gradiag.service.deadline import register_deadline

    register_deadline(app)
    register_budget(app)

    # bearer token on /v1/* when GRADIAG_API_TOKEN is set; CORS only for configured origins
    from gradiag.service.security import register_security

    register_security(app)

    from gradiag.service.openapi import openapi_document
    from gradiag.service.routes import api, json_response, probes

    app.register_blueprint(api)
    app.register_blueprint(probes)

    from gradiag.service.page import page

    app.register_blueprint(page)

    @app.get("/openapi.json")
    def openapi() -> Response:
        return json_response(openapi_document())

    return app
