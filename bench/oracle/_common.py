"""What the whole-model recorders share: the NumPy builders, torch set-up, a torch module
built from a model's wire form, and writers whose bytes depend on the content only.

Not a subject (its name starts with `_`, so `make oracle` does not run it)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
EPS = 1e-5  # batchnorm's eps, as torch's and the contract's default


def builders() -> ModuleType:
    """tests/oracle_models.py (pure NumPy; tests/ is not a package), loaded once by path."""
    name = "oracle_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "oracle_models.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    return sys.modules[name]


@contextmanager
def torch_float64() -> Iterator[None]:
    """float64 by default, one thread, deterministic kernels; restored on exit."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


# --- writers ----------------------------------------------------------------------------


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez's format (np.load reads it) with a fixed timestamp and sorted members, so that
    the same arrays always give the same bytes (np.savez stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            archive.writestr(info, data.getvalue())
    path.write_bytes(buffer.getvalue())


def jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as Python numbers and lists; a non-finite float
    as "NaN" / "Infinity" / "-Infinity" (the contract's convention)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isfinite(v):
            return v
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return value


def save_json(path: Path, obj: Any) -> None:
    """Sorted keys, one indent: diffs between two recordings stay readable."""
    path.write_text(json.dumps(jsonable(obj), indent=1, sort_keys=True, allow_nan=False) + "\n")


def report_size(out: Path) -> None:
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"  {out.name}: {total / 1e6:.2f} MB in {len(list(out.iterdir()))} files")


# --- a torch module from the wire form --------------------------------------------------


class ExplicitBatchNorm(nn.Module):
    """Eval-mode batchnorm written out, (x - mean) / sqrt(var + eps) * gamma + beta, with the
    running stats as parameters: an ONNX BatchNormalization's running stats are float
    initializers, so gradiag gives them a gradient, and torch's own kernel gives none."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.running_mean = nn.Parameter(bn.running_mean.detach().clone())
        self.running_var = nn.Parameter(bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        inv = torch.rsqrt(self.running_var + EPS).reshape(shape)
        centred = x - self.running_mean.reshape(shape)
        return centred * inv * self.weight.reshape(shape) + self.bias.reshape(shape)


class Reshape(nn.Module):
    """x.reshape(-1, features): the exporters write a Reshape with a constant shape."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.features)


@dataclass
class Built:
    """A model as an nn.Sequential, and where each wire layer (1-based index) lives in it:
    its module with parameters (`main`), its ReLU (if any) and its last module."""

    module: nn.Sequential
    main: dict[int, int]
    relu: dict[int, int]
    last: dict[int, int]


def build_module(model: Any, *, flatten: str = "flatten") -> Built:
    """An nn.Sequential computing `model` (an OracleModel) with its weights, in float64.

    A dense layer after a conv stack is preceded by nn.Flatten (or, with flatten="reshape",
    by x.reshape(-1, C*H*W)); batchnorm layers are nn.BatchNorm2d with eps 1e-5, in eval mode
    when the layer says so. Dense W is stored transposed as Linear.weight."""
    om = builders()
    modules: list[nn.Module] = []
    main, relu, last = {}, {}, {}
    prev = model.input_shape
    for i, (layer, w, shape) in enumerate(
        zip(model.layers, model.weights, om.shapes(model.input_shape, model.layers), strict=True),
        1,
    ):
        kind = layer.get("type", "dense")
        if kind == "dense" and len(prev) > 1:
            modules.append(Reshape(math.prod(prev)) if flatten == "reshape" else nn.Flatten())
        main[i] = len(modules)
        modules.append(_layer_module(layer, w, prev))
        if layer.get("activation") == "relu":
            relu[i] = len(modules)
            modules.append(nn.ReLU())
        elif layer.get("activation") not in (None, "linear"):
            raise ValueError(f"layer {i}: activation {layer['activation']} not recorded here")
        last[i] = len(modules) - 1
        prev = shape
    return Built(nn.Sequential(*modules).double(), main, relu, last)


def _layer_module(
    layer: dict[str, Any], w: dict[str, np.ndarray], prev: tuple[int, ...]
) -> nn.Module:
    kind = layer.get("type", "dense")
    if kind == "conv2d":
        f, k = layer["filters"], layer["kernel"]
        m: nn.Module = nn.Conv2d(prev[0], f, k, stride=layer["stride"], padding=layer["padding"])
        _set(m, weight=w["W"], bias=w["b"])
    elif kind == "dense":
        m = nn.Linear(math.prod(prev), layer["units"])
        _set(m, weight=w["W"].T, bias=w["b"])
    elif kind == "batchnorm":
        m = nn.BatchNorm2d(prev[0], eps=EPS)
        _set(m, weight=w["gamma"], bias=w["beta"])
        if layer["mode"] == "eval":
            m.running_mean = torch.tensor(w["running_mean"])
            m.running_var = torch.tensor(w["running_var"])
            m.eval()
    elif kind == "maxpool2d":
        m = nn.MaxPool2d(layer["kernel"], layer["stride"])
    elif kind == "avgpool2d":
        m = nn.AvgPool2d(layer["kernel"], layer["stride"])
    else:
        raise ValueError(f"layer type {kind} not recorded here")
    return m


def _set(module: nn.Module, **values: np.ndarray) -> None:
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(torch.tensor(np.ascontiguousarray(value)))


def run(
    module: nn.Module, x: np.ndarray
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Forward with every submodule's input and output kept (in order): scores, ins, outs."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    a = torch.tensor(x)
    for sub in module.children():
        ins.append(a)
        a = sub(a)
        outs.append(a)
    return a, ins, outs


def dead_units(pre: torch.Tensor) -> list[int]:
    """Units (rank 2) or channels (rank 4) whose pre-activation is <= 0 at every example and
    position."""
    axes = (0,) if pre.dim() == 2 else (0, 2, 3)
    return [int(j) for j in torch.nonzero(torch.amax(pre, dim=axes) <= 0).flatten()]


def active_fraction(out: torch.Tensor) -> list[float]:
    """Per channel of a (N, C, H, W) activation: the fraction of its positions that are > 0."""
    return [float(v) for v in (out > 0).double().mean(dim=(0, 2, 3))]


def parameter_count(module: nn.Module) -> int:
    """As torch counts them: sum(p.numel()) over parameters (running stats are buffers)."""
    return sum(p.numel() for p in module.parameters())


def cross_entropy(scores: torch.Tensor, y: np.ndarray) -> torch.Tensor:
    return nn.functional.cross_entropy(scores, torch.tensor(y, dtype=torch.long))
