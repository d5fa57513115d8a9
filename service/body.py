"""Reading a request body: content type, size limit (chunked too), time limit, the JSON
syntax the contract refuses (service/jsonsyntax.py), one Pydantic parse."""

from __future__ import annotations

from typing import IO, Any, TypeVar

from flask import current_app, g, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import ClientDisconnected

from gradiag.service.errors import ProblemError, validation_problem
from gradiag.service.jsonsyntax import JsonSyntaxError, check_json_syntax

Model = TypeVar("Model", bound=BaseModel)

_CHUNK = 1 << 16


def read_json_body() -> bytes:
    """The raw body, refused with 415 unless JSON and 413 when over the limit.

    Werkzeug silently truncates a chunked upload at MAX_CONTENT_LENGTH, so the limit is
    enforced here by reading at most one byte more than allowed."""
    # one context lookup, not one per attribute read (the proxy is typed as a Request)
    req = request._get_current_object()  # type: ignore[attr-defined]
    mimetype = req.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ProblemError(
            415,
            "Unsupported Media Type",
            f"send the body as application/json, not {mimetype or 'no content type'!r}",
        )
    return read_limited_body(req)


def read_limited_body(req: Any) -> bytes:
    """The raw body of any content type, 413 when over GRADIAG_MAX_BODY_BYTES (declared or
    chunked)."""
    limit: int = current_app.config["GRADIAG"].max_body_bytes
    declared = req.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    try:
        body = _read_at_most(req.stream, limit + 1, declared)
    except TimeoutError:  # the worker's body deadline (service/worker.py), on a raw stream
        raise _too_slow() from None
    except ClientDisconnected as err:  # Werkzeug's wrapper turns a read's error into this
        if isinstance(err.__context__, TimeoutError):
            raise _too_slow() from None
        raise
    g.body_bytes = len(body)  # chunked uploads have no Content-Length for the metrics and logs
    if len(body) > limit:
        raise _too_large(limit)
    return body


def _read_at_most(stream: IO[bytes], most: int, declared: int | None) -> bytes:
    """Up to `most` bytes of the stream: what is declared, else in chunks. A declared length
    that has arrived ends the read (no empty read to find the end)."""
    parts: list[bytes] = []
    received = 0
    while received < most:
        # a declared length in one call (gunicorn's reader loops over the socket itself); a
        # raw stream may return less, and the loop asks for the rest
        want = _CHUNK if declared is None else declared - received
        chunk = stream.read(min(want, most - received))
        if not chunk:
            break
        parts.append(chunk)
        received += len(chunk)
        if received == declared:
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> ProblemError:
    return ProblemError(
        413,
        "Payload Too Large",
        f"the body is over the limit of {limit} bytes (GRADIAG_MAX_BODY_BYTES)",
        limit="max_body_bytes",
        limit_value=limit,
    )


def _too_slow() -> ProblemError:
    timeout = current_app.config["GRADIAG"].body_timeout
    return ProblemError(
        408,
        "Request Timeout",
        f"the body did not arrive within {timeout} s (GRADIAG_BODY_TIMEOUT)",
        headers=[("Connection", "close")],  # what is left of the body is never read
        limit="body_timeout",
        limit_value=timeout,
    )


# Objects whose members are the client's names, not fields: one member per node at most.
WIDE_OBJECTS: dict[tuple[str | int, ...], str] = {("values",): "max_nodes"}  # an expression's


def check_syntax(body: bytes) -> None:
    """A 400 for a duplicate key or a bare NaN/Infinity, a 422 for an object of far more
    members than any of the API has; naming it and where it is."""
    settings = current_app.config["GRADIAG"]
    wide: dict[tuple[str | int, ...], int] = {
        path: getattr(settings, limit) for path, limit in WIDE_OBJECTS.items()
    }
    try:
        check_json_syntax(body, wide)
    except JsonSyntaxError as err:
        where = ".".join(map(str, err.loc)) or "body"
        title = "Malformed JSON" if err.status == 400 else "Invalid request body"
        raise ProblemError(
            err.status,
            title,
            f"{where}: {err.message}",
            errors=[{"loc": err.loc, "msg": err.message}],
        ) from None


def parse_body(
    model: type[Model],
    *,
    first: tuple[bytes, type[BaseModel]] | None = None,
    unless: tuple[tuple[bytes, ...], type[BaseModel]] | None = None,
) -> Any:
    """The body validated as `model`. For a union with a callable discriminator (GraphBody)
    Pydantic builds the whole body as Python objects before it validates (~40% of a
    300k-node graph's parse), so a branch is taken straight from the JSON when the bytes
    tell which it is:

    - `first` = (key, branch): a body whose bytes hold `key` is tried as that branch first;
      a failure goes through `model` for its errors, so the answer is the same either way;
    - `unless` = (keys, branch): a body whose bytes hold none of `keys` can only be that
      branch (the discriminator looks for those keys), so it is validated as the branch
      alone, its errors included (they are the union's without the tag, which error paths
      drop anyway)."""
    body = read_json_body()
    check_syntax(body)
    if first is not None and first[0] in body:
        try:
            return first[1].model_validate_json(body)
        except ValidationError:
            pass
    if unless is not None and not any(key in body for key in unless[0]):
        model = unless[1]  # type: ignore[assignment]
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        failure = err
    # outside the `except`: a problem raised while shaping the answer carries no context,
    # so no traceback prints Pydantic's errors (which quote the body's values)
    raise validation_problem(failure, body)
