"""Reading a multipart/form-data body: the raw bytes under the body limit (chunked uploads
too: service.body), then split into named parts by Werkzeug's sans-IO decoder. Every part is
kept as bytes, whether or not the client gave it a filename (Flask's `request.form` would
decode one without a filename as text, and spool large ones to disk)."""

from __future__ import annotations

from collections.abc import Collection

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder

from gradiag.service.body import read_limited_body
from gradiag.service.errors import ProblemError

MAX_PARTS = 16


def read_parts(known: Collection[str], required: Collection[str]) -> dict[str, bytes]:
    """The body's parts by name: 415 unless multipart/form-data, 413 over the body limit,
    400 when it does not split into parts, 422 for a part missing, unknown or given twice."""
    req = request._get_current_object()  # type: ignore[attr-defined]
    boundary = req.mimetype_params.get("boundary")
    if req.mimetype != "multipart/form-data" or not boundary:
        raise ProblemError(
            415,
            "Unsupported Media Type",
            "send the body as multipart/form-data (with its boundary) holding the parts "
            f"{', '.join(known)}; not {req.content_type or 'no content type'!r}",
        )
    parts = split_parts(read_limited_body(req), boundary.encode("latin-1"))
    for name in parts:
        if name not in known:
            raise _part_problem(name, f"unknown part; the parts are {', '.join(known)}")
    for name in required:
        if name not in parts:
            raise _part_problem(name, "this part is required")
    return parts


def split_parts(body: bytes, boundary: bytes) -> dict[str, bytes]:
    decoder = MultipartDecoder(boundary, max_parts=MAX_PARTS)
    parts: dict[str, bytes] = {}
    name, chunks = "", list[bytes]()
    try:
        decoder.receive_data(body)
        decoder.receive_data(None)
        while not isinstance(event := decoder.next_event(), Epilogue):
            if isinstance(event, Field | File):
                name, chunks = event.name, []
                if name in parts:
                    raise _part_problem(name, "this part is given twice")
            elif isinstance(event, Data):
                chunks.append(event.data)
                if not event.more_data:
                    parts[name] = b"".join(chunks)
    except RequestEntityTooLarge:
        raise _part_problem("", f"more than {MAX_PARTS} parts") from None
    except ValueError as err:
        raise ProblemError(400, "Malformed multipart body", f"the body's parts: {err}") from None
    return parts


def _part_problem(name: str, message: str) -> ProblemError:
    loc = [name] if name else []
    where = f"part {name!r}: " if name else ""
    return ProblemError(
        422, "Invalid request body", f"{where}{message}", errors=[{"loc": loc, "msg": message}]
    )
