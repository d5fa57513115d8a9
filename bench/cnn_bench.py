"""The CIFAR-like conv net of issue 20 at batch 64: POST /v1/network (forward, backward and
the per-layer diagnostics, end to end over HTTP) against PyTorch CPU forward + backward in
process, float64 and float32; and the peak RSS of one such request.

Both sides run single-threaded, as the service does (one BLAS thread per gunicorn worker,
docs/configuration.md); torch's own default thread count is restored after. The rounds are
interleaved (bench/common.py). Where gradiag's time goes is measured in process, phase by
phase, in the same rounds: parsing, compiling, drawing the weights and the batch, the
forward and backward pass, the diagnostics, the report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.common import interleaved, median_ratio, peak_rss, post

BATCH = 64
TARGET = 1.5  # the issue's: at most 1.5x PyTorch's forward + backward
RSS_TARGET = 2.0  # peak RSS at most 2x the bytes of the values and gradients
PHASES = ("parse", "compile", "leaves", "run", "diagnostics", "report")


def cifar_body(dtype: str, batch: int = BATCH) -> dict[str, Any]:
    """3x32x32 -> conv 16@3x3 pad 1, batchnorm relu, maxpool 2 -> conv 32@3x3 pad 1,
    batchnorm relu, avgpool 2 -> dense 10; softmax cross-entropy; He init, a random batch."""
    conv = {"type": "conv2d", "kernel": 3, "padding": 1, "activation": "linear"}
    return {
        "input_shape": [3, 32, 32],
        "layers": [
            {**conv, "filters": 16},
            {"type": "batchnorm", "activation": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {**conv, "filters": 32},
            {"type": "batchnorm", "activation": "relu"},
            {"type": "avgpool2d", "kernel": 2},
            {"units": 10, "activation": "linear"},
        ],
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "he", "seed": 0},
        "batch": {"random": {"size": batch, "seed": 0}},
        "dtype": dtype,
    }


def torch_step(dtype: str, batch: int = BATCH) -> Callable[[], None]:
    """The same net in PyTorch: one forward and the gradients of every parameter."""
    import torch
    from torch import nn

    tdtype = torch.float64 if dtype == "float64" else torch.float32
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(2048, 10),
    ).to(tdtype)  # fmt: skip
    params = list(model.parameters())
    x = torch.randn(batch, 3, 32, 32, dtype=tdtype)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    return step


def phases(body: dict[str, Any]) -> tuple[Callable[[], None], dict[str, list[float]]]:
    """gradiag's request in process, each phase timed on every call (the service's path:
    service/network.py `diagnose_network` and `network_report`, without Flask)."""
    from gradiag.engine.executor import run
    from gradiag.engine.network import (
        check_network,
        compile_network,
        leaf_values,
        network_diagnostics,
        with_leaves,
    )
    from gradiag.schemas.network import NetworkRequest
    from gradiag.service.config import Settings
    from gradiag.service.frontend import engine_thresholds
    from gradiag.service.network import (
        DiagnosedNetwork,
        network_limits,
        network_report,
        network_spec,
    )

    raw = orjson.dumps(body)
    limits = network_limits(Settings())
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}

    def call() -> None:
        marks = [time.perf_counter()]
        request = NetworkRequest.model_validate_json(raw)
        spec = network_spec(request)
        check_network(spec)
        marks.append(time.perf_counter())
        program = compile_network(spec, limits, gradients=False)
        marks.append(time.perf_counter())
        program = with_leaves(program, leaf_values(spec))
        marks.append(time.perf_counter())
        result = run(program)
        marks.append(time.perf_counter())
        diagnostics = network_diagnostics(result, spec, engine_thresholds(request.thresholds))
        marks.append(time.perf_counter())
        report = network_report(DiagnosedNetwork(spec, result, diagnostics), gradients=False)
        orjson.dumps(report)
        marks.append(time.perf_counter())
        for phase, start, end in zip(
            PHASES, marks, marks[1:], strict=False
        ):  # marks: one more than phases
            times[phase].append(end - start)

    return call, times


def bench_cnn(url: str, dtype: str, rounds: int) -> dict[str, Any]:
    """One row: gradiag over HTTP (`url`: a one-worker server, one BLAS thread), gradiag in
    process by phase, PyTorch in process; interleaved."""
    import torch
    from threadpoolctl import threadpool_limits

    body = cifar_body(dtype)

    def http() -> None:
        status, _ = post(url, body, "/v1/network")
        assert status == 200, status

    in_process, phase_times = phases(body)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            times = interleaved(
                {"http": http, "in_process": in_process, "torch": torch_step(dtype)}, rounds
            )
    finally:
        torch.set_num_threads(threads)
    row: dict[str, Any] = {
        "dtype": dtype,
        "batch": BATCH,
        "rounds": rounds,
        "http_s": statistics.median(times["http"]),
        "in_process_s": statistics.median(times["in_process"]),
        "torch_s": statistics.median(times["torch"]),
        "ratio_vs_torch": median_ratio(times["http"], times["torch"]),
        "run_ratio_vs_torch": median_ratio(phase_times["run"][-rounds:], times["torch"]),
    }
    row["phases_ms"] = {p: statistics.median(t[-rounds:]) * 1e3 for p, t in phase_times.items()}
    return row


def bench_cnn_rss(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, **peak_rss(cifar_body(dtype))}


def summary_lines(rows: list[dict[str, Any]], rss: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        ratio = row["ratio_vs_torch"]
        phases_ms = row["phases_ms"]
        top = max(phases_ms, key=phases_ms.__getitem__)
        lines.append(
            f"| CIFAR-like CNN b{row['batch']} {row['dtype']} fwd+bwd+diag, HTTP end to end, "
            f"1 thread | {row['http_s'] * 1e3:.1f} ms | torch fwd+bwd {row['torch_s'] * 1e3:.1f}"
            f" ms | {ratio:.2f}x time | <= {TARGET} | {'PASS' if ratio <= TARGET else 'MISS'} |"
        )
        lines.append(
            f"| ... in process by phase {row['dtype']} (info; most: {top}) | "
            + ", ".join(f"{p} {ms:.1f}" for p, ms in phases_ms.items())
            + f" ms | torch {row['torch_s'] * 1e3:.1f} ms | fwd+bwd alone "
            f"{row['run_ratio_vs_torch']:.2f}x | (info) |  |"
        )
    for row in rss:
        lines.append(
            f"| peak RSS CIFAR-like CNN b{BATCH} {row['dtype']} | "
            f"{row['request_bytes'] / 2**20:.0f} MiB | tensors {row['tensor_bytes'] / 2**20:.0f} "
            f"MiB | {row['ratio']:.2f}x | <= {RSS_TARGET}x | "
            f"{'PASS' if row['ratio'] <= RSS_TARGET else 'MISS'} |"
        )
    return lines
