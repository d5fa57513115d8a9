"""The convolutional ops of engine/conv.py against PyTorch CPU, forward + backward.

    .venv-bench/bin/python bench/conv_ops.py [--rounds 15] [--threads 1] [--quick]

Runs in .venv-bench (torch exists there, never in the test environment). Every ratio is
measured in this one run: gradiag's ops and torch's alternate in interleaved rounds after a
warm-up, each time the median of its rounds and each ratio the median of the rounds' ratios,
so the machine's drift (two shared cores) cancels. Rows: each layer of a CIFAR-like net at
batch 64, then the whole net,

    3x32x32 -> conv 16@3x3 pad 1 -> batchnorm -> relu -> maxpool 2
            -> conv 32@3x3 pad 1 -> batchnorm -> relu -> avgpool 2 -> flatten,

in float64 and float32; every gradient is computed on both sides (the input batch's too),
and torch's backward is torch.autograd.grad (Tensor.backward's accumulation into .grad
is not part of the work compared).

Threads: one for each library by default, as the service runs (gunicorn sets
OPENBLAS_NUM_THREADS=1 per worker, docs/configuration.md). `--threads 0` keeps each
library's default; on a machine whose cores are shared, those figures swing by several times
from run to run (one library's idle threads spin while the other's run), so they are not the
reference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from gradiag.engine import conv
from gradiag.engine.ops import relu_backward, relu_forward

BATCH = 64
Run = Callable[[], Any]


@dataclass
class Row:
    name: str
    ours: Run
    theirs: Run


def _ours(op: str, operands: list[np.ndarray], dout: np.ndarray, **attrs: Any) -> Run:
    forward = getattr(conv, f"{op}_forward")
    backward = getattr(conv, f"{op}_backward")

    def run() -> Any:
        _, cache = forward(*operands, **attrs)
        return backward(dout, cache)

    return run


def _theirs(f: Callable[..., torch.Tensor], operands: list[np.ndarray], dout: np.ndarray) -> Run:
    tensors = [torch.tensor(v, requires_grad=True) for v in operands]
    upstream = torch.from_numpy(dout)

    def run() -> Any:
        return torch.autograd.grad(f(*tensors), tensors, upstream)

    return run


def layer_rows(dtype: type[np.floating[Any]], rng: np.random.Generator) -> list[Row]:
    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    rows = []
    for name, (c, f, side) in {
        "conv 3->16 3x3 pad1 @32x32": (3, 16, 32),
        "conv 16->32 3x3 pad1 @16x16": (16, 32, 16),
        "conv 16->32 3x3 pad1 @32x32": (16, 32, 32),
    }.items():
        x, W, b = normal(BATCH, c, side, side), normal(f, c, 3, 3), normal(f)
        dout = normal(BATCH, f, side, side)
        rows.append(
            Row(
                name,
                _ours("conv2d", [x, W, b], dout, padding=1),
                _theirs(lambda x, W, b: F.conv2d(x, W, b, padding=1), [x, W, b], dout),
            )
        )
    x = normal(BATCH, 16, 32, 32)
    pooled = normal(BATCH, 16, 16, 16)
    gamma, beta = normal(16), normal(16)
    rows += [
        Row("maxpool 2 @16x32x32", _ours("maxpool2d", [x], pooled),
            _theirs(lambda x: F.max_pool2d(x, 2), [x], pooled)),
        Row("maxpool 3 s1 pad1 @16x32x32", _ours("maxpool2d", [x], x, kernel=3, stride=1,
                                                 padding=1),
            _theirs(lambda x: F.max_pool2d(x, 3, 1, 1), [x], x)),
        Row("avgpool 2 @16x32x32", _ours("avgpool2d", [x], pooled),
            _theirs(lambda x: F.avg_pool2d(x, 2), [x], pooled)),
        Row("batchnorm @16x32x32", _ours("batchnorm", [x, gamma, beta], x),
            _theirs(lambda x, g, b: F.batch_norm(x, None, None, g, b, training=True),
                    [x, gamma, beta], x)),
    ]  # fmt: skip
    return rows


def net_row(dtype: type[np.floating[Any]], rng: np.random.Generator) -> Row:
    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(dtype)

    x = normal(BATCH, 3, 32, 32)
    layer1 = [normal(16, 3, 3, 3), normal(16), np.ones(16, dtype), np.zeros(16, dtype)]
    layer2 = [normal(32, 16, 3, 3), normal(32), np.ones(32, dtype), np.zeros(32, dtype)]
    params = layer1 + layer2
    dout = normal(BATCH, 32 * 8 * 8)

    def ours() -> Any:
        W1, b1, g1, be1, W2, b2, g2, be2 = params
        h, c1 = conv.conv2d_forward(x, W1, b1, padding=1)
        h, n1 = conv.batchnorm_forward(h, g1, be1)
        h, r1 = relu_forward(h)
        h, p1 = conv.maxpool2d_forward(h)
        h, c2 = conv.conv2d_forward(h, W2, b2, padding=1)
        h, n2 = conv.batchnorm_forward(h, g2, be2)
        h, r2 = relu_forward(h)
        h, p2 = conv.avgpool2d_forward(h)
        _, fl = conv.flatten_forward(h)
        (g,) = conv.flatten_backward(dout, fl)
        (g,) = conv.avgpool2d_backward(g, p2)
        (g,) = relu_backward(g, r2)
        g, dg2, dbe2 = conv.batchnorm_backward(g, n2)
        g, dW2, db2 = conv.conv2d_backward(g, c2)
        (g,) = conv.maxpool2d_backward(g, p1)
        (g,) = relu_backward(g, r1)
        g, dg1, dbe1 = conv.batchnorm_backward(g, n1)
        return conv.conv2d_backward(g, c1), dW2, db2, dg2, dbe2, dg1, dbe1

    def torch_net(x: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, p[0], p[1], padding=1)
        h = F.max_pool2d(F.relu(F.batch_norm(h, None, None, p[2], p[3], training=True)), 2)
        h = F.conv2d(h, p[4], p[5], padding=1)
        h = F.avg_pool2d(F.relu(F.batch_norm(h, None, None, p[6], p[7], training=True)), 2)
        return torch.flatten(h, 1)

    return Row("net (all of the above, chained)", ours, _theirs(torch_net, [x, *params], dout))


def interleaved(row: Row, rounds: int, calls: int) -> tuple[float, float, float]:
    """(ours, torch, ratio) in seconds: medians over rounds of the median of `calls` calls."""

    def timed(run: Run) -> float:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    row.ours(), row.theirs()  # warm-up: allocator, thread pools, torch's dispatch caches
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(timed(row.ours))
        theirs.append(timed(row.theirs))
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="0: each library's default")
    parser.add_argument("--quick", action="store_true", help="5 rounds, the net only")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    limits = threadpool_limits(args.threads) if args.threads else None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy "
          f"{np.__version__}; batch {BATCH}; {rounds} rounds x {args.calls} calls")  # fmt: skip
    print(f"{'':34} {'dtype':>7} {'gradiag ms':>11} {'torch ms':>9} {'ratio':>6}")
    for dtype in (np.float64, np.float32):
        rng = np.random.default_rng(0)
        rows = (
            [net_row(dtype, rng)] if args.quick else [*layer_rows(dtype, rng), net_row(dtype, rng)]
        )
        for row in rows:
            ours, theirs, ratio = interleaved(row, rounds, args.calls)
            print(f"{row.name:34} {np.dtype(dtype).name:>7} {ours * 1e3:11.2f} "
                  f"{theirs * 1e3:9.2f} {ratio:6.2f}")  # fmt: skip
    if limits is not None:
        limits.unregister()


if __name__ == "__main__":
    main()
