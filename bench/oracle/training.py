"""PyTorch's answers for the training what-if (contract revision 2, "Training what-if").

A 64-100-100-10 ReLU net (softmax cross-entropy, float64) trained by `torch.optim.SGD`
(v = momentum * v + g, no dampening, not Nesterov; W -= lr * v; g includes l2 * W through
`weight_decay` on the weights' parameter group, not on the biases) on the minibatches of
tests/oracle_models.py `minibatches` (the order gradiag's `train.seed` draws).

- `exact_m0.npz`, `exact_m0.9.npz` (+ .json): 20 steps, lr 0.1, l2 1e-3, momentum 0 / 0.9.
- `sweep.npz` (+ .json): the dead-ReLU sweep, 200 steps of plain SGD for lr in
  {0.1, 0.5, 1.0, 2.0} x seeds 0..4.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.oracle import _common as c


def record(out: Path) -> None:
    om = c.builders()
    with c.torch_float64():
        for momentum in (0.0, 0.9):
            model = om.training_exact(momentum)
            arrays, summary = train(model, om)
            c.save_npz(out / f"{model.name}.npz", arrays)
            c.save_json(out / f"{model.name}.json", summary)
        arrays, summary = sweep(om)
        c.save_npz(out / "sweep.npz", arrays)
        c.save_json(out / "sweep.json", summary)
    c.report_size(out)


def net(model: Any) -> nn.Sequential:
    """Linear + ReLU per hidden layer, a linear last layer, loaded with the model's weights."""
    built = c.build_module(model)
    return built.module


def sgd(module: nn.Sequential, lr: float, momentum: float, l2: float) -> torch.optim.SGD:
    """torch.optim.SGD with the L2 term on the weights only (their own parameter group)."""
    weights = [m.weight for m in module if isinstance(m, nn.Linear)]
    biases = [m.bias for m in module if isinstance(m, nn.Linear)]
    groups = [{"params": weights, "weight_decay": l2}, {"params": biases, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=0.0, nesterov=False)


def loss_of(
    module: nn.Sequential, x: np.ndarray, y: np.ndarray, l2: float
) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
    """The data loss (to back-propagate), the loss with 0.5 * l2 * sum(W^2) (the contract's
    `loss`), and the hidden layers' pre-activations."""
    _, ins, outs = c.run(module, x)
    pre = [ins[k] for k, m in enumerate(module) if isinstance(m, nn.ReLU)]
    data = c.cross_entropy(outs[-1], y)
    penalty = sum(float((m.weight.detach() ** 2).sum()) for m in module if isinstance(m, nn.Linear))
    return data, data.item() + 0.5 * l2 * penalty, pre


def train(model: Any, om: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run model.train's SGD; record per step (before its update) the loss, the data loss, the
    dead units of each hidden layer on the step's minibatch and each layer's update ratio
    ||W_before - W_after|| / ||W_before|| (= ||lr * v|| / ||W||); then the final weights."""
    cfg, x, y = model.train, model.x, model.y
    module = net(model)
    opt = sgd(module, cfg["lr"], cfg["momentum"], model.l2)
    linears = [m for m in module if isinstance(m, nn.Linear)]
    batches = om.minibatches(cfg["seed"], len(x), cfg["batch_size"], cfg["steps"] + 1)
    losses, data_losses, dead, ratios = [], [], [], []
    for idx in batches[:-1]:
        opt.zero_grad()
        data, loss, pre = loss_of(module, x[idx], y[idx], model.l2)
        losses.append(loss)
        data_losses.append(data.item())
        dead.append([len(c.dead_units(z)) for z in pre])
        before = [m.weight.detach().clone() for m in linears]
        data.backward()
        opt.step()
        ratios.append([_ratio(w, m.weight.detach()) for w, m in zip(before, linears, strict=True)])
    with torch.no_grad():
        _, full_loss, pre = loss_of(module, x, y, model.l2)
        _, next_loss, _ = loss_of(module, x[batches[-1]], y[batches[-1]], model.l2)
    arrays = {
        "losses": np.array(losses),
        "data_losses": np.array(data_losses),
        "dead_units_minibatch": np.array(dead),
        "update_ratio": np.array(ratios),
        **{
            f"layer{i}.W": m.weight.detach().T.contiguous().numpy()
            for i, m in enumerate(linears, 1)
        },
        **{f"layer{i}.b": m.bias.detach().numpy() for i, m in enumerate(linears, 1)},
    }
    summary = {
        "model": model.name,
        "train": cfg,
        "l2": model.l2,
        "init": {"scheme": "he", "seed": model.init_seed},
        "examples": len(x),
        "final_loss_full_batch": full_loss,
        "final_loss_next_minibatch": next_loss,
        "final_dead_fraction": [len(c.dead_units(z)) / z.shape[1] for z in pre],
        "checksums": om.checksums(model),
    }
    return arrays, summary


def _ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(before - after) / torch.linalg.vector_norm(before))


def sweep(om: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every (lr, seed) run of the dead-ReLU sweep: final dead fractions of layers 1 and 2 on
    all 512 examples, the step losses, and whether the loss diverged (a step's loss, or the
    final full-batch loss, non-finite or above 10x the step-0 loss)."""
    lrs, seeds = om.SWEEP_LRS, om.SWEEP_SEEDS
    dead = np.zeros((len(lrs), len(seeds), 2))
    losses = np.zeros((len(lrs), len(seeds), om.SWEEP["steps"]))
    final = np.zeros((len(lrs), len(seeds)))
    diverged = np.zeros((len(lrs), len(seeds)), dtype=bool)
    checks = {}
    for a, lr in enumerate(lrs):
        for b, seed in enumerate(seeds):
            model = om.training_sweep(lr, seed)
            arrays, summary = train(model, om)
            dead[a, b] = summary["final_dead_fraction"]
            losses[a, b] = arrays["losses"]
            final[a, b] = summary["final_loss_full_batch"]
            diverged[a, b] = _diverged(arrays["losses"], final[a, b])
            checks[f"lr{lr:g}_s{seed}"] = summary["checksums"]["x"]
    arrays = {
        "lrs": np.array(lrs),
        "seeds": np.array(seeds),
        "dead_fraction": dead,
        "losses": losses,
        "final_loss_full_batch": final,
        "diverged": diverged,
    }
    mean = dead.mean(axis=1)
    summary = {
        "settings": dict(om.SWEEP),
        "data_seed": f"default_rng({om.SWEEP_DATA_STREAM} + seed)",
        "init_seed": "seed",
        "train_seed": "seed",
        "mean_dead_fraction": {f"{lr:g}": list(mean[a]) for a, lr in enumerate(lrs)},
        "diverged_runs": {f"{lr:g}": int(diverged[a].sum()) for a, lr in enumerate(lrs)},
        "runs": {
            f"lr{lr:g}_s{seed}": {
                "dead_fraction": list(dead[a, b]),
                "diverged": bool(diverged[a, b]),
                "final_loss_full_batch": final[a, b],
            }
            for a, lr in enumerate(lrs)
            for b, seed in enumerate(seeds)
        },
        "x_checksums": checks,
    }
    for lr, row in summary["mean_dead_fraction"].items():
        print(f"  lr {lr}: mean dead fraction layer 1 {row[0]:.3f}, layer 2 {row[1]:.3f}")
    return arrays, summary


def _diverged(losses: np.ndarray, final: float) -> bool:
    start = losses[0]
    values = [*losses.tolist(), final]
    return any(not math.isfinite(v) or v > 10 * start for v in values)
