"""`diagnose_onnx`: a model exported to ONNX, diagnosed by a running service (POST /v1/onnx).

The client does not import `onnx` (nor the server's packages): it posts the file's bytes, the
request as JSON and the batch as a NumPy .npz, as multipart/form-data.

    from gradiag.client import diagnose_onnx
    report = diagnose_onnx("model.onnx", x, y, "softmax_cross_entropy",
                           url="http://127.0.0.1:8000")
    print(report.health.status, [layer.name for layer in report.layers])
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from gradiag.client.api import Client, Part, Timeout, decode, encode
from gradiag.schemas.onnx import OnnxResponse

DEFAULT_URL = "http://127.0.0.1:8000"


def npz_bytes(x: Any, y: Any = None) -> bytes:
    """x (and y) as the bytes of a NumPy .npz (no pickles: numbers only)."""
    arrays: dict[str, Any] = {"x": np.asarray(x)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def onnx_parts(model: bytes, request: bytes, batch: bytes | None = None) -> dict[str, Part]:
    """The parts of a POST /v1/onnx body: `model`, `request` (JSON), `batch` (.npz)."""
    parts = {
        "model": ("model.onnx", model, "application/octet-stream"),
        "request": ("request.json", request, "application/json"),
    }
    if batch is not None:
        parts["batch"] = ("batch.npz", batch, "application/octet-stream")
    return parts


def diagnose_onnx(
    path: str | PathLike[str],
    x: Any,
    y: Any,
    loss: str,
    *,
    url: str = DEFAULT_URL,
    client: Client | None = None,
    token: str | None = None,
    timeout: Timeout = (5.0, 60.0),
    input: str | None = None,
    output: str | None = None,
    include: Iterable[str] = (),
    thresholds: Mapping[str, float] | None = None,
) -> OnnxResponse:
    """The report of the model at `path` on the batch x (N first), y (labels or targets;
    None for the `sum` loss). x None: a random batch of the model's input shape. Through
    `client` when given (its session, token and retries), else a Client on `url`."""
    request: dict[str, Any] = {"loss": loss, "include": list(include)}
    request.update(
        (key, value)
        for key, value in (("input", input), ("output", output), ("thresholds", thresholds))
        if value is not None
    )
    batch = None if x is None else npz_bytes(x, y)
    parts = onnx_parts(Path(path).read_bytes(), encode(request), batch)
    own = client is None
    client = client or Client(url, token=token, timeout=timeout)
    try:
        return decode(client.post_parts_raw("/v1/onnx", parts), OnnxResponse)
    finally:
        if own:
            client.close()
