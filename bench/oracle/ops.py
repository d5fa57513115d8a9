"""PyTorch's answers for the convolutional ops of engine/conv.py, one fixture per case.

`make oracle ORACLE_ARGS=ops` writes tests/fixtures/oracle/ops/<case>.npz (float64). Each file
holds what is needed to draw the inputs again and what torch answered:

- `op`, `attrs` (JSON), `seed`, `shapes` (JSON list), `kinds` (JSON list, one per operand):
  a `numpy.random.default_rng(seed)` draws each operand in order by its kind, then `dout`
  (standard normal, the output's shape); kinds are "normal" (standard_normal), "positive"
  (uniform(0.5, 2.0): variances) and "ties" (integers in [-2, 2] as floats: max ties);
- `input_sums`: each operand's sum, so that a test notices a different random stream;
- `out`: torch's forward output; `grad_<k>`: torch's gradient for operand k given `dout`.

batchnorm_eval: torch.nn.functional.batch_norm(training=False) gives out and the gradients of
x, gamma and beta, but refuses gradients for the running statistics; those two come from
torch's autograd of the same formula written out, (x - mean) / sqrt(var + eps) * gamma + beta.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Case:
    name: str
    op: str
    shapes: tuple[Shape, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()  # default: every operand "normal"
    seed: int = 0


def _conv(name: str, x: Shape, W: Shape, seed: int, **attrs: Any) -> Case:
    return Case(name, "conv2d", (x, W, (W[0],)), attrs, seed=seed)


def _pool(name: str, op: str, x: Shape, seed: int, kinds: str = "normal", **attrs: Any) -> Case:
    return Case(name, op, (x,), attrs, (kinds,), seed)


def _bn(name: str, x: Shape, seed: int, **attrs: Any) -> Case:
    c = (x[1],)
    return Case(name, "batchnorm", (x, c, c), attrs, seed=seed)


def _bn_eval(name: str, x: Shape, seed: int, **attrs: Any) -> Case:
    c = (x[1],)
    kinds = ("normal", "normal", "normal", "normal", "positive")
    return Case(name, "batchnorm_eval", (x, c, c, c, c), attrs, kinds, seed)


CASES: list[Case] = [
    _conv("conv2d_3x3", (2, 3, 8, 8), (4, 3, 3, 3), 1),
    _conv("conv2d_3x3_pad1", (2, 3, 8, 8), (4, 3, 3, 3), 2, padding=1),
    _conv("conv2d_3x3_stride2_pad1", (2, 3, 9, 8), (4, 3, 3, 3), 3, stride=2, padding=1),
    _conv("conv2d_2x3_pad2", (2, 3, 6, 7), (5, 3, 2, 3), 4, padding=2),
    _conv("conv2d_mixed_pairs", (2, 3, 9, 7), (3, 3, 3, 2), 5, stride=[2, 1], padding=[1, 0]),
    _conv("conv2d_1x1", (2, 4, 5, 5), (3, 4, 1, 1), 6),
    _conv("conv2d_4x3_stride3x2", (1, 2, 10, 11), (2, 2, 4, 3), 7, stride=[3, 2], padding=[2, 1]),
    _conv("conv2d_cifar_like", (4, 3, 16, 16), (8, 3, 3, 3), 8, padding=1),
    _conv("conv2d_kernel_is_input", (2, 2, 3, 3), (3, 2, 3, 3), 9),
    _pool("maxpool2d_2x2", "maxpool2d", (2, 3, 8, 8), 10),
    _pool("maxpool2d_odd_input", "maxpool2d", (2, 2, 9, 7), 11, kernel=3, stride=2),
    _pool("maxpool2d_overlap_pad1", "maxpool2d", (2, 3, 7, 8), 12, kernel=3, stride=1, padding=1),
    _pool("maxpool2d_3x3_s2_pad1", "maxpool2d", (2, 3, 9, 9), 13, kernel=3, stride=2, padding=1),
    _pool("maxpool2d_2x3_mixed", "maxpool2d", (2, 2, 7, 9), 14, kernel=[2, 3], stride=[1, 2],
          padding=[1, 1]),
    _pool("maxpool2d_ties", "maxpool2d", (2, 3, 6, 6), 15, "ties", kernel=2, stride=1),
    _pool("maxpool2d_ties_pad1", "maxpool2d", (2, 2, 5, 6), 16, "ties", kernel=3, stride=2,
          padding=1),
    _pool("avgpool2d_2x2", "avgpool2d", (2, 3, 8, 8), 20),
    _pool("avgpool2d_odd_input", "avgpool2d", (2, 2, 9, 7), 21, kernel=3, stride=2),
    _pool("avgpool2d_overlap_pad1", "avgpool2d", (2, 3, 7, 8), 22, kernel=3, stride=1, padding=1),
    _pool("avgpool2d_overlap_pad1_exclude", "avgpool2d", (2, 3, 7, 8), 23, kernel=3, stride=1,
          padding=1, count_include_pad=False),
    _pool("avgpool2d_2x3_mixed", "avgpool2d", (2, 2, 7, 9), 24, kernel=[2, 3], stride=[1, 2],
          padding=[1, 1]),
    _pool("avgpool2d_2x3_mixed_exclude", "avgpool2d", (2, 2, 7, 9), 25, kernel=[2, 3],
          stride=[1, 2], padding=[1, 1], count_include_pad=False),
    _pool("avgpool2d_4x4_s3_pad2_exclude", "avgpool2d", (1, 2, 10, 9), 26, kernel=4, stride=3,
          padding=2, count_include_pad=False),
    _bn("batchnorm_2d", (6, 5), 30),
    _bn("batchnorm_4d", (3, 4, 5, 6), 31),
    _bn("batchnorm_3d", (4, 3, 5), 32),
    _bn("batchnorm_4d_eps", (2, 3, 2, 2), 33, eps=1e-3),
    _bn("batchnorm_one_image", (1, 2, 3, 3), 34),
    _bn_eval("batchnorm_eval_2d", (6, 5), 40),
    _bn_eval("batchnorm_eval_4d", (3, 4, 5, 6), 41),
    _bn_eval("batchnorm_eval_4d_eps", (2, 3, 2, 2), 42, eps=1e-3),
    Case("flatten_axis1", "flatten", ((2, 3, 4, 5),), seed=50),
    Case("flatten_axis2", "flatten", ((2, 3, 4, 5),), {"axis": 2}, seed=51),
    Case("flatten_axis0", "flatten", ((2, 3, 4),), {"axis": 0}, seed=52),
    Case("flatten_axis_minus1", "flatten", ((2, 3, 4),), {"axis": -1}, seed=53),
    Case("reshape_infer", "reshape", ((2, 3, 4, 5),), {"shape": [-1, 20]}, seed=54),
    Case("reshape_middle", "reshape", ((2, 3, 4),), {"shape": [6, -1, 2]}, seed=55),
    Case("reshape_exact", "reshape", ((6, 4),), {"shape": [2, 2, 3, 2]}, seed=56),
]  # fmt: skip


def draw(rng: np.random.Generator, shape: Shape, kind: str) -> np.ndarray:
    """One operand, by its kind (the tests draw with the same rule)."""
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if kind == "ties":
        return rng.integers(-2, 3, shape).astype(np.float64)
    raise ValueError(f"unknown kind {kind!r}")


def _channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _pair(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _pool_args(attrs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    kernel = _pair(attrs.get("kernel", 2))
    stride = _pair(attrs.get("stride", kernel))
    return kernel, stride, _pair(attrs.get("padding", 0))


def _flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    if axis == 1:
        return torch.flatten(x, 1)  # the contract's flatten of an (N, C, H, W) batch
    if axis < 0:
        axis += x.dim()  # ONNX Flatten counts a negative axis from the back
    return x.reshape(math.prod(x.shape[:axis]), -1)


TorchOp = Callable[[Sequence[torch.Tensor], Mapping[str, Any]], torch.Tensor]

TORCH: dict[str, TorchOp] = {
    "conv2d": lambda t, a: F.conv2d(
        t[0], t[1], t[2], stride=_pair(a.get("stride", 1)), padding=_pair(a.get("padding", 0))
    ),
    "maxpool2d": lambda t, a: F.max_pool2d(t[0], *_pool_args(a)),
    "avgpool2d": lambda t, a: F.avg_pool2d(
        t[0], *_pool_args(a), count_include_pad=a.get("count_include_pad", True)
    ),
    "batchnorm": lambda t, a: F.batch_norm(
        t[0], None, None, t[1], t[2], training=True, eps=a.get("eps", 1e-5)
    ),
    "batchnorm_eval": lambda t, a: F.batch_norm(
        t[0], t[3], t[4], t[1], t[2], training=False, eps=a.get("eps", 1e-5)
    ),
    "flatten": lambda t, a: _flatten(t[0], a.get("axis", 1)),
    "reshape": lambda t, a: torch.reshape(t[0], a["shape"]),
}


def _eval_formula(t: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    x, gamma, beta, mean, var = t
    n = x.dim()
    centred = (x - _channel(mean, n)) / torch.sqrt(_channel(var, n) + eps)
    return centred * _channel(gamma, n) + _channel(beta, n)


def answer(case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    kinds = case.kinds or ("normal",) * len(case.shapes)
    inputs = [draw(rng, shape, kind) for shape, kind in zip(case.shapes, kinds, strict=True)]
    grads_of = [torch.tensor(v, requires_grad=True) for v in inputs]
    if case.op == "batchnorm_eval":  # torch refuses gradients for the running statistics
        for t in grads_of[3:]:
            t.requires_grad_(False)
    out = TORCH[case.op](grads_of, case.attrs)
    dout = rng.standard_normal(tuple(out.shape))
    wanted = [t for t in grads_of if t.requires_grad]
    grads = list(torch.autograd.grad(out, wanted, torch.from_numpy(dout)))
    if case.op == "batchnorm_eval":
        stats = [torch.tensor(v, requires_grad=True) for v in inputs]
        formula = _eval_formula(stats, case.attrs.get("eps", 1e-5))
        grads += torch.autograd.grad(formula, stats[3:], torch.from_numpy(dout))
    fixture = {
        "op": np.array(case.op),
        "attrs": np.array(json.dumps(case.attrs, sort_keys=True)),
        "seed": np.array(case.seed),
        "shapes": np.array(json.dumps([list(s) for s in case.shapes])),
        "kinds": np.array(json.dumps(list(kinds))),
        "input_sums": np.array([v.sum() for v in inputs]),
        "out": out.detach().numpy(),
    }
    fixture.update({f"grad_{k}": g.numpy() for k, g in enumerate(grads)})
    return fixture


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps: the same answers give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    path.write_bytes(buffer.getvalue())


def record(out: Path) -> None:
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # one summation order, run to run
    try:
        for stale in out.glob("*.npz"):
            stale.unlink()
        for case in CASES:
            save_npz(out / f"{case.name}.npz", answer(case))
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
    print(f"  {len(CASES)} cases")
