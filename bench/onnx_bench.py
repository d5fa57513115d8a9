"""POST /v1/onnx against POST /v1/network and PyTorch, on the CIFAR-like net at batch 64.

The net is tests/oracle_models.py's `cifar("eval")` (3x32x32: conv 16 -> batchnorm -> relu ->
maxpool -> conv 32 -> batchnorm -> relu -> avgpool -> dense 10), built in torch
(bench/oracle/_common.py) and exported in this process by `torch.onnx.export` (legacy
exporter, opset 17, eval mode: BatchNorm folded into the convs, as users get it). Compared
in interleaved rounds (bench/run.py's `interleaved`), float64, softmax cross-entropy:

- `onnx`: POST /v1/onnx, multipart (the .onnx bytes, the request, the batch as .npz);
- `network`: POST /v1/network with the same net, weights and batch as JSON (target: the
  ONNX request within 1.2x of it);
- in process, without HTTP: the ONNX front end (`diagnose_model`) against the network
  front end (`diagnose_network`) on the same arrays, which separates the lowering from the
  transport of a 4 MB JSON batch;
- PyTorch forward + backward of the exported module (eval mode) in this process, one
  thread as a gradiag worker has (report only). NumPy's BLAS is held to one thread in
  this process too.

    .venv-bench/bin/python bench/onnx_bench.py [--reps 7]     # alone, with its own server
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64
TARGET = 1.2


def _cifar() -> tuple[Any, Any, Any]:
    """(the OracleModel, its torch module in eval mode, the common recorders' module)."""
    sys.path.insert(0, str(ROOT))
    from bench.oracle import _common as c

    model = c.builders().cifar("eval", batch=BATCH)
    with c.torch_float64():  # built in float64: float32 layers would round the weights
        return model, c.build_module(model).module.eval(), c


def export_onnx(module: torch.nn.Module, x: np.ndarray) -> bytes:
    """The legacy exporter's bytes (it needs only onnx; the batch size is baked in)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.tensor(x),), buffer, dynamo=False, opset_version=17)
    return buffer.getvalue()


def multipart(model: bytes, x: np.ndarray, y: np.ndarray) -> tuple[bytes, str]:
    """The POST /v1/onnx body as gradiag.client.diagnose_onnx sends it."""
    from gradiag.client.onnx import npz_bytes, onnx_parts

    request = json.dumps({"loss": "softmax_cross_entropy"}).encode()
    parts = onnx_parts(model, request, npz_bytes(x, y))
    prepared = requests.Request("POST", "http://bench/v1/onnx", files=parts).prepare()
    assert isinstance(prepared.body, bytes)
    return prepared.body, str(prepared.headers["Content-Type"])


def torch_step(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> Any:
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.long)
    params = list(module.parameters())

    def step() -> Any:
        loss = torch.nn.functional.cross_entropy(module(xt), yt)
        return torch.autograd.grad(loss, params)

    return step


def onnx_row(url: str, reps: int) -> dict[str, Any]:
    """The row: median times (s) and ratios of the runs compared (module docstring)."""
    from bench.common import interleaved, median_ratio
    from gradiag.engine.network import Batch, NetworkLimits
    from gradiag.onnx_import.frontend import OnnxOptions, diagnose_model
    from gradiag.schemas.network import NetworkRequest
    from gradiag.service.network import diagnose_network

    model, module, c = _cifar()
    with c.torch_float64():
        data = export_onnx(module, model.x)
    assert module.training is False
    body, content_type = multipart(data, model.x, model.y)
    network = c.builders().network_body(model, include=())
    network_bytes = json.dumps(network).encode()
    request = NetworkRequest.model_validate(network)
    options = OnnxOptions(loss="softmax_cross_entropy")
    batch = Batch(model.x, model.y.astype(np.float64))
    session = requests.Session()

    def post(path: str, payload: bytes, kind: str) -> Any:
        def call() -> Any:
            answer = session.post(url + path, data=payload, headers={"Content-Type": kind})
            assert answer.status_code == 200, answer.text[:300]
            return answer

        return call

    runs = {
        "onnx_http": post("/v1/onnx", body, content_type),
        "network_http": post("/v1/network", network_bytes, "application/json"),
        "onnx_engine": lambda: diagnose_model(data, batch, options),
        "network_engine": lambda: diagnose_network(request, NetworkLimits()),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a gradiag worker (OPENBLAS_NUM_THREADS=1)
    try:
        with c.torch_float64():
            runs["torch"] = torch_step(module, model.x, model.y)
            with threadpool_limits(1):  # NumPy's BLAS as a worker's: one thread
                times = interleaved(runs, reps, discard=1)
    finally:
        torch.set_num_threads(threads)
    onnx_loss = session.post(url + "/v1/onnx", data=body, headers={"Content-Type": content_type})
    net_loss = session.post(url + "/v1/network", data=network_bytes,
                            headers={"Content-Type": "application/json"})  # fmt: skip
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return {
        "model": "cifar eval (BatchNorm folded by the export), batch 64, float64",
        "onnx_bytes": len(data),
        "onnx_body_bytes": len(body),
        "network_body_bytes": len(network_bytes),
        **{f"{name}_s": value for name, value in medians.items()},
        "ratio_http": median_ratio(times["onnx_http"], times["network_http"]),
        "ratio_engine": median_ratio(times["onnx_engine"], times["network_engine"]),
        "ratio_vs_torch": median_ratio(times["onnx_engine"], times["torch"]),
        "loss_onnx": onnx_loss.json()["loss"],
        "loss_network": net_loss.json()["loss"],
        "target": TARGET,
    }


def summary_lines(row: dict[str, Any]) -> list[str]:
    """The row in bench/run.py's table: | measurement | gradiag | baseline | ratio | target |
    verdict |."""
    ok = "PASS" if row["ratio_http"] <= TARGET else "MISS"
    ms = {k: 1e3 * v for k, v in row.items() if k.endswith("_s")}
    return [
        f"| CIFAR-like b{BATCH} float64 POST /v1/onnx (multipart, .npz) "
        f"| {ms['onnx_http_s']:.1f} ms | /v1/network (JSON) {ms['network_http_s']:.1f} ms "
        f"| {row['ratio_http']:.2f}x time | <= {TARGET} | {ok} |",
        f"| ... in process, no HTTP (info) | ONNX front end {ms['onnx_engine_s']:.1f} ms "
        f"| network front end {ms['network_engine_s']:.1f} ms | {row['ratio_engine']:.2f}x "
        "time | (info) |  |",
        f"| ... against PyTorch fwd+bwd, 1 thread (info) | {ms['onnx_engine_s']:.1f} ms "
        f"| torch {ms['torch_s']:.1f} ms | {row['ratio_vs_torch']:.2f}x time | (info) |  |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    from bench.common import Server

    server = Server(1, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    try:
        row = onnx_row(server.url, args.reps)
    finally:
        server.close()
    print(json.dumps(row, indent=2))
    print("\n".join(summary_lines(row)))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
