"""Karpathy's micrograd demo (tests/oracle_models.py `micrograd_moons`), answered twice: by the
`micrograd` package itself (a graph of scalar Values, Python floats) and by PyTorch (float64
tensors). Both must agree to ~1e-12; the test checks it from the fixture. micrograd's
backward runs in a fixed order (`backward`), so that two recordings are byte-identical.

`moons.npz`: `micrograd.<param>` and `torch.<param>` (the gradients, gradiag's names and
layouts: `layer{i}.W` (fan_in, units), `layer{i}.b`), `micrograd.scores`, `torch.scores`
(N,). `moons.json`: both losses, their data and regularisation parts, torch's dead units per
hidden layer, the largest gradient difference, and the input checksums.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from micrograd.engine import Value
from micrograd.nn import MLP

from bench.oracle import _common as c


def record(out: Path) -> None:
    om = c.builders()
    model = om.micrograd_moons()
    mg_arrays, mg = by_micrograd(model, om.MICROGRAD_ALPHA)
    with c.torch_float64():
        t_arrays, tr = by_torch(model, om.MICROGRAD_ALPHA)
    arrays = {
        **{f"micrograd.{k}": v for k, v in mg_arrays.items()},
        **{f"torch.{k}": v for k, v in t_arrays.items()},
    }
    diff = max(
        float(np.max(np.abs(mg_arrays[k] - t_arrays[k]))) for k in mg_arrays if k != "scores"
    )
    summary = {
        "model": model.name,
        "builder_seed": model.seed,
        "micrograd": mg,
        "torch": tr,
        "max_abs_grad_difference": diff,
        "alpha": om.MICROGRAD_ALPHA,
        "network_l2": model.l2,
        "checksums": om.checksums(model),
    }
    print(f"  micrograd vs torch: loss {mg['loss']!r} vs {tr['loss']!r}, grads within {diff:.1e}")
    assert diff < 1e-12, diff
    c.save_npz(out / "moons.npz", arrays)
    c.save_json(out / "moons.json", summary)
    c.report_size(out)


def by_micrograd(model: Any, alpha: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The demo's loss with micrograd's own MLP, its weights overwritten with the model's."""
    with numbered_values():
        arrays, summary = _micrograd_loss(model, alpha, fixed_order=True)
        own, _ = _micrograd_loss(model, alpha, fixed_order=False)
    for key, value in arrays.items():  # micrograd's own backward: the same but for last bits
        assert np.allclose(value, own[key], rtol=1e-13, atol=1e-15), key
    return arrays, summary


def _micrograd_loss(
    model: Any, alpha: float, *, fixed_order: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    random.seed(0)  # MLP draws weights we overwrite; seeded all the same
    sizes = [layer["units"] for layer in model.layers]
    mlp = MLP(model.input_shape[0], sizes)
    for layer, w in zip(mlp.layers, model.weights, strict=True):
        for j, neuron in enumerate(layer.neurons):
            for i, wi in enumerate(neuron.w):
                wi.data = float(w["W"][i, j])
            neuron.b.data = float(w["b"][j])
    inputs = [list(map(Value, row)) for row in model.x.tolist()]
    scores = list(map(mlp, inputs))
    losses = [(1 + -yi * si).relu() for yi, si in zip(model.y.tolist(), scores, strict=True)]
    data_loss = sum(losses) * (1.0 / len(losses))
    reg_loss = alpha * sum(p * p for p in mlp.parameters())
    total = data_loss + reg_loss
    if fixed_order:
        backward(total)
    else:
        with recursion_limit(20_000):  # micrograd's topological sort recurses
            total.backward()
    arrays: dict[str, np.ndarray] = {"scores": np.array([s.data for s in scores])}
    for i, layer in enumerate(mlp.layers, 1):
        arrays[f"layer{i}.W"] = np.array([[wi.grad for wi in n.w] for n in layer.neurons]).T
        arrays[f"layer{i}.b"] = np.array([n.b.grad for n in layer.neurons])
    summary = {"loss": total.data, "data_loss": data_loss.data, "reg_loss": reg_loss.data}
    return arrays, summary


@contextlib.contextmanager
def numbered_values() -> Iterator[None]:
    """Number every micrograd Value in creation order (`_order`), for `backward`."""
    counter = itertools.count()
    original = Value.__init__

    def init(self: Value, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._order = next(counter)

    Value.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        Value.__init__ = original  # type: ignore[method-assign]


def backward(root: Value) -> None:
    """micrograd's Value.backward, visiting each node's operands in creation order.

    micrograd's own walks `_prev`, a set ordered by memory address, so the order in which a
    fan-out node's gradient is summed, and with it the last bit, changes from run to run. The
    local derivatives are micrograd's own `_backward` closures."""
    topo: list[Value] = []
    visited: set[Value] = set()

    def build(v: Value) -> None:
        if v not in visited:
            visited.add(v)
            for child in sorted(v._prev, key=lambda u: u._order):
                build(child)
            topo.append(v)

    with recursion_limit(20_000):  # the topological sort recurses, as micrograd's does
        build(root)
    root.grad = 1
    for v in reversed(topo):
        v._backward()


@contextlib.contextmanager
def recursion_limit(limit: int) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def by_torch(model: Any, alpha: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The same loss with torch tensors: relu(x @ W + b) twice, linear scores, hinge + L2."""
    params = {name: torch.tensor(v, requires_grad=True) for name, v in model.params().items()}
    a = torch.tensor(model.x)
    pre = []
    for i, layer in enumerate(model.layers, 1):
        z = a @ params[f"layer{i}.W"] + params[f"layer{i}.b"]
        pre.append(z)
        a = torch.relu(z) if layer["activation"] == "relu" else z
    scores = a[:, 0]
    data_loss = torch.relu(1 - torch.tensor(model.y) * scores).mean()
    reg_loss = alpha * sum((p * p).sum() for p in params.values())
    total = data_loss + reg_loss
    total.backward()
    arrays: dict[str, np.ndarray] = {"scores": scores.detach().numpy()}
    arrays.update({name: p.grad.numpy() for name, p in params.items() if p.grad is not None})
    summary = {
        "loss": total.item(),
        "data_loss": data_loss.item(),
        "reg_loss": reg_loss.item(),
        "dead_units": {str(i): c.dead_units(z) for i, z in enumerate(pre[:-1], 1)},
        "parameters_torch": sum(p.numel() for p in params.values()),
    }
    return arrays, summary
