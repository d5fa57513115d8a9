"""What every benchmark of bench/ shares: interleaved timing, HTTP posts, a gunicorn server,
the peak RSS of one request."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import requests

ROOT = Path(__file__).resolve().parent.parent


def interleaved(
    runs: dict[str, Callable[[], Any]], rounds: int, *, discard: int = 0, keep: int = 1
) -> dict[str, list[float]]:
    """Each function's time in every round, after one warm-up call of each: in a round each
    runs `discard + keep` times back to back, and its time is the median of the last `keep`.
    The order inside a round rotates by one each round. This machine's speed drifts by tens
    of percent within a minute, so a ratio is taken between neighbours in time: the median
    of the rounds' ratios. `discard` is for libraries with their own threads: after NumPy's
    OpenBLAS threads or PyTorch's OpenMP threads have worked they spin for a while, and the
    other library's first call shares the two cores with them (PyTorch measured up to 2x
    slower right after NumPy)."""
    names = list(runs)
    for name in names:
        runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            calls = []
            for _ in range(discard + keep):
                t = time.perf_counter()
                runs[name]()
                calls.append(time.perf_counter() - t)
            times[name].append(statistics.median(calls[discard:]))
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def post(url: str, body: dict[str, Any], path: str = "/v1/graph") -> tuple[int, Any]:
    """POST a JSON body (to /v1/graph by default) with the standard library's http.client:
    one connection per request (gunicorn's sync workers close it anyway), the body sent in
    one call, the answer read in one. `requests` reads and writes in 8-10 KB pieces in
    Python: on the 100k-node bodies (2 MB each way) it measured 15-20 ms more per round
    trip, the client's cost, not the service's (as wrk replaced Python threads for the
    throughput rows)."""
    where = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=900)
    try:
        # a 413 may come before the body is all sent (a broken pipe): read that answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request(
                "POST", path, orjson.dumps(body), {"Content-Type": "application/json"}
            )
        response = connection.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, workers: int, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, **env, "GRADIAG_LOG_LEVEL": "warning"}
        cmd = [str(Path(sys.executable).parent / "gradiag"), "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(workers)]
        self.proc = subprocess.Popen(cmd, env=full, cwd=ROOT, stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


RSS_CHILD = """
import sys, orjson, numpy as np
from gradiag.schemas.network import NetworkRequest
from gradiag.service.network import diagnose_network, network_report
from gradiag.engine.network import NetworkLimits
def status(key):  # /proc: VmHWM is this process's own peak (ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
body = orjson.loads(sys.argv[1])
request = NetworkRequest.model_validate(body)
import gc; gc.collect()
base = status("VmRSS")
done = diagnose_network(request, NetworkLimits())
report = orjson.dumps(network_report(done, gradients=False))
peak = status("VmHWM")
r = done.result
tensor = sum(np.asarray(v).nbytes for v in r.values) + sum(
    np.asarray(g).nbytes for g in r.grads if g is not None)
print(orjson.dumps({"base_kib": base, "peak_kib": peak, "tensor_bytes": tensor}).decode())
"""


def peak_rss(body: dict[str, Any]) -> dict[str, Any]:
    """The peak RSS one /v1/network request adds to a fresh process, against the bytes of
    the values and gradients it holds (`RSS_CHILD`)."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, orjson.dumps(body).decode()],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    row["request_bytes"] = (row["peak_kib"] - row["base_kib"]) * 1024
    row["ratio"] = row["request_bytes"] / row["tensor_bytes"]
    return row
