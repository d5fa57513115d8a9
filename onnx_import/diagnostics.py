"""An ONNX model's health, read off the one forward/backward pass of its lowered graph, with
the rules and thresholds of /v1/network (engine.diagnostics), per ONNX node:

- an activation node (Relu, LeakyRelu, Sigmoid, Tanh) is read as units, its input being the
  pre-activation: `dead_relu`, `saturated_sigmoid` / `saturated_tanh`,
  `saturated_activations` at the node's name;
- a node with weights (float initializer operands) reports its parameters' norms and their
  gradients' by role (W, b, gamma, beta, running statistics), and the norm of the gradient
  at its output (`z`, the pre-activation of what follows): `exploding_gradient` on ||dW||,
  `vanishing_gradient` on the first over the last node with a W (||dW||, and ||dz||);
- `nonfinite` at the node that computed the first non-finite value.

Nothing here computes a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gradiag.engine.diagnostics import (
    Finding,
    Reading,
    Thresholds,
    cap_findings,
    first_to_last,
    is_finite,
    mean_std,
    nonfinite_finding,
    norm,
    read_activation,
    unit_findings,
    worst_status,
)
from gradiag.engine.executor import Result
from gradiag.engine.ops import OPS, Shape
from gradiag.onnx_import.converters import NEURON_OPS
from gradiag.onnx_import.lower import LOSS, LayerNodes, Lowered

# roles whose elements the report counts under each name (every other: `other`)
ROLE_GROUPS = {
    "W": "weights",
    "b": "biases",
    "gamma": "batchnorm",
    "beta": "batchnorm",
    "running_mean": "running_stats",
    "running_var": "running_stats",
}


@dataclass
class LayerHealth:
    """One layer (ONNX node) of the report: its units' health and its norms."""

    layer: LayerNodes
    shape: Shape  # the node's output, N first
    reading: Reading | None  # activation nodes
    channel_active_fraction: list[float] | None  # (N, C, H, W) outputs: per channel, > 0
    activation_mean: float
    activation_std: float
    weight_norm: float | None
    grad_norms: dict[str, float]  # by role, and `z` (the output's, or an activation's input)
    parameters: dict[str, int]  # elements by role
    status: str = "ok"

    @property
    def name(self) -> str:
        return self.layer.node.name

    @property
    def units(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1

    def flagged_units(self, *gates: str) -> list[int]:
        if self.reading is None or OPS[self.reading.op].gate not in gates:
            return []
        return self.reading.flagged_units

    @property
    def update_ratio(self) -> float | None:
        """||dW|| / ||W|| (None without W, or with W = 0)."""
        grad = self.grad_norms.get("W")
        if not self.weight_norm or grad is None:
            return None
        return grad / self.weight_norm


@dataclass(frozen=True)
class ParameterTotals:
    """Every float initializer counts (the contract's parameters: running statistics too);
    `running_stats` says how many of them are batchnorm buffers, which PyTorch's
    `sum(p.numel() for p in model.parameters())` leaves out."""

    tensors: int
    total: int
    neurons: int  # units of Gemm/MatMul and filters of Conv nodes with a W
    weights: int
    biases: int
    batchnorm: int
    running_stats: int
    other: int


@dataclass
class ModelHealth:
    loss: float
    layers: list[LayerHealth]
    parameters: ParameterTotals
    gradient_ratio: float | None
    signal_ratio: float | None
    nonfinite_nodes: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        return worst_status(self.findings)

    @property
    def name(self) -> str:
        """CS231n's naming, as /v1/network: the nodes with weights (a W) count."""
        weighted = sum("W" in layer.layer.params for layer in self.layers)
        return f"{weighted}-layer neural network"


def model_health(result: Result, lowered: Lowered, thresholds: Thresholds) -> ModelHealth:
    program = result.program
    index = {node: i for i, node in enumerate(program.node_ids())}
    layers = [_layer_health(result, index, layer, thresholds) for layer in lowered.layers]
    bad = np.array(
        [
            i
            for i in range(len(program))
            if not (is_finite(result.value(i)) and is_finite(result.grad(i)))
        ],
        np.intp,
    )
    weighted = [layer for layer in layers if "W" in layer.grad_norms]
    ratio, signal = first_to_last(weighted, "W"), first_to_last(weighted, "z")
    findings: list[Finding] = []
    owner = lowered.owner
    if bad.size:
        findings.append(nonfinite_finding(result, bad, lambda i: owner[program.node_id(i)]))
    for layer in layers:
        findings += _layer_findings(layer, thresholds, finite=not bad.size)
    vanishing = _vanishing_finding(weighted, ratio, signal, thresholds.vanishing_ratio)
    if vanishing is not None:
        findings.append(vanishing)
    findings = cap_findings(findings)
    for layer in layers:
        layer.status = worst_status(f for f in findings if f.location == layer.name)
    return ModelHealth(
        loss=float(result.value(index[LOSS])),
        layers=layers,
        parameters=parameter_totals(lowered),
        gradient_ratio=ratio,
        signal_ratio=signal,
        nonfinite_nodes=[owner[program.node_id(i)] for i in bad.tolist()],
        findings=findings,
    )


def _layer_health(
    result: Result, index: dict[str, int], layer: LayerNodes, thresholds: Thresholds
) -> LayerHealth:
    out = result.value(index[layer.output])
    reading = channels = None
    with np.errstate(all="ignore"):  # huge or non-finite values: inf/nan, not a crash
        pre = out if layer.pre is None else result.value(index[layer.pre])
        if layer.pre is not None:
            reading = read_activation(OPS[layer.op], pre, out, thresholds.saturation_eps, 0)
        if pre.ndim > 2:  # per channel: the fraction of (n, h, w) positions above 0
            channels = (pre > 0).mean(axis=tuple(k for k in range(pre.ndim) if k != 1)).tolist()
        mean, std = mean_std(out)
        grads = {role: _grad_norm(result, index[name]) for role, name in layer.params.items()}
        grads["z"] = _grad_norm(result, index[layer.pre or layer.output])
        w = layer.params.get("W")
        weight_norm = norm(result.value(index[w])) if w is not None else None
    elements = {role: result.value(index[name]).size for role, name in layer.params.items()}
    return LayerHealth(layer, out.shape, reading, channels, mean, std, weight_norm, grads, elements)


def _grad_norm(result: Result, row: int) -> float:
    grad = result.grad(row)
    return math.nan if grad is None else norm(grad)


def _layer_findings(layer: LayerHealth, t: Thresholds, *, finite: bool) -> list[Finding]:
    subject = f"{layer.layer.node.op_type} node {layer.name!r}"
    findings = []
    if layer.reading is not None:
        findings += unit_findings(layer.reading, layer.name, subject, t)
    grad_w = layer.grad_norms.get("W")
    if finite and grad_w is not None and grad_w > t.exploding_norm:
        message = (
            f"||d {layer.layer.params['W']}|| of {subject} is {grad_w:.3g}, above "
            f"{t.exploding_norm:g}: the gradient explodes; lower the learning rate, clip "
            "gradients, or scale the weights and inputs down (He/Xavier init)."
        )
        findings.append(Finding("exploding_gradient", "warn", layer.name, message))
    return findings


def _vanishing_finding(
    layers: Sequence[LayerHealth], ratio: float | None, signal: float | None, threshold: float
) -> Finding | None:
    """Either ratio below the threshold (engine.network's rule: ||dz|| shows a near-linear
    stack of small weights that ||dW|| misses)."""
    below = [(r, what) for r, what in ((ratio, "dW"), (signal, "dz")) if r is not None]
    below = [(r, what) for r, what in below if r < threshold]
    if not below:
        return None
    value, what = min(below)
    first, last = layers[0].name, layers[-1].name
    message = (
        f"||{what}|| of node {first!r} is {value:.2g} times that of node {last!r} (below "
        f"{threshold:g}): the gradient vanishes on its way back; use He/Xavier init instead "
        "of small weights, relu instead of saturating activations, or normalise the layers' "
        "inputs (batchnorm)."
    )
    return Finding("vanishing_gradient", "warn", first, message)


def parameter_totals(lowered: Lowered) -> ParameterTotals:
    groups = dict.fromkeys(("weights", "biases", "batchnorm", "running_stats", "other"), 0)
    for name, shape in lowered.params.items():
        groups[ROLE_GROUPS.get(lowered.roles.get(name, ""), "other")] += math.prod(shape)
    neurons = sum(
        lowered.shapes[layer.output][1]
        for layer in lowered.layers
        if layer.node.op_type in NEURON_OPS and "W" in layer.params
        and len(lowered.shapes[layer.output]) > 1
    )  # fmt: skip
    return ParameterTotals(
        tensors=len(lowered.params),
        total=sum(math.prod(shape) for shape in lowered.params.values()),
        neurons=neurons,
        **groups,
    )
