"""gradiag's benchmark (`make bench`): every ratio is measured in this one run.

Runs in .venv-bench (the project plus the `bench` extra: torch==2.13.0 CPU, micrograd==0.1.0,
threadpoolctl); torch never enters the test environment. What is compared runs in
interleaved rounds after a warm-up (`interleaved`): each time is the median of the rounds,
each ratio the median of the rounds' ratios, so the machine's drift cancels. Results:
bench/results/<stamp>.json and .md, and the latest copies bench/results/latest.json /
latest.md. `--quick` runs fewer repetitions and skips the 1M-node graphs.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import requests

from bench import cnn_bench, onnx_bench, training_bench
from bench.common import Server, interleaved, median_ratio, peak_rss, post
from gradiag.client.packed import pack, unpack

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EXAMPLES = Path(os.environ.get("GRADIAG_EXAMPLES", "/work/shared/examples"))
SIGMOID_BODY = {
    "expression": "sigmoid(w0*x0 + w1*x1 + w2)",
    "values": {"w0": 2, "x0": -1, "w1": -3, "x1": -2, "w2": -3},
}
BIG_MLP = [784, 1024, 1024, 1024, 10]
BATCH = 256


# --- machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from threadpoolctl import threadpool_info

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas": [
            {k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for info in threadpool_info()
        ],
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


# --- network mode vs PyTorch -------------------------------------------------------------


def network_body(dims: list[int], batch: int, dtype: str) -> dict[str, Any]:
    *hidden, last = dims[1:]
    return {
        "input_dim": dims[0],
        "layers": [{"units": u, "activation": "relu"} for u in hidden]
        + [{"units": last, "activation": "linear"}],
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "he", "seed": 0},
        "batch": {"random": {"size": batch, "seed": 0}},
        "dtype": dtype,
    }


def bench_network(dtype: str, reps: int) -> dict[str, Any]:
    """gradiag; PyTorch with the same report and with none; the network's own matmuls and a
    square one in plain NumPy: in interleaved rounds (`interleaved`), each ratio the median
    of the rounds' ratios."""
    import torch

    from gradiag.engine import run
    from gradiag.engine.network import (
        NetworkLimits,
        compile_network,
        leaf_values,
        network_diagnostics,
        with_leaves,
    )
    from gradiag.schemas.network import NetworkRequest
    from gradiag.service.frontend import engine_thresholds
    from gradiag.service.network import network_spec

    request = NetworkRequest.model_validate(network_body(BIG_MLP, BATCH, dtype))
    spec = network_spec(request)
    leaves = leaf_values(spec)  # weights and batch drawn once, outside the timing
    thresholds = engine_thresholds(request.thresholds)

    def gradiag() -> None:
        # as the service: compiled per request, X's gradient not asked for
        program = compile_network(spec, NetworkLimits(), gradients=False)
        result = run(with_leaves(program, leaves))
        network_diagnostics(result, spec, thresholds)

    tdtype = torch.float64 if dtype == "float64" else torch.float32
    gen = torch.Generator().manual_seed(0)
    dims = BIG_MLP
    weights = [
        (torch.randn(a, b, generator=gen, dtype=tdtype) * (2 / a) ** 0.5).requires_grad_()
        for a, b in itertools.pairwise(dims)
    ]
    biases = [torch.zeros(b, dtype=tdtype, requires_grad=True) for b in dims[1:]]
    x = torch.randn(BATCH, dims[0], generator=gen, dtype=tdtype)
    y = torch.randint(0, dims[-1], (BATCH,), generator=gen)

    def finite(t: Any, total: float | None = None) -> bool:
        """As gradiag reads it: a number made from every element (a sum, a norm, a mean) is
        NaN or inf whenever an element is, so only a non-finite one costs the exact check."""
        total = float(t.sum()) if total is None else total
        return math.isfinite(total) or bool(torch.isfinite(t).all())

    def pytorch() -> None:
        h = x
        pre, post, grads = [], [], {}  # each layer's z and a; their gradients, by hook
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            z = torch.addmm(b, h, w)  # as nn.Linear: x @ W + b in one call
            z.register_hook(lambda g, k=k: grads.__setitem__(("z", k), g))  # no copy
            h = torch.relu(z) if k < len(weights) - 1 else z
            if h is not z:
                h.register_hook(lambda g, k=k: grads.__setitem__(("a", k), g))
            pre.append(z)
            post.append(h)
        loss = torch.nn.functional.cross_entropy(h, y)
        for p in (*weights, *biases):
            p.grad = None
        loss.backward()
        # what gradiag's network report holds, read the way a PyTorch user would: per layer
        # the dead units and fraction, the activations' mean and std, the weight norm and
        # the gradient norms of W, b and z; whether every value and gradient is finite (from
        # those numbers where there is one, as gradiag does)
        with torch.no_grad():
            checks = [finite(x), finite(loss)]
            for k, (z, a, w, b) in enumerate(zip(pre, post, weights, biases, strict=True)):
                if k < len(weights) - 1:
                    dead = z <= 0
                    dead.all(dim=0).nonzero().flatten().tolist()
                    int(dead.count_nonzero()) / dead.numel()
                    checks.append(finite(grads[("a", k)]))
                _std, mean = (float(v) for v in torch.std_mean(a, correction=0))
                tensors = (w, w.grad, b.grad, grads[("z", k)])
                norms = [float(t.norm()) for t in tensors]
                checks += [finite(z), finite(b), finite(a, mean)]
                checks += [finite(t, n) for t, n in zip(tensors, norms, strict=True)]
            all(checks)
            float(loss)

    def pytorch_bare() -> None:
        """Forward and backward only: the floor of what any report costs in PyTorch."""
        h = x
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.addmm(b, h, w)
            if k < len(weights) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, y)
        for p in (*weights, *biases):
            p.grad = None
        loss.backward()

    gemms, flops = network_gemms(dims, BATCH, dtype)
    square = square_matmul(dtype)
    runs = {
        "gradiag": gradiag,
        "torch": pytorch,
        "torch_bare": pytorch_bare,
        "gemms": gemms,
        "square": square,
    }
    times = interleaved(runs, reps, discard=1, keep=2)  # threads: see `interleaved`
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "dtype": dtype,
        "rounds": reps,
        "flops": flops,
        "gradiag_s": median["gradiag"],
        "torch_s": median["torch"],
        "gemms_s": median["gemms"],
        "ratio_vs_torch": median_ratio(times["gradiag"], times["torch"]),
        "torch_bare_s": median["torch_bare"],
        "ratio_vs_torch_bare": median_ratio(times["gradiag"], times["torch_bare"]),
        "gradiag_gflops": flops / median["gradiag"] / 1e9,
        "matmul_gflops": flops / median["gemms"] / 1e9,
        "fraction_of_matmul": median_ratio(times["gemms"], times["gradiag"]),
        "square_matmul_gflops": 2 * SQUARE**3 / median["square"] / 1e9,
    }


def network_gemms(dims: list[int], batch: int, dtype: str) -> tuple[Callable[[], None], int]:
    """The matrix products gradiag's lowered network computes, as plain NumPy matmuls on
    arrays of the same shapes, and their FLOPs: per layer the forward x @ W and the weight
    gradient x.T @ dz, and the input gradient dz @ W.T for every layer but the first (the
    input batch's gradient is not asked). The machine's matmul rate on this very work."""
    rng = np.random.default_rng(0)
    pairs = list(itertools.pairwise(dims))
    weights = [rng.standard_normal((a, b)).astype(dtype) for a, b in pairs]
    inputs = [rng.standard_normal((batch, a)).astype(dtype) for a, _ in pairs]
    upstream = [rng.standard_normal((batch, b)).astype(dtype) for _, b in pairs]

    def gemms() -> None:
        for k, (x, w, dz) in enumerate(zip(inputs, weights, upstream, strict=True)):
            np.matmul(x, w)
            np.matmul(x.T, dz)
            if k:
                np.matmul(dz, w.T)

    flops = sum(2 * batch * a * b * (3 if k else 2) for k, (a, b) in enumerate(pairs))
    return gemms, flops


SQUARE = 1024  # the square matmul reported beside (info): the machine's best-case rate


def square_matmul(dtype: str) -> Callable[[], Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((SQUARE, SQUARE)).astype(dtype)
    b = rng.standard_normal((SQUARE, SQUARE)).astype(dtype)
    return lambda: a @ b


# --- scalar graphs: gradiag over HTTP vs micrograd in process ----------------------------

Node = tuple[str, str, tuple[int, ...], float]  # id, op, operand indices, leaf value


def scalar_mlp(target: int, seed: int = 0) -> list[Node]:
    """A micrograd-style MLP expanded to scalars: relu(sum_i w_i x_i + b) per neuron."""
    rng = random.Random(seed)
    width = max(4, int((target / 9) ** 0.5))  # 3w^2 + 3w nodes per layer: about 3 layers
    nodes: list[Node] = []

    def leaf(op: str) -> int:
        nodes.append((f"v{len(nodes)}", op, (), rng.uniform(-1, 1)))
        return len(nodes) - 1

    def op(name: str, *ins: int) -> int:
        nodes.append((f"v{len(nodes)}", name, ins, 0.0))
        return len(nodes) - 1

    layer = [leaf("input") for _ in range(width)]
    while True:
        out = []
        for _ in range(width):
            acc = leaf("param")
            for x in layer:
                acc = op("add", acc, op("mul", leaf("param"), x))
            out.append(op("relu", acc))
        layer = out
        if len(nodes) + width * (3 * width + 3) // 2 + width > target:  # nearest to target
            break
    acc = layer[0]
    for x in layer[1:]:
        acc = op("add", acc, x)
    return nodes


def random_dag(target: int, seed: int = 0) -> list[Node]:
    """Random add/mul/relu nodes over 64 params in [-1, 1], operands drawn near the end (deep)
    and from the last 1000 usable rows (fan-out). An add is used only through a mul with the
    param 0.5 (the mean of the two), so every value stays in [-1, 1]: a DAG of unscaled sums
    overflows after ~1000 levels and would benchmark the non-finite paths instead."""
    rng = random.Random(seed)
    nodes: list[Node] = [(f"v{k}", "param", (), rng.uniform(-1, 1)) for k in range(64)]
    nodes[0] = ("v0", "param", (), 0.5)
    usable = list(range(64))  # rows an operand may name: not a raw add

    def append(op: str, *ins: int) -> int:
        nodes.append((f"v{len(nodes)}", op, ins, 0.0))
        return len(nodes) - 1

    while len(nodes) < target:
        j = usable[-1 - min(int(rng.expovariate(0.01)), len(usable) - 1)]
        i = usable[rng.randrange(max(0, len(usable) - 1000), len(usable))]
        kind = rng.random()
        if kind < 0.2:
            usable.append(append("relu", j))
        elif kind < 0.6:
            usable.append(append("mul", i, j))
        else:
            usable.append(append("mul", append("add", i, j), 0))
    return nodes[:target]


def graph_body(nodes: list[Node]) -> dict[str, Any]:
    wire = []
    for node_id, op, ins, value in nodes:
        if ins:
            wire.append({"id": node_id, "op": op, "inputs": [nodes[j][0] for j in ins]})
        else:
            wire.append({"id": node_id, "op": op, "value": value})
    return {"nodes": wire, "output": nodes[-1][0]}


def columns_body(nodes: list[Node]) -> dict[str, Any]:
    """The same graph as a columns body: rows in the generator's (topological) order."""
    return {
        "columns": {
            "op": [op for _, op, _, _ in nodes],
            "inputs": [
                [ins[0] if ins else -1 for _, _, ins, _ in nodes],
                [ins[1] if len(ins) > 1 else -1 for _, _, ins, _ in nodes],
            ],
            "value": [None if ins else value for _, _, ins, value in nodes],
        }
    }


class PackedTable:
    """The graph as NumPy columns, the form a client holding arrays has (built outside the
    timing); `body()` packs them into a packed columns body (inside the timing: the packing
    is this body's JSON encoding)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.names = list(dict.fromkeys(op for _, op, _, _ in nodes))
        code = {name: k for k, name in enumerate(self.names)}
        self.codes = np.array([code[op] for _, op, _, _ in nodes], np.uint8)
        self.inputs = [
            np.array([ins[k] if len(ins) > k else -1 for _, _, ins, _ in nodes], np.int32)
            for k in range(2)
        ]
        self.value = np.array([np.nan if ins else v for _, _, ins, v in nodes], np.float64)

    def body(self) -> dict[str, Any]:
        return {
            "columns": {
                "op": {"names": self.names, "codes": pack(self.codes)},
                "inputs": [pack(column) for column in self.inputs],
                "value": pack(self.value),
            },
            "encoding": "packed",
        }


def micrograd_run(nodes: list[Node]) -> None:
    from micrograd.engine import Value

    values: list[Any] = []
    for _, op, ins, value in nodes:
        if not ins:
            values.append(Value(value))
        elif op == "add":
            values.append(values[ins[0]] + values[ins[1]])
        elif op == "mul":
            values.append(values[ins[0]] * values[ins[1]])
        else:
            values.append(values[ins[0]].relu())
    values[-1].backward()


def micrograd_reclaimed(nodes: list[Node]) -> None:
    """micrograd's forward and backward as a loop of them costs: its graph is cyclic (each
    Value's `_backward` closure holds the Value), so only the cyclic collector frees it, and
    that collection is counted here, once per graph. The caller freezes the bench's own
    objects first: a micrograd script's heap is small, and every collector pass over the
    bench's 100k- and 1M-node bodies made micrograd look 1.5-5x slower than it is."""
    micrograd_run(nodes)
    gc.collect()


def in_big_stack(fn: Callable[[], Any]) -> Any:
    """micrograd's backward recurses: run it with a deep recursion limit on a big stack."""
    out: list[Any] = []
    sys.setrecursionlimit(10**7)
    threading.stack_size(1 << 30)
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    threading.stack_size(0)
    return out[0] if out else None


def bench_scalar(url: str, default_url: str, size: int, kind: str, reps: int) -> dict[str, Any]:
    """One graph four ways: the packed columns body, the columns body and the nodes body end
    to end over HTTP (the body is built outside the timing; its JSON encoding, packing
    included, is inside, and so is decoding the answer), micrograd in process."""
    nodes = (scalar_mlp if kind == "mlp" else random_dag)(size)
    bodies = {"columns": columns_body(nodes), "nodes": graph_body(nodes)}
    table = PackedTable(nodes)
    row: dict[str, Any] = {"kind": kind, "size": size, "nodes": len(nodes)}
    if size >= 1_000_000:
        for form, body in {"packed": table.body(), **bodies}.items():
            try:
                status, problem = post(default_url, body)
            except ConnectionResetError:  # refused so early that the answer was lost
                status, problem = 0, None
            row[f"default_server_status_{form}"] = status
            title = problem.get("title") if isinstance(problem, dict) else None
            row[f"default_server_problem_{form}"] = title

    def over_http(body: dict[str, Any]) -> Callable[[], None]:
        def gradiag() -> None:
            status, _ = post(url, body)
            assert status == 200, status

        return gradiag

    def gradiag_packed() -> None:
        status, answer = post(url, table.body())
        assert status == 200, status
        grads = unpack(answer["columns"]["grad"])
        assert grads.size == len(nodes), grads.size

    runs = {form: over_http(body) for form, body in bodies.items()}
    runs["packed"] = gradiag_packed
    runs["micrograd"] = lambda: in_big_stack(lambda: micrograd_reclaimed(nodes))
    gc.collect()
    gc.freeze()  # the bench's own objects (these bodies: millions) out of every collection
    try:
        times = interleaved(runs, reps)
    finally:
        gc.unfreeze()
    for form in ("packed", "columns", "nodes"):
        row[f"{form}_http_s"] = statistics.median(times[form])
        row[f"speedup_{form}"] = median_ratio(times["micrograd"], times[form])
    row["gradiag_http_s"] = row["packed_http_s"]
    row["micrograd_s"] = statistics.median(times["micrograd"])
    return row


# --- service throughput ------------------------------------------------------------------


# wrk's Lua `done` hook prints one JSON line: requests, seconds, errors, p50/p99 (us).
WRK_SCRIPT = """
wrk.method = os.getenv("BENCH_METHOD")
local path = os.getenv("BENCH_BODY")
if path ~= "" then
  local f = io.open(path, "rb"); wrk.body = f:read("*a"); f:close()
  wrk.headers["Content-Type"] = "application/json"
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %f, "errors": %d, "p50_us": %f, "p99_us": %f}\\n',
    summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def load_generator() -> str:
    """wrk when installed (C, event loop: it costs the 2 shared cores far less than the
    server does); otherwise the Python thread client, whose own CPU use caps /healthz and
    so flatters every ratio against it."""
    return "wrk" if shutil.which("wrk") else "python threads"


def load(url: str, method: str, path: str, body: bytes | None, seconds: float, clients: int):
    if load_generator() == "wrk":
        return load_wrk(url, method, path, body, seconds, clients)
    return load_threads(url, method, path, body, seconds, clients)


def load_wrk(url: str, method: str, path: str, body: bytes | None, seconds: float, clients: int):
    """One wrk thread, `clients` connections; any non-2xx answer or socket error fails."""
    with tempfile.TemporaryDirectory() as tmp:
        script, body_file = Path(tmp, "load.lua"), Path(tmp, "body.json")
        script.write_text(WRK_SCRIPT)
        body_file.write_bytes(body or b"")
        env = {**os.environ, "BENCH_METHOD": method, "BENCH_BODY": str(body_file) if body else ""}
        flags = ["-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "-s", str(script)]
        out = subprocess.run(
            ["wrk", *flags, url + path],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["errors"] == 0, (path, out)
    return {
        "path": path,
        "requests": row["requests"],
        "rps": row["requests"] / row["seconds"],
        "p50_ms": row["p50_us"] / 1000,
        "p99_ms": row["p99_us"] / 1000,
    }


def load_threads(
    url: str, method: str, path: str, body: bytes | None, seconds: float, clients: int
):
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        mine = []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            if method == "GET":
                r = session.get(url + path, timeout=60)
            else:
                r = session.post(
                    url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60
                )
            assert r.status_code == 200, (path, r.status_code)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "path": path,
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def bench_throughput(url: str, seconds: float, clients: int, rounds: int = 3) -> dict[str, Any]:
    """req/s of each endpoint, measured in `rounds` interleaved rounds (healthz, graph,
    network, healthz, ...) so that a ratio compares neighbours in time: on a shared machine
    the rate drifts by 2x over a minute. Each ratio is the median of its rounds' ratios."""
    mid = orjson.dumps(network_body([64, 128, 128, 10], 64, "float64"))
    sigmoid = orjson.dumps(SIGMOID_BODY)
    sigmoid_file = EXAMPLES / "cs231n-sigmoid.expression.json"
    if sigmoid_file.exists():
        sigmoid = sigmoid_file.read_bytes()
    for path, body in (("/v1/graph", sigmoid), ("/v1/network", mid)):  # warm-up
        load(url, "POST", path, body, 0.5, 1)
    runs: dict[str, list[dict[str, Any]]] = {"healthz": [], "graph": [], "network": []}
    for _ in range(rounds):
        runs["healthz"].append(load(url, "GET", "/healthz", None, seconds / rounds, clients))
        runs["graph"].append(load(url, "POST", "/v1/graph", sigmoid, seconds / rounds, clients))
        runs["network"].append(load(url, "POST", "/v1/network", mid, seconds / rounds, clients))
    rows: dict[str, Any] = {}
    for name, measured in runs.items():
        rows[name] = {
            "path": measured[0]["path"],
            "requests": sum(m["requests"] for m in measured),
            **{
                key: statistics.median(m[key] for m in measured)
                for key in ("rps", "p50_ms", "p99_ms")
            },
            "rounds": measured,
        }
    rows["generator"], rows["clients"] = load_generator(), clients
    for name in ("graph", "network"):
        rows[name]["ratio_vs_healthz"] = statistics.median(
            g["rps"] / h["rps"] for g, h in zip(runs[name], runs["healthz"], strict=True)
        )
    return rows


# --- peak RSS of the big-MLP request -----------------------------------------------------


def bench_rss(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, **peak_rss(network_body(BIG_MLP, BATCH, dtype))}


# --- report ------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def summary(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# gradiag benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads); BLAS "
        + ", ".join(
            f"{b['internal_api']} {b['version']} {b['architecture']} ({b['num_threads']} threads)"
            for b in m["blas"]
        )
        + f"; OPENBLAS_CORETYPE={m['OPENBLAS_CORETYPE']}",
        "",
        "| measurement | gradiag | baseline | ratio | target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["network"]:
        lines.append(
            f"| MLP 784-1024x3-10 b256 {row['dtype']} fwd+bwd+diag "
            f"| {row['gradiag_s'] * 1e3:.1f} ms "
            f"| torch, same report {row['torch_s'] * 1e3:.1f} ms "
            f"| {row['ratio_vs_torch']:.2f}x time | <= 1.0 "
            f"| {verdict(row['ratio_vs_torch'] <= 1.0)} |"
        )
        lines.append(
            f"| ... against PyTorch forward+backward alone, no report {row['dtype']} (info) "
            f"| {row['gradiag_s'] * 1e3:.1f} ms | torch {row['torch_bare_s'] * 1e3:.1f} ms "
            f"| {row['ratio_vs_torch_bare']:.2f}x time | (info) |  |"
        )
        lines.append(
            f"| ... achieved rate {row['dtype']} | {row['gradiag_gflops']:.1f} GFLOP/s "
            f"| its matmuls alone {row['matmul_gflops']:.1f} GFLOP/s "
            f"| {row['fraction_of_matmul']:.0%} | >= 85% "
            f"| {verdict(row['fraction_of_matmul'] >= 0.85)} |"
        )
        lines.append(
            f"| ... square {SQUARE}x{SQUARE} matmul {row['dtype']} (info) "
            f"| {row['gradiag_gflops']:.1f} GFLOP/s | {row['square_matmul_gflops']:.1f} GFLOP/s "
            f"| {row['gradiag_gflops'] / row['square_matmul_gflops']:.0%} | (info) |  |"
        )
    for row in results["scalar"]:
        for form in ("packed", "columns", "nodes"):
            speedup = f"speedup_{form}"
            main = form == "packed" and row["size"] == 100_000
            target, ok = (">= 20x", verdict(row[speedup] >= 20)) if main else ("(info)", "")
            note = ""
            if f"default_server_status_{form}" in row:
                status = row[f"default_server_status_{form}"]
                note = f" (default server: {status}; raised limits used)"
            lines.append(
                f"| scalar {row['kind']} {row['nodes']:,} nodes, {form} body, HTTP end to end"
                f"{note} | {row[f'{form}_http_s'] * 1e3:.0f} ms "
                f"| micrograd {row['micrograd_s'] * 1e3:.0f} ms "
                f"| {row[speedup]:.1f}x faster | {target} | {ok} |"
            )
    lines += onnx_bench.summary_lines(results["onnx"])
    t = results["throughput"]
    for name in ("graph", "network"):
        row = t[name]
        target, ok = (
            (">= 0.7x", verdict(row["ratio_vs_healthz"] >= 0.7))
            if name == "graph"
            else ("(info)", "")
        )
        lines.append(
            f"| POST {row['path']} req/s (p50/p99 ms), {t['generator']} "
            f"x{t['clients']} | {row['rps']:.0f} "
            f"({row['p50_ms']:.1f}/{row['p99_ms']:.1f}) | /healthz {t['healthz']['rps']:.0f} "
            f"({t['healthz']['p50_ms']:.1f}/{t['healthz']['p99_ms']:.1f}) "
            f"| {row['ratio_vs_healthz']:.2f}x | {target} | {ok} |"
        )
    lines += cnn_bench.summary_lines(results["cnn"], results["cnn_rss"])
    for row in results["rss"]:
        lines.append(
            f"| peak RSS big MLP {row['dtype']} | {row['request_bytes'] / 2**20:.0f} MiB "
            f"| tensors {row['tensor_bytes'] / 2**20:.0f} MiB | {row['ratio']:.2f}x | <= 1.5x "
            f"| {verdict(row['ratio'] <= 1.5)} |"
        )
    lines += training_bench.summary_lines(results.get("training", []))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no 1M graphs")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    import torch

    from gradiag.service.memory import retain_freed_memory

    # as every gunicorn worker does (service/gunicorn_conf.py); PyTorch shares the malloc
    retain_freed_memory()
    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    results: dict[str, Any] = {"machine": machine(), "reps": reps}
    print(f"machine: {results['machine']}", flush=True)

    results["network"] = []
    for dtype in ("float64", "float32"):
        row = bench_network(dtype, 2 * reps + 1)  # short calls: more rounds, same minute
        print(row, flush=True)
        results["network"].append(row)

    results["rss"] = [bench_rss(dtype) for dtype in ("float64", "float32")]
    results["cnn_rss"] = [cnn_bench.bench_cnn_rss(dtype) for dtype in ("float64", "float32")]
    print(results["rss"], flush=True)

    one = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    big = Server(
        1,
        GRADIAG_MAX_NODES="2000000",
        GRADIAG_MAX_BODY_BYTES=str(1 << 30),
        GRADIAG_MAX_RESPONSE_BYTES=str(1 << 31),  # the 1M-node nodes body answers ~80 MB
        GRADIAG_MAX_REQUEST_MEMORY_BYTES=str(1 << 33),
        GRADIAG_TIME_BUDGET_SECONDS="600",  # the whole request, the body's parsing included
        GRADIAG_GRACEFUL_TIMEOUT="700",
        GRADIAG_TIMEOUT="900",
        **one,
    )
    default = Server(1, **one)
    try:
        results["cnn"] = [cnn_bench.bench_cnn(default.url, d, reps) for d in ("float64", "float32")]
        print(results["cnn"], flush=True)
        results["scalar"] = []
        sizes = [10_000, 100_000] + ([] if args.quick else [1_000_000])
        for size in sizes:
            for kind in ("mlp", "dag"):
                n = reps if size < 1_000_000 else 1
                row = bench_scalar(big.url, default.url, size, kind, n)
                print(row, flush=True)
                results["scalar"].append(row)
        results["training"] = training_bench.rows(default.url, reps)
        print(results["training"], flush=True)
    finally:
        big.close()
        default.close()

    server = Server(os.cpu_count() or 1, **one)
    try:
        results["onnx"] = onnx_bench.onnx_row(server.url, reps)
        results["throughput"] = bench_throughput(server.url, 6.0 if args.quick else 15.0, 8)
        print(results["throughput"], flush=True)
    finally:
        server.close()

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    text = summary(results)
    for name in (stamp, "latest"):
        (RESULTS / f"{name}.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        (RESULTS / f"{name}.md").write_text(text)
    print(text)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"(bench process peak RSS {peak / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
