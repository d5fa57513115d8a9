"""GET /: the single page that draws graphs and network health (docs/page.md).

Its script, style sheet and the vendored layout library are files under service/static,
served by the app's own `/static/...` route; the Content-Security-Policy lets the page load
nothing from anywhere else, and talk to no one but this service.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app

page = Blueprint("page", __name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@page.get("/")
def index() -> Response:
    response = current_app.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    return response
