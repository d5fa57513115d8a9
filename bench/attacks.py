"""The outsider's attacks of docs/hardening.md, measured (`make attacks`; not in `make test`).

Each scenario starts `gradiag serve` on 127.0.0.1 with default settings (2 workers unless
`--workers`), or, with `--url`, attacks a server that is already running (the container
image under podman/docker, as deploy/README.md runs it); RSS and log figures need a local
server. `--server-python` runs the server of another checkout (the "before" column).

- slow: a concurrent /v1/graph load (the CS231n sigmoid, `--load-connections` clients) and a
  /healthz probe every 0.1 s, first alone, then beside `--attackers` connections that are
  idle, send their headers a byte a second, or send a short body (Content-Length larger
  than what they send); each attacker reconnects whenever the server drops it;
- bombs: the 85 KB broadcast graph and the 190-byte 2000x2000 network (status, time, answer
  bytes, worker RSS before and after), also as pictures;
- floods: invalid bodies up to the size limit (time, status, answer bytes; a marker in
  the body must not reach the server's log);
- labels: 5,000 requests with random 20-letter methods (size and time of a scrape);
- shutdown: SIGTERM 0.5 s into a request that runs to the time budget (one worker).

Prints one JSON line per measurement. The client shares the machine's cores with the
server, so throughput figures are floors.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import random
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
SIGMOID = json.dumps(
    {
        "expression": "sigmoid(w0*x0 + w1*x1 + w2)",
        "values": {"w0": 2, "x0": -1, "w1": -3, "x1": -2, "w2": -3},
    }
).encode()
SECRET = "bench-marker-from-the-body"


# --- a server ---------------------------------------------------------------------------


class Server:
    """`gradiag serve` of `python` on a free port, or a running server at `url`."""

    def __init__(
        self, python: str | None, workers: int, workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIAG_")}
        server_env.update(GRADIAG_LOG_LEVEL="info", PROMETHEUS_MULTIPROC_DIR=str(workdir / "m"))
        server_env.update(env or {})
        command = [python or sys.executable, "-m", "gradiag.service.cli", "serve"]
        command += ["--host", HOST, "--port", str(self.port), "--workers", str(workers)]
        self.log_path = workdir / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            command, cwd=workdir, env=server_env, stdout=self.log, stderr=self.log
        )
        self.wait_ready(workers)

    @classmethod
    def at(cls, url: str) -> Server:
        server = cls.__new__(cls)
        parts = urlsplit(url)
        server.port, server.proc = int(parts.port or 80), None
        return server

    def wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get(self.port, "/healthz", 2)[0] == 200 and len(self.workers()) == workers:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not start in 60 s")

    def workers(self) -> list[int]:
        if self.proc is None:
            return []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def cpu_seconds(self) -> float:
        """User and system CPU of the master and its workers so far, recycled workers
        included (the master's children's times); 0 for `--url`."""
        if self.proc is None:
            return 0.0
        total = 0
        for pid, dead_children in [(self.proc.pid, True)] + [(w, False) for w in self.workers()]:
            with suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
                if dead_children:
                    total += int(fields[13]) + int(fields[14])  # cutime, cstime
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> list[float]:
        return [round(rss_mib(pid), 1) for pid in self.workers()]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.proc is not None else ""

    def stop(self) -> float:
        """SIGTERM; the seconds until the master exited."""
        if self.proc is None:
            return 0.0
        started = time.monotonic()
        self.proc.terminate()
        self.proc.wait(timeout=120)
        self.log.close()
        return time.monotonic() - started


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def request(
    method: str, port: int, path: str, body: bytes | None = None, timeout: float = 60
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get(port: int, path: str, timeout: float = 60) -> tuple[int, bytes]:
    return request("GET", port, path, timeout=timeout)


def timed(call: Callable[[], tuple[int, bytes]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        status, body = call()
        out: dict[str, Any] = {"status": status, "answer_bytes": len(body)}
    except OSError as err:
        out = {"status": type(err).__name__, "answer_bytes": 0}
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[int(q * (len(ordered) - 1))], 4) if ordered else None


# --- slow clients ------------------------------------------------------------------------


def _attacker(port: int, kind: str, count: int, stop_at: float) -> None:
    """`count` connections of one kind, in one process (asyncio), each reconnecting when
    the server drops it, until `stop_at` (a time.time() value). At nice 10: attackers would
    be other machines; here they share the server's two cores."""
    os.nice(10)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    short_body = (
        b"POST /v1/graph HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b'\r\nContent-Length: 100000\r\n\r\n{"nodes": ['
    )

    async def one() -> None:
        while time.time() < stop_at:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            closed = asyncio.ensure_future(reader.read())  # the server's close (or its 408)
            try:
                if kind == "short-body":
                    writer.write(short_body)
                sent = 0
                while time.time() < stop_at and not closed.done():
                    if kind == "byte-headers":  # a byte a second
                        writer.write(head[sent : sent + 1])
                        sent += 1
                    await asyncio.wait([closed], timeout=1.0)
            except OSError:
                pass
            finally:
                closed.cancel()
                writer.close()

    async def all_of_them() -> None:
        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(all_of_them())


def _load(port: int, seconds: float, connections: int, timeout: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                status, _ = request("POST", port, "/v1/graph", SIGMOID, timeout)
                problem = None if status == 200 else f"HTTP {status}"
            except OSError as err:
                problem = type(err).__name__
            with lock:
                latencies.append(time.perf_counter() - started)
                if problem:
                    errors.append(problem)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    ok = len(latencies) - len(errors)
    return {"graph_ok_per_s": round(ok / seconds, 1), "graph_errors": len(errors)}


def _probe(port: int, seconds: float, timeout: float) -> dict[str, Any]:
    latencies: list[float] = []
    failed = 0
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        try:
            ok = get(port, "/healthz", timeout)[0] == 200
        except OSError:
            ok = False
        elapsed = time.perf_counter() - started
        latencies.append(elapsed if ok else timeout)
        failed += not ok
        time.sleep(max(0.0, 0.1 - elapsed))
    return {
        "healthz_probes": len(latencies),
        "healthz_failed": failed,
        "healthz_p50_s": percentile(latencies, 0.5),
        "healthz_p99_s": percentile(latencies, 0.99),
        "healthz_max_s": round(max(latencies), 4) if latencies else None,
    }


def _probe_into(out: dict[str, Any], port: int, seconds: float) -> None:
    out.update(_probe(port, seconds, 5.0))


def _phase(server: Server, kind: str, args: Any) -> dict[str, Any]:
    """The load and the probe for `args.seconds`, beside `args.attackers` connections of
    `kind` ("none": alone)."""
    attackers: list[multiprocessing.Process] = []
    if kind != "none":
        stop_at = time.time() + args.seconds + 10
        for _ in range(2):  # two processes share the connections
            process = multiprocessing.Process(
                target=_attacker, args=(server.port, kind, args.attackers // 2, stop_at)
            )
            process.start()
            attackers.append(process)
        time.sleep(3)  # all connected
    probe: dict[str, Any] = {}
    prober = threading.Thread(target=_probe_into, args=(probe, server.port, args.seconds))
    cpu = server.cpu_seconds()
    prober.start()
    result = _load(server.port, args.seconds, args.load_connections, 5.0)
    prober.join(args.seconds + 30)
    served = result["graph_ok_per_s"] * args.seconds
    if served and server.proc is not None:  # the server's CPU per graph answered
        result["server_cpu_ms_per_graph"] = round(1000 * (server.cpu_seconds() - cpu) / served, 3)
    for process in attackers:
        process.terminate()
        process.join(10)
    time.sleep(2)
    return {**result, **probe}


def slow_clients(server: Server, args: Any) -> Iterator[dict[str, Any]]:
    """Each attack right after a phase without it, `--rounds` times: the machine's other
    load (2 shared cores) moves both alike, and the rate is compared with its neighbour."""
    for round_ in range(args.rounds):
        for kind in args.attacks.split(","):
            normal = _phase(server, "none", args)
            attacked = _phase(server, kind, args)
            rate = normal["graph_ok_per_s"]
            yield {
                "scenario": "slow clients",
                "round": round_ + 1,
                "attack": kind,
                "connections": args.attackers,
                "normal": normal,
                "attacked": attacked,
                "graph_rate_vs_normal": round(attacked["graph_ok_per_s"] / rate, 2)
                if rate
                else None,
            }


# --- bombs, floods, labels, shutdown -------------------------------------------------------


def broadcast_bomb(**more: Any) -> bytes:
    nodes = [
        {"id": "a", "op": "input", "value": [[0.5]] * 1999},
        {"id": "b", "op": "input", "value": [[0.25] * 1999]},
        {"id": "c", "op": "add", "inputs": ["a", "b"]},
        {"id": "d", "op": "mul", "inputs": ["c", "c"]},
        {"id": "e", "op": "sigmoid", "inputs": ["d"]},
        {"id": "f", "op": "tanh", "inputs": ["e"]},
    ]
    return json.dumps({"nodes": nodes, "output": "f", **more}).encode()


def network_bomb(**more: Any) -> bytes:
    body = {
        "input_dim": 2000,
        "layers": [{"units": 2000}],
        "loss": "sum",
        "batch": {"random": {"size": 1000}},
        "include": ["gradients"],
    }
    return json.dumps({**body, **more}).encode()


def bombs(server: Server, args: Any) -> Iterator[dict[str, Any]]:
    cases = [
        ("graph bomb (85 KB)", "/v1/graph", broadcast_bomb()),
        ("graph bomb as a picture", "/v1/graph.svg", broadcast_bomb()),
        ('graph bomb, "tensors": "summary"', "/v1/graph", broadcast_bomb(tensors="summary")),
        ("network bomb (190 B)", "/v1/network", network_bomb()),
        ("network bomb as a picture", "/v1/network.svg", network_bomb()),
        ('network bomb, "tensors": "summary"', "/v1/network", network_bomb(tensors="summary")),
    ]
    for name, path, body in cases:
        idle = server.rss_mib()
        out = timed(lambda p=path, b=body: request("POST", server.port, p, b, 300))  # type: ignore[misc]
        time.sleep(0.5)
        yield {
            "scenario": "bomb",
            "case": name,
            "body_bytes": len(body),
            **out,
            "worker_rss_mib_before": idle,
            "worker_rss_mib_after": server.rss_mib(),
        }


def _flood(item: bytes, count: int, head: bytes, tail: bytes) -> bytes:
    return head + b",".join([item] * count) + tail


def floods(server: Server, args: Any) -> Iterator[dict[str, Any]]:
    node = b'{"nodes":[{"id":"' + SECRET.encode() + b'","op":"input","value":['
    end = b']}],"output":"x"}'
    cases = [
        ("80,000 booleans (480 KB, the issue's)", _flood(b"true", 80_000, node, end)),
        ("3.3M booleans (16 MB)", _flood(b"true", 3_300_000, node, end)),
        ("2M one-element lists of a boolean (14 MB)", _flood(b"[true]", 2_000_000, node, end)),
        ("5.5M empty nodes (16 MB)", _flood(b"{}", 5_500_000, b'{"nodes":[', b'],"output":"x"}')),
        (
            "1.3M unknown fields in one node (16 MB)",
            b'{"nodes":[{"id":"x","op":"input","value":1,'
            + b",".join(b'"k%d":1' % i for i in range(1_300_000))
            + b'}],"output":"x"}',
        ),
        (
            "a 15M-character id",
            b'{"nodes":[{"id":"' + b"a" * 15_000_000 + b'","op":"input","value":1}],"output":"x"}',
        ),
    ]
    for name, body in cases[: args.floods]:
        out = timed(lambda b=body: request("POST", server.port, "/v1/graph", b, 300))  # type: ignore[misc]
        yield {"scenario": "error flood", "case": name, "body_bytes": len(body), **out}
    yield {
        "scenario": "error flood",
        "case": "body values in the log",
        "found": SECRET in server.log_text(),
    }


def labels(server: Server, args: Any) -> Iterator[dict[str, Any]]:
    def scrape() -> dict[str, Any]:
        started = time.perf_counter()
        status, text = get(server.port, "/metrics")
        lines = [x for x in text.decode().splitlines() if x and not x.startswith("#")]
        return {
            "status": status,
            "bytes": len(text),
            "series": len(lines),
            "seconds": round(time.perf_counter() - started, 4),
        }

    before = scrape()
    for _ in range(args.label_requests):
        method = "".join(random.choices(string.ascii_uppercase, k=20))
        path = "/v1/" + "".join(random.choices("abcdef", k=8))
        with suppress(OSError):
            request(method, server.port, path, None, 10)
    after = scrape()
    yield {
        "scenario": "metric labels",
        "requests": args.label_requests,
        "before": before,
        "after": after,
    }


def budget_runner(legacy: bool) -> bytes:
    """A request that runs into the time budget: a tower of 1500 300 x 300 matmuls (each
    ~54 MFLOP), its tensors summarised (`legacy`: a server older than `tensors`)."""
    nodes: list[dict[str, Any]] = [
        {"id": "a", "op": "input", "value": [[0.001]] * 300},
        {"id": "b", "op": "input", "value": [[0.001] * 300]},
        {"id": "m0", "op": "add", "inputs": ["a", "b"]},
    ]
    nodes += [
        {"id": f"m{k}", "op": "matmul", "inputs": [f"m{k - 1}", "m0"]} for k in range(1, 1500)
    ]
    nodes.append({"id": "out", "op": "sum", "inputs": ["m1499"]})
    body: dict[str, Any] = {"nodes": nodes, "output": "out"}
    if not legacy:
        body["tensors"] = "summary"
    return json.dumps(body).encode()


def slow_upload(port: int, body: bytes, seconds: float) -> tuple[int, bytes]:
    """POST /v1/graph sending the body in ten parts over `seconds` (a slow link)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    try:
        conn.putrequest("POST", "/v1/graph")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        step = len(body) // 10 + 1
        for start in range(0, len(body), step):
            conn.send(body[start : start + step])
            time.sleep(seconds / 10)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def shutdown(python: str | None, workdir: Path, args: Any) -> Iterator[dict[str, Any]]:
    """The time budget shortened to `--budget` s (a request that runs into the default 20 s
    needs limits raised anyway) and the graceful timeout at `--graceful` s: the old default
    had them equal (20 and 20); now it must be at least the budget + 5 (30 and 20)."""
    env = {
        "GRADIAG_TIME_BUDGET_SECONDS": str(args.budget),
        "GRADIAG_GRACEFUL_TIMEOUT": str(args.graceful),
        "GRADIAG_MAX_FLOPS": str(10**13),  # the tower runs into the budget, not the limits
        "GRADIAG_MAX_TOTAL_ELEMENTS": str(10**9),
    }
    server = Server(python, 1, workdir, env)
    outcome: dict[str, Any] = {}
    body = budget_runner(args.legacy)

    def longest() -> None:
        outcome.update(timed(lambda: slow_upload(server.port, body, 1.5)))

    client = threading.Thread(target=longest)
    client.start()
    time.sleep(0.5)
    exited = server.stop()
    client.join(300)
    yield {
        "scenario": "SIGTERM 0.5 s into a request (body sent over 1.5 s) that runs to the budget",
        "budget_s": args.budget,
        "graceful_timeout_s": args.graceful,
        "in_flight": outcome,
        "master_exit_after_s": round(exited, 2),
    }


# --- main ----------------------------------------------------------------------------------


@contextmanager
def serving(args: Any, workdir: Path) -> Iterator[Server]:
    env = dict(item.split("=", 1) for item in args.server_env)
    if args.url:
        server = Server.at(args.url)
    else:
        server = Server(args.server_python, args.workers, workdir, env)
    try:
        yield server
    finally:
        server.stop()


SCENARIOS = ("slow", "bombs", "floods", "labels", "shutdown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--url", help="attack a running server instead of starting one")
    parser.add_argument("--server-python", help="the python of another checkout to serve")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--server-env", action="append", default=[], help="NAME=VALUE")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--attackers", type=int, default=500)
    parser.add_argument("--attacks", default="idle,byte-headers,short-body")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--floods", type=int, default=6, help="how many flood cases to run")
    parser.add_argument("--load-connections", type=int, default=8)
    parser.add_argument("--label-requests", type=int, default=5000)
    parser.add_argument("--budget", type=int, default=3, help="shutdown: the time budget")
    parser.add_argument("--graceful", type=int, default=8, help="shutdown: graceful timeout")
    parser.add_argument("--legacy", action="store_true", help="a server without `tensors`")
    args = parser.parse_args()
    chosen = args.scenarios.split(",")
    with tempfile.TemporaryDirectory(prefix="gradiag-attacks-") as tmp:
        workdir = Path(tmp)
        for name in chosen:
            if name == "shutdown":
                if not args.url:
                    (workdir / "shutdown").mkdir()
                    for line in shutdown(args.server_python, workdir / "shutdown", args):
                        print(json.dumps(line), flush=True)
                continue
            (workdir / name).mkdir()
            with serving(args, workdir / name) as server:
                steps = {"slow": slow_clients, "bombs": bombs, "floods": floods, "labels": labels}
                for line in steps[name](server, args):
                    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
