"""Posting to /v1/onnx from the tests: the multipart body encoded in memory, as the client
encodes it (requests), so that no temporary file is left open by the test client."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import requests
from flask.testing import FlaskClient
from werkzeug.test import TestResponse


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def multipart(parts: dict[str, bytes | str]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data body; bytes parts go as files."""
    files = {
        name: (f"{name}.bin", value) if isinstance(value, bytes) else (None, value)
        for name, value in parts.items()
    }
    prepared = requests.Request("POST", "http://test/v1/onnx", files=files).prepare()
    assert isinstance(prepared.body, bytes)
    return prepared.body, prepared.headers["Content-Type"]


def post_onnx(
    client: FlaskClient,
    model: bytes,
    request: dict[str, Any] | str | None,
    batch: bytes | None = None,
    **extra: bytes | str,
) -> TestResponse:
    """POST /v1/onnx with the parts given (a dict request is sent as JSON; None: no part)."""
    parts: dict[str, bytes | str] = {"model": model}
    if request is not None:
        parts["request"] = request if isinstance(request, str) else json.dumps(request)
    if batch is not None:
        parts["batch"] = batch
    parts.update(extra)
    body, content_type = multipart(parts)
    return client.post("/v1/onnx", data=body, content_type=content_type)
