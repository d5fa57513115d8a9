"""The training what-if against PyTorch (docs/training.md, docs/performance.md).

    .venv-bench/bin/python -m bench.training_bench [--url URL] [--rounds 7]

200 SGD steps (lr 0.1, no momentum) of the 64-100-100-10 relu net, softmax cross-entropy, at
batch 64 from 512 examples in [0, 1) (the sweep's set-up, tests/fixtures/oracle/README.md):
POST /v1/network with `train` over HTTP (the body sent, trained, every step recorded and the
answer read back) against the same 200 steps in PyTorch CPU in process (nn.Linear, ReLU,
cross_entropy, torch.optim.SGD; the data already tensors), float64 and float32. PyTorch runs
with one thread, as each gunicorn worker does, and with the process's default threads; the
faster of the two is the baseline. The three alternate in rounds (`bench.common.interleaved`);
each time is the median of its rounds, each ratio the median of the rounds' ratios, so the
machine's drift cancels. `make bench` calls `rows` and `summary_lines` (bench/run.py); run
alone, this starts its own one-worker server.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import urllib.parse
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from bench.common import Server, interleaved, median_ratio

DIMS = (64, 100, 100, 10)
EXAMPLES, BATCH, STEPS, LR, SEED = 512, 64, 200, 0.1, 0


def training_body(dtype: str) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    x = rng.random((EXAMPLES, DIMS[0]))
    y = rng.integers(0, DIMS[-1], EXAMPLES)
    layers = [{"units": n} for n in DIMS[1:-1]] + [{"units": DIMS[-1], "activation": "linear"}]
    return {
        "input_dim": DIMS[0],
        "layers": layers,
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "he", "seed": SEED},
        "batch": {"x": x.tolist(), "y": y.tolist()},
        "dtype": dtype,
        "train": {"lr": LR, "steps": STEPS, "batch_size": BATCH, "seed": SEED},
    }


def over_http(url: str, body: dict[str, Any]) -> Callable[[], None]:
    """One POST: the body encoded once, outside the timing; the answer read and parsed."""
    raw = orjson.dumps(body)
    where = urllib.parse.urlsplit(url)

    def post() -> None:
        connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=300)
        try:
            connection.request("POST", "/v1/network", raw, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = orjson.loads(response.read())
        finally:
            connection.close()
        assert response.status == 200, answer
        assert len(answer["training"]["steps"]) == STEPS

    return post


def pytorch_loop(dtype: str, threads: int) -> Callable[[], None]:
    import torch

    tdtype = torch.float64 if dtype == "float64" else torch.float32
    body = training_body(dtype)
    x = torch.tensor(body["batch"]["x"], dtype=tdtype)
    y = torch.tensor(body["batch"]["y"])
    order = np.random.default_rng(SEED)
    steps: list[Any] = []
    while len(steps) < STEPS:  # the same minibatches (docs/training.md)
        perm = order.permutation(EXAMPLES)
        steps += [torch.from_numpy(perm[i : i + BATCH]) for i in range(0, EXAMPLES, BATCH)]

    def train() -> None:
        torch.set_num_threads(threads)
        net = torch.nn.Sequential(
            torch.nn.Linear(DIMS[0], DIMS[1]), torch.nn.ReLU(),
            torch.nn.Linear(DIMS[1], DIMS[2]), torch.nn.ReLU(),
            torch.nn.Linear(DIMS[2], DIMS[3]),
        ).to(tdtype)  # fmt: skip
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        for idx in steps[:STEPS]:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        float(loss.detach())

    return train


def rows(url: str, rounds: int = 7) -> list[dict[str, Any]]:
    """One row per dtype: gradiag over HTTP, PyTorch with 1 thread and with the default."""
    import torch

    default_threads = torch.get_num_threads()
    out = []
    for dtype in ("float64", "float32"):
        runs = {
            "gradiag": over_http(url, training_body(dtype)),
            "torch_1": pytorch_loop(dtype, 1),
            "torch_default": pytorch_loop(dtype, default_threads),
        }
        times = interleaved(runs, rounds)
        torch.set_num_threads(default_threads)
        median = {name: statistics.median(t) for name, t in times.items()}
        baseline = min(("torch_1", "torch_default"), key=median.__getitem__)
        out.append(
            {
                "dtype": dtype,
                "rounds": rounds,
                "steps": STEPS,
                "gradiag_http_s": median["gradiag"],
                "torch_1_thread_s": median["torch_1"],
                "torch_default_threads_s": median["torch_default"],
                "torch_default_threads": default_threads,
                "baseline": baseline,
                "ratio": median_ratio(times["gradiag"], times[baseline]),
            }
        )
    return out


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    """The rows of bench/run.py's table."""
    lines = []
    for row in results:
        torch_s = min(row["torch_1_thread_s"], row["torch_default_threads_s"])
        verdict = "PASS" if row["ratio"] <= 1.0 else "MISS"
        lines.append(
            f"| training: 200 SGD steps 64-100-100-10 b64 {row['dtype']}, HTTP end to end "
            f"| {row['gradiag_http_s'] * 1e3:.0f} ms | torch in process {torch_s * 1e3:.0f} ms "
            f"({row['baseline'].replace('torch_', '')} thread(s)) | {row['ratio']:.2f}x time "
            f"| <= 1.0 | {verdict} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="a running gradiag (default: start a one-worker server)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.url:
        results = rows(args.url, args.rounds)
    else:
        server = Server(1, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        try:
            results = rows(server.url, args.rounds)
        finally:
            server.close()
    for row in results:
        print(row)
    print("\n".join(summary_lines(results)))


if __name__ == "__main__":
    main()
