"""gradiag's HTTP service: a Flask application factory (`create_app`, in service/app.py),
its views and the `gradiag` command line.

Flask is imported by `create_app`, not by this package: `gradiag check --url` and the client
run on an install without the `server` extra."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from gradiag.service.config import Settings


def create_app(settings: Settings | None = None, **flask_config: Any) -> Flask:
    """Build the app (service/app.py). Settings come from the environment unless given."""
    from gradiag.service.app import create_app as build

    return build(settings, **flask_config)


__all__ = ["create_app"]
