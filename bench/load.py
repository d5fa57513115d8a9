"""Load and fault tests against a real gunicorn on 127.0.0.1 (`make load`; docs/hardening.md).

Scenarios: the CS231n sigmoid expression and a 64-128-128-10 network (batch 64) under
`--connections` concurrent clients for `--seconds` each (0 errors expected; p50/p99 latency,
req/s, worker RSS before/after); a worker SIGKILLed mid-load (replaced; only its in-flight
request may fail); SIGTERM to the master while a slow request runs (the request finishes).

A Python thread-per-connection generator (standard library only), so it runs anywhere the
tests do; it is itself CPU-bound on a small machine, so the figures are a floor.
Loopback only; every loop is bounded by a deadline.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIGMOID = REPO.parent / "shared" / "examples" / "cs231n-sigmoid.expression.json"
HOST = "127.0.0.1"


def network_body(batch: int = 64) -> dict[str, Any]:
    return {
        "input_dim": 64,
        "layers": [
            {"units": 128, "activation": "relu"},
            {"units": 128, "activation": "relu"},
            {"units": 10, "activation": "linear"},
        ],
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "he", "seed": 0},
        "batch": {"random": {"size": batch, "seed": 0}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, workers: int, workdir: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIAG_")}
        env.update(GRADIAG_LOG_LEVEL="warning")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
        cmd = [sys.executable, "-m", "gradiag.service.cli", "serve", "--host", HOST]
        cmd += ["--port", str(self.port), "--workers", str(workers)]
        self.log = open(workdir / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if (
                    request("GET", self.port, "/healthz")[0] == 200
                    and len(self.workers()) == workers
                ):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("gunicorn did not start in 30 s")

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def request(method: str, port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def load(
    port: int, path: str, body: bytes, seconds: float, connections: int, during: Any = None
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                status, _ = request("POST", port, path, body)
                problem = None if status == 200 else f"HTTP {status}"
            except OSError as err:
                problem = type(err).__name__
            with lock:
                latencies.append(time.perf_counter() - started)
                if problem:
                    errors.append(problem)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    began = time.monotonic()
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(timeout=seconds + 120)
    elapsed = time.monotonic() - began
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 1) if ordered else None,
    }


def scenario_steady(server: Server, name: str, path: str, body: bytes, args: Any) -> dict[str, Any]:
    load(server.port, path, body, 2, args.connections)  # warm-up: imports, caches, allocator
    before = {pid: rss_mib(pid) for pid in server.workers()}
    result = load(server.port, path, body, args.seconds, args.connections)
    after = {pid: rss_mib(pid) for pid in server.workers()}  # max_requests may recycle one
    result["rss_mib_before"] = [round(v, 1) for v in before.values()]
    result["rss_mib_after"] = [round(v, 1) for v in after.values()]
    result["workers_recycled"] = len(set(before) - set(after))
    return {"scenario": name, **result}


def scenario_kill(server: Server, body: bytes, args: Any) -> dict[str, Any]:
    old = server.workers()
    killed: list[int] = []

    def kill_one() -> None:
        time.sleep(args.seconds / 3)
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    result = load(server.port, "/v1/graph", body, args.seconds, args.connections, kill_one)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(server.workers()) < len(old):
        time.sleep(0.1)
    now = server.workers()
    return {
        "scenario": "SIGKILL one worker mid-load",
        **result,
        "killed": killed,
        "workers_after": len(now),
        "replaced": len(now) == len(old) and killed[0] not in now,
    }


def scenario_drain(workdir: Path, args: Any) -> dict[str, Any]:
    server = Server(1, workdir / "drain")
    # 700 x 700 by broadcasting, then 24 matmuls: ~2 s of BLAS, under the FLOP limit
    chain = " @ ".join(["(a + b)"] * 25)
    slow = json.dumps(
        {
            "expression": f"sum({chain})",
            "values": {"a": [[0.001]] * 700, "b": [[0.001] * 700]},
        }
    ).encode()
    outcome: dict[str, Any] = {}

    def slow_request() -> None:
        started = time.monotonic()
        try:
            outcome["status"] = request("POST", server.port, "/v1/graph", slow)[0]
        except OSError as err:
            outcome["status"] = type(err).__name__
        outcome["seconds"] = round(time.monotonic() - started, 2)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.5)  # the body is sent and the worker is computing
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    server.proc.wait(timeout=60)
    exited = round(time.monotonic() - signalled, 2)
    server.log.close()
    return {
        "scenario": "SIGTERM to the master during a slow request",
        "in_flight_status": outcome.get("status"),
        "in_flight_seconds": outcome.get("seconds"),
        "master_exit_after_s": exited,
        "exit_code": server.proc.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    sigmoid = SIGMOID.read_bytes()
    net = json.dumps(network_body()).encode()
    results = []
    with tempfile.TemporaryDirectory(prefix="gradiag-load-") as tmp:
        workdir = Path(tmp)
        (workdir / "drain").mkdir()
        server = Server(args.workers, workdir)
        try:
            results.append(
                scenario_steady(server, "sigmoid expression", "/v1/graph", sigmoid, args)
            )
            results.append(
                scenario_steady(server, "network 64-128-128-10, batch 64", "/v1/network", net, args)
            )
            results.append(scenario_kill(server, sigmoid, args))
        finally:
            server.stop()
        results.append(scenario_drain(workdir, args))
    for r in results:
        print(json.dumps(r))
    steady_ok = all(r["errors"] == 0 for r in results[:2])
    kill_ok = results[2]["replaced"] and results[2]["errors"] <= 2
    drain_ok = results[3]["in_flight_status"] == 200
    print(
        f"steady: {'ok' if steady_ok else 'FAIL'}; kill: {'ok' if kill_ok else 'FAIL'}; "
        f"drain: {'ok' if drain_ok else 'FAIL'}"
    )
    return 0 if steady_ok and kill_ok and drain_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
