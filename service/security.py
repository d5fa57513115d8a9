"""Optional bearer-token authentication and CORS, both off unless configured.

- `GRADIAG_API_TOKEN` set: every `/v1/*` request needs `Authorization: Bearer <token>`,
  compared in constant time (`hmac.compare_digest`); otherwise 401 problem+json with
  `WWW-Authenticate: Bearer`. The probes, `/metrics`, `/openapi.json` and the page `/` stay
  open: orchestrators, scrapers and the page's own code must reach them without a secret.
  CORS preflights (`OPTIONS`) are answered without it, as browsers never send credentials
  on a preflight.
- `GRADIAG_CORS_ORIGINS` set: a request whose `Origin` is in the list (or any origin with
  `*`) gets `Access-Control-Allow-Origin`; a preflight also gets the allowed methods and
  headers. Unset: no CORS header at all, so browsers keep the same-origin policy.

A dozen lines of `before_request`/`after_request` rather than flask-cors: one more
dependency for two headers would be harder to audit than the headers themselves.
"""

from __future__ import annotations

import hmac

from flask import Flask, Response, current_app, request

from gradiag.service.config import Settings
from gradiag.service.errors import problem_response

PROTECTED_PREFIX = "/v1/"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-Request-ID"
CORS_MAX_AGE = "600"


def _settings() -> Settings:
    settings: Settings = current_app.config["GRADIAG"]
    return settings


def _authorized(token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def require_token() -> Response | None:
    token = _settings().api_token
    if not token or request.method == "OPTIONS" or not request.path.startswith(PROTECTED_PREFIX):
        return None
    if _authorized(token):
        return None
    return problem_response(
        401,
        "Unauthorized",
        "send the API token as `Authorization: Bearer <token>`",
        headers=[("WWW-Authenticate", 'Bearer realm="gradiag"')],
    )


def cors_headers(response: Response) -> Response:
    origins = _settings().cors_origins
    origin = request.headers.get("Origin")
    if not origins or not origin:
        return response
    response.vary.add("Origin")
    if "*" in origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
    else:
        return response
    response.headers["Access-Control-Expose-Headers"] = "X-Request-ID"
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
    return response


def register_security(app: Flask) -> None:
    app.before_request(require_token)
    app.after_request(cors_headers)
