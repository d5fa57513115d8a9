"""A fully-connected network, lowered to the engine's ops (the CS231n "neural networks" notes).

A network is not a second engine. `build_graph` turns its definition into `NodeSpec`s that
the compiler and executor treat like any other graph, and `network_diagnostics` reads each
layer's health off that one forward/backward pass. Layer i (1-based: the input layer is not
counted) becomes four nodes, with a_prev = X for layer 1:

    layer{i}.W   param   (fan_in, units)
    layer{i}.b   param   (units,)
    layer{i}.z   affine  a_prev @ W + b   (N, fan_in) @ (fan_in, units), + b on every row
    layer{i}.a   act(z)  relu, leaky_relu, sigmoid, tanh, or identity for `linear`

The last layer's `a` are the scores. With l2 = 0 the loss node is `loss`; with l2 > 0 it is
`data_loss`, the penalty 0.5 * l2 * sum_i sum(W_i^2) is `l2`, and `loss` = data_loss + l2.
`X` is an `input`; labels or targets are the `const` `y`.

`compile_network` compiles the lowered graph once, on zero-stride placeholder leaves (no
memory): the compiler infers every shape, the element counts and the FLOPs with Python ints
and checks the limits before any weight or batch is drawn. `with_leaves` then puts in the
real leaves (`leaf_values`), cast to the network's dtype as they are drawn, so a float32 run
holds no float64 twin of its weights. d loss / d X costs a matmul as big as layer 1's and
only the `gradients` report reads it, so it is skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradiag.engine.compiler import Limits, NodeSpec, Program, compile_graph
from gradiag.engine.diagnostics import (
    DEAD_RELU_ADVICE,
    SATURATION_ADVICE,
    Finding,
    Thresholds,
    grade,
    is_dead,
    is_finite,
    is_saturated,
    mean_std,
    sum_of_squares,
    worst_status,
)
from gradiag.engine.errors import GraphError, Loc, ShapeError, ValueDomainError, check_limits
from gradiag.engine.executor import Result
from gradiag.engine.ops import Array, Shape, bad_class_label

# The op each activation lowers to; `linear` keeps z as it is.
ACTIVATION_OPS: dict[str, str] = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "linear": "identity",
}
# The op each loss lowers to. Class losses take integer labels (N,); `sum` takes no targets.
LOSS_OPS: dict[str, str] = {
    "mse": "mse",
    "softmax_cross_entropy": "softmax_cross_entropy",
    "svm_hinge": "svm_hinge",
    "sum": "sum",
}
CLASS_LOSSES = ("softmax_cross_entropy", "svm_hinge")
# The standard deviation of W's entries per scheme, from the layer's fan_in. `xavier` is the
# CS231n "calibrating the variances" form, 1 / fan_in (LeCun normal), not Glorot's average.
INIT_SCALES: dict[str, Callable[[int], float]] = {
    "he": lambda fan_in: math.sqrt(2.0 / fan_in),
    "xavier": lambda fan_in: math.sqrt(1.0 / fan_in),
    "small": lambda fan_in: 0.01,
    "zeros": lambda fan_in: 0.0,
}
DTYPES = ("float64", "float32")
# Activations whose units can die (pre-activation <= 0 on every example) or saturate.
DYING = ("relu", "leaky_relu")
SATURATING = ("sigmoid", "tanh")


# --- the definition ----------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    units: int
    activation: str = "relu"
    alpha: float = 0.01  # leaky_relu's slope for z <= 0; other activations ignore it


@dataclass(frozen=True)
class Weights:
    W: Array  # (fan_in, units)
    b: Array  # (units,)


@dataclass(frozen=True)
class Init:
    scheme: str = "he"
    seed: int = 0


@dataclass(frozen=True)
class Batch:
    """An explicit batch: x (N, input_dim); y (N,) class labels, (N, C) or, when C is 1,
    (N,) regression targets; None for the `sum` loss, which takes none."""

    x: Array
    y: Array | None = None


@dataclass(frozen=True)
class RandomBatch:
    """x ~ N(0, 1); labels uniform in [0, C) (class losses) or targets ~ N(0, 1) (mse)."""

    size: int
    seed: int = 0


@dataclass(frozen=True)
class NetworkSpec:
    """A network as the engine sees it. Field names follow the request, so an error's `loc`
    (("layers", 2, "units"), ("batch", "y", 7)) points at the request's field."""

    input_dim: int
    layers: tuple[Layer, ...]
    loss: str
    weights: tuple[Weights, ...] | None = None  # explicit; otherwise drawn by `init`
    init: Init | None = None  # default: Init() (he, seed 0)
    batch: Batch | RandomBatch = RandomBatch(32)
    l2: float = 0.0
    dtype: str = "float64"

    @property
    def fan_ins(self) -> list[int]:
        return [self.input_dim] + [layer.units for layer in self.layers[:-1]]

    @property
    def classes(self) -> int:
        return self.layers[-1].units

    @property
    def batch_size(self) -> int:
        return self.batch.size if isinstance(self.batch, RandomBatch) else len(self.batch.x)

    @property
    def name(self) -> str:
        """CS231n's naming: the input layer is not counted."""
        return f"{len(self.layers)}-layer neural network"


@dataclass(frozen=True)
class NetworkLimits:
    """The network's own limits (checked first, from the definition alone) and the graph
    limits its lowered graph must fit. 0 means no limit."""

    max_layers: int = 0
    max_units: int = 0
    max_batch: int = 0
    graph: Limits = field(default_factory=Limits)


# --- checks: every bad definition names its field ----------------------------------------


def check_network(spec: NetworkSpec) -> None:
    """Structure, shapes and labels; raises an EngineError whose `loc` is the request field."""
    if spec.input_dim < 1:
        raise ShapeError(f"input_dim must be at least 1, got {spec.input_dim}", loc=("input_dim",))
    if not spec.layers:
        raise GraphError("a network needs at least one layer", loc=("layers",))
    for k, layer in enumerate(spec.layers):
        _check_layer(layer, k)
    if spec.loss not in LOSS_OPS:
        known = ", ".join(LOSS_OPS)
        raise GraphError(f"unknown loss {spec.loss!r}; known: {known}", loc=("loss",))
    if spec.loss in CLASS_LOSSES and spec.classes < 2:
        raise ShapeError(
            f"{spec.loss} needs at least 2 classes: the last layer has {spec.classes} unit",
            loc=("layers", len(spec.layers) - 1, "units"),
        )
    if spec.dtype not in DTYPES:
        raise GraphError(f"dtype must be one of {', '.join(DTYPES)}", loc=("dtype",))
    if not (math.isfinite(spec.l2) and spec.l2 >= 0):
        raise ValueDomainError(f"l2 must be a finite number >= 0, got {spec.l2}", loc=("l2",))
    if spec.weights is not None:
        if spec.init is not None:
            raise GraphError("give `weights` or `init`, not both", loc=("init",))
        _check_weights(spec, spec.weights)
    elif spec.init is not None and spec.init.scheme not in INIT_SCALES:
        known = ", ".join(INIT_SCALES)
        raise GraphError(
            f"unknown init scheme {spec.init.scheme!r}; known: {known}", loc=("init", "scheme")
        )
    if isinstance(spec.batch, RandomBatch):
        if spec.batch.size < 1:
            raise ShapeError("a batch needs at least one example", loc=("batch", "random", "size"))
    else:
        _check_batch(spec, spec.batch)


def _check_layer(layer: Layer, k: int) -> None:
    if layer.units < 1:
        raise ShapeError(
            f"layer {k + 1} needs at least 1 unit, got {layer.units}", loc=("layers", k, "units")
        )
    if layer.activation not in ACTIVATION_OPS:
        known = ", ".join(ACTIVATION_OPS)
        raise GraphError(
            f"unknown activation {layer.activation!r}; known: {known}",
            loc=("layers", k, "activation"),
        )


def _check_weights(spec: NetworkSpec, weights: Sequence[Weights]) -> None:
    if len(weights) != len(spec.layers):
        raise ShapeError(
            f"`weights` has {len(weights)} entries; the network has {len(spec.layers)} layers",
            loc=("weights",),
        )
    for k, (w, fan_in, layer) in enumerate(zip(weights, spec.fan_ins, spec.layers, strict=True)):
        if w.W.shape != (fan_in, layer.units):
            raise ShapeError(
                f"W of layer {k + 1} must be (fan_in, units) = {[fan_in, layer.units]}, "
                f"got {list(w.W.shape)}",
                loc=("weights", k, "W"),
            )
        if w.b.shape != (layer.units,):
            raise ShapeError(
                f"b of layer {k + 1} must be (units,) = {[layer.units]}, got {list(w.b.shape)}",
                loc=("weights", k, "b"),
            )


def _check_batch(spec: NetworkSpec, batch: Batch) -> None:
    x = batch.x
    if x.ndim != 2 or x.shape[0] < 1:
        raise ShapeError(
            f"x must be a non-empty (N, input_dim) matrix, got shape {list(x.shape)}",
            loc=("batch", "x"),
        )
    n, width = x.shape
    if width != spec.input_dim:
        raise ShapeError(
            f"every row of x must have input_dim = {spec.input_dim} numbers, got {width}",
            loc=("batch", "x"),
        )
    y = batch.y
    if y is None:
        if spec.loss != "sum":
            raise ShapeError(f"the {spec.loss} loss needs `y`", loc=("batch", "y"))
        return
    if y.ndim == 0 or y.shape[0] != n:
        raise ShapeError(
            f"y must have one entry per row of x ({n}), got shape {list(y.shape)}",
            loc=("batch", "y"),
        )
    if spec.loss in CLASS_LOSSES:
        _check_labels(y, spec.classes)
    elif spec.loss == "mse":
        # (N,) is accepted for a single output unit and read as (N, 1).
        allowed = [(n, spec.classes)] + ([(n,)] if spec.classes == 1 else [])
        if y.shape not in allowed:
            shapes = " or ".join(str(list(shape)) for shape in allowed)
            raise ShapeError(
                f"mse targets must be (N, units) = {shapes}, got {list(y.shape)}",
                loc=("batch", "y"),
            )


def _check_labels(y: Array, classes: int) -> None:
    if y.ndim != 1:
        raise ShapeError(
            f"class labels must be a flat list (N,), got shape {list(y.shape)}", loc=("batch", "y")
        )
    k = bad_class_label(y, classes)
    if k is not None:
        raise ValueDomainError(
            f"label {float(y[k])!r} is not an integer class in [0, {classes}) "
            f"(the last layer has {classes} units)",
            loc=("batch", "y", k),
        )


def compile_network(spec: NetworkSpec, limits: NetworkLimits, *, gradients: bool) -> Program:
    """The network's program, compiled once on zero-stride placeholder leaves (no memory):
    the layer, unit and batch counts are checked off the definition first, then the
    compiler checks the element counts and FLOPs of the lowered graph, all before a weight
    or an example is drawn. `with_leaves` puts the real weights and batch in. X's gradient
    is left out unless the report returns every node's (`gradients`)."""
    checks: list[tuple[str, int, int, Loc]] = [
        ("max_layers", limits.max_layers, len(spec.layers), ("layers",)),
        ("max_units", limits.max_units, spec.input_dim, ("input_dim",)),
    ]
    checks += [
        ("max_units", limits.max_units, layer.units, ("layers", k, "units"))
        for k, layer in enumerate(spec.layers)
    ]
    batch_loc: Loc = (
        ("batch", "random", "size") if isinstance(spec.batch, RandomBatch) else ("batch", "x")
    )
    checks.append(("max_batch", limits.max_batch, spec.batch_size, batch_loc))
    for name, limit, amount, loc in checks:
        check_limits([(name, limit, amount, f"{'.'.join(map(str, loc))} is")], loc=loc)
    nodes, output = build_graph(spec, placeholder_leaves(spec))
    return compile_graph(
        nodes,
        output,
        limits=limits.graph,
        dtype=np.dtype(spec.dtype),
        no_grad=unread_gradients(gradients=gradients),
    )


def with_leaves(program: Program, leaves: Mapping[str, Array]) -> Program:
    """The program with these leaf values (by id) in place of its placeholders."""
    rows = {name: program.node_ids().index(name) for name in leaves}
    tensors = dict(program.tensors)
    for name, value in leaves.items():
        tensors[rows[name]] = value
    return dataclasses.replace(program, tensors=tensors)


# --- leaves: weights and batch, explicit or drawn ----------------------------------------


def leaf_shapes(spec: NetworkSpec) -> dict[str, Shape]:
    """The shape of every leaf of the lowered graph (`y` only when the loss takes targets)."""
    n = spec.batch_size
    shapes: dict[str, Shape] = {"X": (n, spec.input_dim)}
    for i, (fan_in, layer) in enumerate(zip(spec.fan_ins, spec.layers, strict=True), start=1):
        shapes[f"layer{i}.W"] = (fan_in, layer.units)
        shapes[f"layer{i}.b"] = (layer.units,)
    if spec.loss in CLASS_LOSSES:
        shapes["y"] = (n,)
    elif spec.loss == "mse":
        shapes["y"] = (n, spec.classes)
    return shapes


def placeholder_leaves(spec: NetworkSpec) -> dict[str, Array]:
    """Zeros of every leaf's shape as zero-stride views: any size, no memory."""
    zero = np.zeros((), np.dtype(spec.dtype))
    return {name: np.broadcast_to(zero, shape) for name, shape in leaf_shapes(spec).items()}


def init_weights(
    spec: NetworkSpec, dtype: np.dtype[Any] | type = np.float64
) -> tuple[Weights, ...]:
    """W = N(0, 1) * scale(fan_in), drawn layer by layer from default_rng(seed); b = 0.
    Drawn in float64 whatever the dtype, so float32 runs start from the same weights; each
    layer is cast to `dtype` as soon as it is drawn, so at most one float64 W is alive."""
    init = spec.init or Init()
    scale_of = INIT_SCALES[init.scheme]
    rng = np.random.default_rng(init.seed)
    weights = []
    for fan_in, layer in zip(spec.fan_ins, spec.layers, strict=True):
        W = _normal((fan_in, layer.units), scale_of(fan_in), rng).astype(dtype, copy=False)
        weights.append(Weights(W, np.zeros(layer.units, dtype)))
    return tuple(weights)


def _normal(shape: Shape, scale: float, rng: np.random.Generator) -> Array:
    """N(0, 1) * scale in float64, scaled in place (no second array of W's size)."""
    if not scale:  # `zeros` draws nothing: 0 * N(0, 1) would leave -0.0 in the report
        return np.zeros(shape)
    drawn = rng.standard_normal(shape)
    drawn *= scale
    return drawn


def random_batch(spec: NetworkSpec, batch: RandomBatch) -> Batch:
    """x ~ N(0, 1) (N, input_dim), then the labels or targets, from default_rng(seed)."""
    rng = np.random.default_rng(batch.seed)
    x = rng.standard_normal((batch.size, spec.input_dim))
    y: Array | None = None
    if spec.loss in CLASS_LOSSES:
        y = rng.integers(0, spec.classes, size=batch.size).astype(np.float64)
    elif spec.loss == "mse":
        y = rng.standard_normal((batch.size, spec.classes))
    return Batch(x, y)


def leaf_values(spec: NetworkSpec) -> dict[str, Array]:
    """Every leaf's value in the network's dtype: the explicit weights and batch, or drawn
    ones. Cast here, so compile_graph copies nothing and no float64 twin outlives this."""
    dtype = np.dtype(spec.dtype)
    weights = spec.weights if spec.weights is not None else init_weights(spec, dtype)
    batch = spec.batch if isinstance(spec.batch, Batch) else random_batch(spec, spec.batch)
    values: dict[str, Array] = {"X": np.asarray(batch.x, dtype)}
    for i, w in enumerate(weights, start=1):
        values[f"layer{i}.W"] = np.asarray(w.W, dtype)
        values[f"layer{i}.b"] = np.asarray(w.b, dtype)
    shapes = leaf_shapes(spec)
    if "y" in shapes:
        assert batch.y is not None  # check_network: every loss with targets has y
        # mse's (N,) targets of one unit -> (N, 1)
        values["y"] = np.asarray(batch.y, dtype).reshape(shapes["y"])
    return values


def unread_gradients(*, gradients: bool) -> frozenset[str]:
    """The leaves whose gradient no report reads, for `compile_graph(no_grad=...)`: the input
    batch X's, unless the report returns every node's gradient (`include: ["gradients"]`).
    Skipping it saves a matmul as big as layer 1's forward."""
    return frozenset() if gradients else frozenset({"X"})


# --- lowering ----------------------------------------------------------------------------


def lower(spec: NetworkSpec) -> tuple[list[NodeSpec], str]:
    """The network as engine nodes with its real leaves (drawn or given), and the id of its
    output (`loss`). The service compiles on placeholders instead (`compile_network`)."""
    return build_graph(spec, leaf_values(spec))


def build_graph(spec: NetworkSpec, leaves: Mapping[str, Array]) -> tuple[list[NodeSpec], str]:
    x_loc: Loc = ("batch", "random") if isinstance(spec.batch, RandomBatch) else ("batch", "x")
    nodes = [NodeSpec("X", "input", value=leaves["X"], loc=x_loc)]
    scores = "X"
    for i, layer in enumerate(spec.layers, start=1):
        nodes += _layer_nodes(spec, i, layer, scores, leaves)
        scores = f"layer{i}.a"
    if "y" in leaves:
        nodes.append(NodeSpec("y", "const", value=leaves["y"], loc=("batch",)))
    data_loss = "data_loss" if spec.l2 else "loss"
    targets = ("y",) if "y" in leaves else ()
    nodes.append(NodeSpec(data_loss, LOSS_OPS[spec.loss], (scores, *targets), loc=("loss",)))
    if spec.l2:
        nodes += _l2_nodes(spec)
        nodes.append(NodeSpec("loss", "add", ("data_loss", "l2"), loc=("l2",)))
    return nodes, "loss"


def _layer_nodes(
    spec: NetworkSpec, i: int, layer: Layer, previous: str, leaves: Mapping[str, Array]
) -> list[NodeSpec]:
    """a = act(previous @ W + b) for layer i (1-based), the affine part as one node."""
    name, k = f"layer{i}", i - 1
    loc: Loc = ("layers", k)
    weights_loc: Loc = ("weights", k) if spec.weights is not None else ("init",)
    attrs = {"alpha": layer.alpha} if layer.activation == "leaky_relu" else {}
    act = ACTIVATION_OPS[layer.activation]
    return [
        NodeSpec(f"{name}.W", "param", value=leaves[f"{name}.W"], loc=(*weights_loc, "W")),
        NodeSpec(f"{name}.b", "param", value=leaves[f"{name}.b"], loc=(*weights_loc, "b")),
        NodeSpec(f"{name}.z", "affine", (previous, f"{name}.W", f"{name}.b"), loc=loc),
        NodeSpec(f"{name}.a", act, (f"{name}.z",), attrs, loc=loc),
    ]


def _l2_nodes(spec: NetworkSpec) -> list[NodeSpec]:
    """l2 = 0.5 * l2 * sum over layers of sum(W^2); biases are not penalised."""
    loc: Loc = ("l2",)
    nodes: list[NodeSpec] = []
    running = ""
    for i in range(1, len(spec.layers) + 1):
        name = f"layer{i}"
        nodes.append(NodeSpec(f"{name}.W_squared", "square", (f"{name}.W",), loc=loc))
        nodes.append(NodeSpec(f"{name}.W_sq_sum", "sum", (f"{name}.W_squared",), loc=loc))
        if running:  # l2.sum{i}: the squared weights of layers 1..i
            nodes.append(NodeSpec(f"l2.sum{i}", "add", (running, f"{name}.W_sq_sum"), loc=loc))
            running = f"l2.sum{i}"
        else:
            running = f"{name}.W_sq_sum"
    coef = np.asarray(0.5 * spec.l2)
    nodes.append(NodeSpec("l2.coef", "const", value=coef, loc=loc))
    nodes.append(NodeSpec("l2", "mul", ("l2.coef", running), loc=loc))
    return nodes


# --- diagnostics: read off the one forward/backward pass ---------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    neurons: int
    weights: int
    biases: int

    @property
    def total(self) -> int:
        return self.weights + self.biases


def parameter_counts(spec: NetworkSpec) -> ParameterCounts:
    """CS231n's counts: neurons = sum units, weights = sum fan_in * units, biases = sum units."""
    units = [layer.units for layer in spec.layers]
    weights = sum(f * u for f, u in zip(spec.fan_ins, units, strict=True))
    return ParameterCounts(neurons=sum(units), weights=weights, biases=sum(units))


@dataclass
class LayerDiagnostics:
    """One layer's health. Unit fractions are of the layer's units; activation fractions of
    its N * units activations. Gates that cannot die or saturate report 0."""

    index: int
    units: int
    activation: str
    fan_in: int
    dead_unit_indices: list[int]
    dead_activation_fraction: float
    saturated_unit_indices: list[int]
    saturated_activation_fraction: float
    activation_mean: float
    activation_std: float
    weight_norm: float
    grad_norm_W: float
    grad_norm_b: float
    grad_norm_z: float  # ||d loss / d z||: the signal backprop carries into the layer
    status: str = "ok"

    @property
    def name(self) -> str:
        return f"layer{self.index}"

    @property
    def weights(self) -> int:
        return self.fan_in * self.units

    @property
    def biases(self) -> int:
        return self.units

    @property
    def dead_units(self) -> int:
        return len(self.dead_unit_indices)

    @property
    def dead_fraction(self) -> float:
        return self.dead_units / self.units

    @property
    def saturated_units(self) -> int:
        return len(self.saturated_unit_indices)

    @property
    def saturated_fraction(self) -> float:
        return self.saturated_units / self.units

    @property
    def update_ratio(self) -> float | None:
        """||dW|| / ||W||: how far one unit-learning-rate step moves W, relative to W
        (multiply by the learning rate for CS231n's ~1e-3 rule of thumb). None when W is 0."""
        if self.weight_norm == 0:
            return None
        with np.errstate(all="ignore"):
            return float(np.float64(self.grad_norm_W) / np.float64(self.weight_norm))


@dataclass
class NetworkDiagnostics:
    name: str
    loss: float
    data_loss: float
    l2_loss: float
    parameters: ParameterCounts
    layers: list[LayerDiagnostics]
    gradient_ratio: float | None  # ||dW layer1|| / ||dW last layer||
    signal_ratio: float | None  # ||dz layer1|| / ||dz last layer||
    nonfinite_nodes: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        return worst_status(self.findings)


def network_diagnostics(
    result: Result, spec: NetworkSpec, thresholds: Thresholds
) -> NetworkDiagnostics:
    ids = result.program.node_ids()
    index = {node: i for i, node in enumerate(ids)}

    def value(node: str) -> Array:
        return result.value(index[node])

    def grad(node: str) -> Array:
        g = result.grad(index[node])
        assert g is not None  # params get a gradient
        return g

    stats = _TensorStats()
    layers = [
        _layer_diagnostics(i, layer, fan_in, value, grad, thresholds.saturation_eps, stats)
        for i, (fan_in, layer) in enumerate(zip(spec.fan_ins, spec.layers, strict=True), start=1)
    ]
    nonfinite = [
        node
        for i, node in enumerate(ids)
        if not (stats.finite(result.value(i)) and stats.finite(result.grad(i)))
    ]
    ratio = _first_to_last(layers, "grad_norm_W")
    signal = _first_to_last(layers, "grad_norm_z")
    findings = _nonfinite_findings(result, nonfinite)
    for layer in layers:
        findings += _layer_findings(layer, thresholds, finite=not nonfinite)
    finding = _vanishing_finding(layers, ratio, signal, thresholds.vanishing_ratio)
    if finding:
        findings.append(finding)
    for layer in layers:
        layer.status = worst_status(f for f in findings if f.location == layer.name)
    loss = float(value("loss"))
    data_loss = float(value("data_loss")) if spec.l2 else loss
    return NetworkDiagnostics(
        name=spec.name,
        loss=loss,
        data_loss=data_loss,
        l2_loss=float(value("l2")) if spec.l2 else 0.0,
        parameters=parameter_counts(spec),
        layers=layers,
        gradient_ratio=ratio,
        signal_ratio=signal,
        nonfinite_nodes=nonfinite,
        findings=findings,
    )


def _layer_diagnostics(
    i: int,
    layer: Layer,
    fan_in: int,
    value: Callable[[str], Array],
    grad: Callable[[str], Array],
    eps: float,
    stats: _TensorStats,
) -> LayerDiagnostics:
    name = f"layer{i}"
    z, a = value(f"{name}.z"), value(f"{name}.a")  # (N, units)
    dead = saturated = _NONE_FLAGGED
    if layer.activation in DYING:
        dead = _flagged_units(is_dead(z))
    if layer.activation in SATURATING:
        saturated = _flagged_units(is_saturated(a, layer.activation, eps))
    with np.errstate(all="ignore"):  # huge or non-finite activations: inf/nan, not a crash
        stats.finite(z)  # here, where is_dead has just read z into cache
        mean, std = mean_std(a)
        if math.isfinite(mean):  # a float64 sum of a is non-finite when any element is
            stats.known_finite(a)
        weight_norm = stats.norm(value(f"{name}.W"))
        grad_w, grad_b = stats.norm(grad(f"{name}.W")), stats.norm(grad(f"{name}.b"))
        grad_z = stats.norm(grad(f"{name}.z"))
    return LayerDiagnostics(
        index=i,
        units=layer.units,
        activation=layer.activation,
        fan_in=fan_in,
        dead_unit_indices=dead[0],
        dead_activation_fraction=dead[1],
        saturated_unit_indices=saturated[0],
        saturated_activation_fraction=saturated[1],
        activation_mean=mean,
        activation_std=std,
        weight_norm=weight_norm,
        grad_norm_W=grad_w,
        grad_norm_b=grad_b,
        grad_norm_z=grad_z,
    )


_NONE_FLAGGED: tuple[list[int], float] = ([], 0.0)  # gates that cannot die or saturate


def _flagged_units(flagged: Array) -> tuple[list[int], float]:
    """(units flagged on every example of the batch, fraction of flagged activations) of an
    (N, units) mask: a unit is dead (saturated) when it is so on every example."""
    units = np.flatnonzero(flagged.all(axis=0)).tolist()
    return units, int(np.count_nonzero(flagged)) / flagged.size  # = flagged.mean(), no float pass


class _TensorStats:
    """Each tensor read once for the diagnostics: its sum of squares gives its norm
    and, being NaN or inf whenever an element is, its finiteness too. Keyed by id: the
    result keeps every array alive while the report is read."""

    def __init__(self) -> None:
        self._sum_of_squares: dict[int, float] = {}
        self._finite: dict[int, bool] = {}

    def norm(self, x: Array) -> float:
        """The Frobenius norm, from `sum_of_squares` (float64; a float32 tensor's in float32
        when that sum is in its trusted range)."""
        total = self._sum_of_squares.get(id(x))
        if total is None:
            total = self._sum_of_squares[id(x)] = sum_of_squares(x)
            if math.isfinite(total):
                self._finite[id(x)] = True
        return math.sqrt(total)

    def known_finite(self, x: Array) -> None:
        self._finite[id(x)] = True

    def finite(self, x: Array | None) -> bool:
        if x is None:
            return True
        known = self._finite.get(id(x))
        if known is None:
            known = self._finite[id(x)] = is_finite(x)
        return known


def _first_to_last(layers: Sequence[LayerDiagnostics], norm: str) -> float | None:
    """A gradient norm of layer1 over the last layer's; None for one layer, a zero or
    non-finite last."""
    if len(layers) < 2:
        return None
    first: float = getattr(layers[0], norm)
    last: float = getattr(layers[-1], norm)
    if not (math.isfinite(first) and math.isfinite(last)) or last == 0:
        return None
    return first / last


def _layer_findings(layer: LayerDiagnostics, t: Thresholds, *, finite: bool) -> list[Finding]:
    findings = []
    # leaky_relu units stuck at z <= 0 still pass alpha * gradient, so only relu is "dead".
    if layer.activation == "relu":
        severity = grade(layer.dead_fraction, t.dead_warn, t.dead_fail)
        if severity != "ok":
            message = (
                f"{layer.dead_units} of {layer.units} relu units of {layer.name} "
                f"({layer.dead_fraction:.0%}) are dead (z <= 0 on every example): "
                f"{DEAD_RELU_ADVICE}."
            )
            findings.append(Finding("dead_relu", severity, layer.name, message))
    if layer.activation in SATURATING:
        severity = grade(layer.saturated_fraction, t.saturated_warn, t.saturated_fail)
        if severity != "ok":
            message = (
                f"{layer.saturated_units} of {layer.units} {layer.activation} units of "
                f"{layer.name} ({layer.saturated_fraction:.0%}) are saturated (within "
                f"{t.saturation_eps:g} of a bound on every example): "
                f"{SATURATION_ADVICE[layer.activation]}."
            )
            findings.append(Finding(f"saturated_{layer.activation}", severity, layer.name, message))
    if finite and layer.grad_norm_W > t.exploding_norm:
        message = (
            f"||dW|| of {layer.name} is {layer.grad_norm_W:.3g}, above {t.exploding_norm:g}: "
            "the gradient explodes; lower the learning rate, clip gradients, or scale the "
            "weights and inputs down (He/Xavier init)."
        )
        findings.append(Finding("exploding_gradient", "warn", layer.name, message))
    return findings


def _vanishing_finding(
    layers: Sequence[LayerDiagnostics],
    weight_ratio: float | None,
    signal_ratio: float | None,
    threshold: float,
) -> Finding | None:
    """Either ratio below the threshold. ||dW|| alone misses a near-linear stack of small
    weights, where activations shrink forward as fast as gradients shrink backward and the
    ||dW|| stay level; ||dz|| (the signal backprop carries into each layer) still shows it."""
    ratios = [
        (r, what) for r, what in ((weight_ratio, "dW"), (signal_ratio, "dz")) if r is not None
    ]
    below = [(r, what) for r, what in ratios if r < threshold]
    if not below:
        return None
    ratio, what = min(below)
    message = (
        f"||{what}|| of layer1 is {ratio:.2g} times that of {layers[-1].name} (below "
        f"{threshold:g}): the gradient vanishes on its way back; use He/Xavier init instead "
        "of small weights and relu or tanh instead of saturating sigmoids."
    )
    return Finding("vanishing_gradient", "warn", "layer1", message)


def _nonfinite_origin(result: Result) -> tuple[str, str]:
    """Where NaN or Infinity starts: the first non-finite value in forward order, else the
    first non-finite gradient in backward order (the last in topological order)."""
    ids = result.program.node_ids()
    for i in range(len(ids)):
        if not is_finite(result.value(i)):
            return ids[i], "value"
    for i in range(len(ids) - 1, -1, -1):
        if not is_finite(result.grad(i)):
            return ids[i], "gradient"
    raise AssertionError("called without a non-finite node")


def _nonfinite_findings(result: Result, nonfinite: Sequence[str]) -> list[Finding]:
    if not nonfinite:
        return []
    first, where = _nonfinite_origin(result)
    location = first.split(".")[0] if first.startswith("layer") else first
    message = (
        f"a non-finite {where} first appears at {first!r} ({len(nonfinite)} node(s) hold NaN "
        "or Infinity): look for non-finite inputs or weights, or weights so large that the "
        "activations overflow; scale them down."
    )
    return [Finding("nonfinite", "fail", location, message)]


__all__ = [
    "ACTIVATION_OPS",
    "INIT_SCALES",
    "LOSS_OPS",
    "Batch",
    "Init",
    "Layer",
    "LayerDiagnostics",
    "NetworkDiagnostics",
    "NetworkLimits",
    "NetworkSpec",
    "ParameterCounts",
    "RandomBatch",
    "Weights",
    "check_network",
    "compile_network",
    "lower",
    "network_diagnostics",
    "parameter_counts",
    "with_leaves",
]
