"""PyTorch's answers for the conv networks of tests/oracle_models.py (CNN_MODELS).

For each model, `<name>.npz` holds float64 arrays: `scores` (N, classes), the forward output,
and the gradient of the loss with respect to every parameter under gradiag's name and
layout (`layer{i}.W` ...). `<name>.json` holds the loss, torch's parameter total, each layer's
dead units / active fractions, and the checksums of the inputs the builder regenerates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.oracle import _common as c

# gradiag's parameter name -> (torch attribute, transposed?) per layer type
PARAM_NAMES = {
    "conv2d": {"W": ("weight", False), "b": ("bias", False)},
    "dense": {"W": ("weight", True), "b": ("bias", False)},
    "batchnorm": {"gamma": ("weight", False), "beta": ("bias", False)},
}


def record(out: Path) -> None:
    om = c.builders()
    with c.torch_float64():
        for name, build in om.CNN_MODELS.items():
            arrays, summary = answer(build())
            c.save_npz(out / f"{name}.npz", arrays)
            c.save_json(out / f"{name}.json", summary)
    c.report_size(out)


def answer(model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Forward and backward through torch's modules; the arrays and the summary to store."""
    built = c.build_module(model)
    scores, ins, outs = c.run(built.module, model.x)
    loss = c.cross_entropy(scores, model.y)
    loss.backward()
    arrays = {"scores": scores.detach().numpy(), **gradients(model, built)}
    summary = {
        "model": model.name,
        "builder_seed": model.seed,
        "loss_name": model.loss,
        "loss": loss.item(),
        "parameters_torch": c.parameter_count(built.module),
        "layers": layer_reports(model, built, ins, outs),
        "gradients": {k: list(v.shape) for k, v in arrays.items() if k != "scores"},
        "checksums": c.builders().checksums(model),
    }
    return arrays, summary


def gradients(model: Any, built: c.Built) -> dict[str, np.ndarray]:
    """d loss / d parameter under gradiag's names, in gradiag's layouts."""
    grads = {}
    for i, layer in enumerate(model.layers, 1):
        names = PARAM_NAMES.get(layer.get("type", "dense"), {})
        module: nn.Module = built.module[built.main[i]]
        for ours, (attr, transposed) in names.items():
            grad = getattr(module, attr).grad
            assert grad is not None
            grads[f"layer{i}.{ours}"] = (grad.T if transposed else grad).contiguous().numpy()
    return grads


def layer_reports(
    model: Any, built: c.Built, ins: list[torch.Tensor], outs: list[torch.Tensor]
) -> list[dict[str, Any]]:
    """Per layer: its index, type and activation; for a relu layer the dead units (dense) or
    filters (4D: dead at every (n, h, w)); for a layer with a (N, C, H, W) output (conv,
    batchnorm) the per-channel fraction of positions whose activation is > 0."""
    reports = []
    for i, layer in enumerate(model.layers, 1):
        report: dict[str, Any] = {
            "index": i,
            "type": layer.get("type", "dense"),
            "activation": layer.get("activation"),
        }
        if i in built.relu:
            report["dead_units"] = c.dead_units(ins[built.relu[i]])
            report["units"] = int(ins[built.relu[i]].shape[1])
        if report["type"] in ("conv2d", "batchnorm"):
            report["channel_active_fraction"] = c.active_fraction(outs[built.last[i]])
        reports.append(report)
    return reports
