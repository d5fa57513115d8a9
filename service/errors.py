"""Every error leaves as application/problem+json (RFC 9457), from this one module."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from flask import Flask, Response, g, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from engine import EngineError, LimitError
from schemas.graph import ALL_OPS, BODY_TAGS

log = logging.getLogger("gradiag")

PROBLEM_TYPES = {
    400: "urn:gradiag:problem:malformed-json",
    413: "urn:gradiag:problem:too-large",
    415: "urn:gradiag:problem:unsupported-media-type",
    422: "urn:gradiag:problem:invalid-body",
    500: "urn:gradiag:problem:internal",
}


class ProblemError(Exception):
    """Raised by views for an answer that is not 2xx."""

    def __init__(self, status: int, title: str, detail: str, **fields: Any):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.fields = fields


def problem_response(
    status: int,
    title: str,
    detail: str,
    headers: Iterable[tuple[str, str]] = (),
    **fields: Any,
) -> Response:
    body = {
        "type": PROBLEM_TYPES.get(status, "about:blank"),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.path,
        **{k: v for k, v in fields.items() if v is not None},
    }
    response = Response(orjson.dumps(body), status=status, mimetype="application/problem+json")
    for name, value in headers:
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def validation_problem(err: ValidationError, body: bytes) -> ProblemError:
    """Pydantic's errors with clean paths, each naming the node at fault where there is one."""
    raw = err.errors(include_url=False, include_context=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in raw):
        return ProblemError(400, "Malformed JSON", raw[0]["msg"])
    nodes = _node_ids(body)
    items: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in raw:
        loc = clean_loc(e["loc"])
        if loc in items:  # a tensor element fails each branch of its union: say it once
            items[loc]["msg"] = TENSOR_MESSAGE
            continue
        item: dict[str, Any] = {"loc": list(loc), "msg": e["msg"]}
        if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
            item["node"] = nodes.get(loc[1])
        items[loc] = item
    errors = list(items.values())
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    node = f" (node {first['node']!r})" if first.get("node") else ""
    return ProblemError(
        422, "Invalid request body", f"{where}{node}: {first['msg']}", errors=errors
    )


TENSOR_MESSAGE = 'must be a number, "NaN", "Infinity", "-Infinity" or a nested list of them'


def clean_loc(loc: Iterable[Any]) -> tuple[Any, ...]:
    """Drop Pydantic's union branch names (`union[...]`, `float`) and discriminator tags
    (the node tags, and the graph/expression tag GraphBody puts first)."""
    out: list[Any] = []
    skip_next = False
    for k, part in enumerate(loc):
        if skip_next:
            skip_next = False
            continue
        if k == 0 and part in BODY_TAGS:
            continue
        if isinstance(part, str) and "[" in part:
            skip_next = part.startswith("union[")  # followed by the branch name
            continue
        is_tag = (
            len(out) >= 2 and out[-2] == "nodes" and isinstance(out[-1], int) and part in ALL_OPS
        )
        if not is_tag:
            out.append(part)
    return tuple(out)


def _node_ids(body: bytes) -> Mapping[int, str]:
    """The ids of the request's nodes, by position, read only on the error path."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if not isinstance(nodes, list):
        return {}
    return {
        k: n["id"]
        for k, n in enumerate(nodes)
        if isinstance(n, dict) and isinstance(n.get("id"), str)
    }


def engine_problem(err: EngineError) -> ProblemError:
    item: dict[str, Any] = {"loc": list(err.loc), "msg": err.message}
    if err.node is not None:
        item["node"] = err.node
    if isinstance(err, LimitError):
        return ProblemError(
            422, "Over a limit", err.message, errors=[item], limit=err.limit, limit_value=err.value
        )
    title = "Invalid expression" if err.loc[:1] == ("expression",) else "Invalid graph"
    return ProblemError(422, title, err.message, errors=[item])


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ProblemError)
    def _problem(err: ProblemError) -> Response:
        return problem_response(err.status, err.title, err.detail, **err.fields)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Response:
        status = err.code or 500
        headers = err.get_response().headers.items() if status == 405 else ()
        return problem_response(status, err.name, err.description or err.name, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        rid = g.get("request_id")
        log.exception(
            "unhandled error on %s %s (request id %s)",
            request.method,
            request.path,
            rid,
            extra={"request_id": rid},
        )
        return problem_response(
            500,
            "Internal Server Error",
            "The service failed on this request; it is logged under its request id.",
            request_id=rid,
        )
