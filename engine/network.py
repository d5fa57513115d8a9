"""A network, lowered to the engine's ops (the CS231n notes on neural networks and convnets).

A network is not a second engine. `build_graph` turns its definition into `NodeSpec`s that the
compiler and executor treat like any other graph, and `network_diagnostics` reads each
layer's health off that one forward/backward pass. Layer i (1-based, every entry of `layers`
counts; the input layer does not) becomes these nodes, a_prev being the previous layer's
`.a` (X for layer 1):

    dense      layer{i}.W (fan_in, units), .b (units,), .z = affine(a_prev, W, b), .a = act(z)
               (after an image: .flat = flatten(a_prev) first, C, H, W order)
    conv2d     layer{i}.W (F, C, kh, kw), .b (F,), .z = conv2d(a_prev, W, b), .a = act(z)
    maxpool2d  layer{i}.a = maxpool2d(a_prev)        avgpool2d likewise
    batchnorm  layer{i}.gamma, .beta (C,), .z = batchnorm(a_prev, gamma, beta) (train mode;
               eval: batchnorm_eval with the consts .running_mean, .running_var), .a = act(z)
    flatten    layer{i}.a = flatten(a_prev)

The last layer's `a` are the scores. With l2 = 0 the loss node is `loss`; otherwise it is
`data_loss`, the penalty 0.5 * l2 * (the sum of every W^2, and b^2 with `l2_biases`) is `l2`,
and `loss` = data_loss + l2. `X` is an `input`; labels or targets are the `const` `y`.

Shapes are walked layer by layer with the op table's own shape rules before anything is
drawn, so a bad layer (a kernel larger than its padded input, a channel mismatch) is an
error that names it. `compile_network` compiles the lowered graph once, on zero-stride
placeholder leaves (no memory): the compiler checks the element counts and FLOPs with
Python ints before any weight or example exists. `with_leaves` then puts in the real
leaves (`leaf_values`), cast to the network's dtype as they are drawn. d loss / d X costs a
matmul as big as layer 1's and only the `gradients` report reads it, so it is skipped
otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gradiag.engine.compiler import Limits, NodeSpec, Program, compile_graph
from gradiag.engine.diagnostics import (
    Finding,
    Reading,
    Thresholds,
    cap_findings,
    count_per_unit,
    first_to_last,
    is_finite,
    mean_std,
    nonfinite_finding,
    norm_of_sum_of_squares,
    read_activation,
    sum_of_squares,
    unit_findings,
    worst_status,
)
from gradiag.engine.errors import (
    EngineError,
    GraphError,
    Loc,
    ShapeError,
    ValueDomainError,
    check_limits,
)
from gradiag.engine.executor import Result
from gradiag.engine.ops import OPS, Array, Shape, bad_class_label

# The op each activation lowers to; `linear` keeps z as it is.
ACTIVATION_OPS: dict[str, str] = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "linear": "identity",
}
# The op each loss lowers to. Class losses take integer labels (N,) (svm_hinge on one output
# unit: labels -1 or +1, the binary hinge); `sum` takes no targets.
LOSS_OPS: dict[str, str] = {
    "mse": "mse",
    "softmax_cross_entropy": "softmax_cross_entropy",
    "svm_hinge": "svm_hinge",
    "sum": "sum",
    "bce_with_logits": "bce_with_logits",
}
CLASS_LOSSES = ("softmax_cross_entropy", "svm_hinge")
# The standard deviation of W's entries per scheme, from the layer's fan_in (C * kh * kw for a
# conv layer). `xavier` is the CS231n "calibrating the variances" form, 1 / fan_in (LeCun
# normal), not Glorot's average.
INIT_SCALES: dict[str, Callable[[int], float]] = {
    "he": lambda fan_in: math.sqrt(2.0 / fan_in),
    "xavier": lambda fan_in: math.sqrt(1.0 / fan_in),
    "small": lambda fan_in: 0.01,
    "zeros": lambda fan_in: 0.0,
}
DTYPES = ("float64", "float32")
BATCHNORM_MODES = ("train", "eval")


# --- the layers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBase:
    """What every layer answers: its parameters' shapes for an input shape (N first), the
    nodes it lowers to, and what kind of layer it is."""

    kind: ClassVar[str]

    @property
    def type(self) -> str:
        """The layer's name on the wire and in messages (a pool layer's is its op)."""
        return self.kind

    def params(self, x: Shape) -> dict[str, Shape]:
        return {}

    def consts(self) -> tuple[str, ...]:
        """The params that are constants (batchnorm's running statistics)."""
        return ()

    def fan_in(self, x: Shape) -> int:
        return 0

    def ops(self, name: str, prev: str, x: Shape) -> list[NodeSpec]:
        raise NotImplementedError


def _activation(name: str, activation: str, alpha: float) -> NodeSpec:
    attrs = {"alpha": alpha} if activation == "leaky_relu" else {}
    return NodeSpec(f"{name}.a", ACTIVATION_OPS[activation], (f"{name}.z",), attrs)


@dataclass(frozen=True)
class Dense(LayerBase):
    units: int
    activation: str = "relu"
    alpha: float = 0.01  # leaky_relu's slope for z <= 0
    kind: ClassVar[str] = "dense"

    def fan_in(self, x: Shape) -> int:
        return math.prod(x[1:])

    def params(self, x: Shape) -> dict[str, Shape]:
        return {"W": (self.fan_in(x), self.units), "b": (self.units,)}

    def ops(self, name: str, prev: str, x: Shape) -> list[NodeSpec]:
        nodes = []
        if len(x) > 2:  # after an image: C, H, W order, as torch.flatten
            nodes.append(NodeSpec(f"{name}.flat", "flatten", (prev,)))
            prev = f"{name}.flat"
        nodes.append(NodeSpec(f"{name}.z", "affine", (prev, f"{name}.W", f"{name}.b")))
        return [*nodes, _activation(name, self.activation, self.alpha)]


@dataclass(frozen=True)
class Conv2d(LayerBase):
    filters: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    activation: str = "relu"
    alpha: float = 0.01
    kind: ClassVar[str] = "conv2d"

    def fan_in(self, x: Shape) -> int:
        return (x[1] if len(x) > 1 else 0) * math.prod(self.kernel)

    def params(self, x: Shape) -> dict[str, Shape]:
        channels = x[1] if len(x) > 1 else 0
        return {"W": (self.filters, channels, *self.kernel), "b": (self.filters,)}

    def ops(self, name: str, prev: str, x: Shape) -> list[NodeSpec]:
        attrs = {"stride": list(self.stride), "padding": list(self.padding)}
        z = NodeSpec(f"{name}.z", "conv2d", (prev, f"{name}.W", f"{name}.b"), attrs)
        return [z, _activation(name, self.activation, self.alpha)]


@dataclass(frozen=True)
class Pool(LayerBase):
    op: str  # maxpool2d or avgpool2d
    kernel: tuple[int, int]
    stride: tuple[int, int] | None = None  # default: the kernel
    padding: tuple[int, int] = (0, 0)
    kind: ClassVar[str] = "pool"

    @property
    def type(self) -> str:
        return self.op

    def ops(self, name: str, prev: str, x: Shape) -> list[NodeSpec]:
        attrs: dict[str, Any] = {"kernel": list(self.kernel), "padding": list(self.padding)}
        if self.stride is not None:
            attrs["stride"] = list(self.stride)
        return [NodeSpec(f"{name}.a", self.op, (prev,), attrs)]


@dataclass(frozen=True)
class BatchNorm(LayerBase):
    mode: str = "train"
    activation: str = "linear"
    alpha: float = 0.01
    eps: float = 1e-5
    kind: ClassVar[str] = "batchnorm"

    def params(self, x: Shape) -> dict[str, Shape]:
        channels: Shape = (x[1],) if len(x) > 1 else (0,)
        shapes: dict[str, Shape] = {"gamma": channels, "beta": channels}
        if self.mode == "eval":
            shapes.update(running_mean=channels, running_var=channels)
        return shapes

    def consts(self) -> tuple[str, ...]:
        return ("running_mean", "running_var") if self.mode == "eval" else ()

    def ops(self, name: str, prev: str, x: Shape) -> list[NodeSpec]:
        names = [prev, f"{name}.gamma", f"{name}.beta"]
        op = "batchnorm"
        if self.mode == "eval":
            names += [f"{name}.running_mean", f"{name}.running_var"]
            op = "batchnorm_eval"
        z = NodeSpec(f"{name}.z", op, tuple(names), {"eps": self.eps})
        return [z, _activation(name, self.activation, self.alpha)]


@dataclass(frozen=True)
class Flatten(LayerBase):
    kind: ClassVar[str] = "flatten"

    def ops(self, name: str, prev: str, x: Shape) -> list[NodeSpec]:
        return [NodeSpec(f"{name}.a", "flatten", (prev,))]


Layer = Dense | Conv2d | Pool | BatchNorm | Flatten


# --- the definition --------------------------------------------------------------------------


@dataclass(frozen=True)
class Init:
    scheme: str = "he"
    seed: int = 0


@dataclass(frozen=True)
class Batch:
    """An explicit batch: x (N, *input_shape); y (N,) class labels, (N, C) or, when C is 1,
    (N,) targets; None for the `sum` loss, which takes none."""

    x: Array
    y: Array | None = None


@dataclass(frozen=True)
class RandomBatch:
    """x ~ N(0, 1); labels uniform in [0, C) (class losses; -1 or +1 for the binary hinge),
    targets ~ N(0, 1) (mse) or uniform in [0, 1) (bce_with_logits)."""

    size: int
    seed: int = 0


@dataclass(frozen=True)
class NetworkSpec:
    """A network as the engine sees it. Field names follow the request, so an error's `loc`
    (("layers", 2, "units"), ("batch", "y", 7)) points at the request's field. `weights`
    holds one mapping per layer (`{}` for a layer without parameters)."""

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    loss: str
    weights: tuple[Mapping[str, Array], ...] | None = None  # explicit; otherwise `init` draws
    init: Init | None = None  # default: Init() (he, seed 0)
    batch: Batch | RandomBatch = RandomBatch(32)
    l2: float = 0.0
    l2_biases: bool = False
    dtype: str = "float64"

    @property
    def batch_size(self) -> int:
        return self.batch.size if isinstance(self.batch, RandomBatch) else len(self.batch.x)

    @property
    def name(self) -> str:
        """CS231n's naming: the layers with weights count, the input layer does not."""
        return f"{sum(isinstance(lay, Dense | Conv2d) for lay in self.layers)}-layer neural network"


@dataclass(frozen=True)
class NetworkLimits:
    """The network's own limits (checked first, from the definition alone) and the graph
    limits its lowered graph must fit. 0 means no limit."""

    max_layers: int = 0
    max_units: int = 0
    max_batch: int = 0
    graph: Limits = field(default_factory=Limits)


# --- shapes: every layer's input and output, by the op table's rules ---------------------


@dataclass(frozen=True)
class Stage:
    """One layer as lowered: its input and output shapes (N first) and parameter shapes."""

    index: int  # 1-based
    layer: Layer
    x: Shape
    out: Shape
    params: Mapping[str, Shape]

    @property
    def name(self) -> str:
        return f"layer{self.index}"


def layer_shapes(spec: NetworkSpec, batch: int | None = None) -> list[Stage]:
    """Each layer's shapes for a batch of `batch` examples (default: the spec's), walked
    with the op table's shape rules: a ShapeError names the layer."""
    x: Shape = (spec.batch_size if batch is None else batch, *spec.input_shape)
    stages = []
    for k, layer in enumerate(spec.layers):
        params = layer.params(x)
        try:
            out = _out_shape(layer, x, params)
        except ShapeError as err:
            raise ShapeError(
                f"layer {k + 1} ({layer.type}): {err.message}", loc=("layers", k)
            ) from None
        stages.append(Stage(k + 1, layer, x, out, params))
        x = out
    return stages


def _out_shape(layer: Layer, x: Shape, params: Mapping[str, Shape]) -> Shape:
    """The layer's output shape through the shape rules of the ops it lowers to."""
    shapes = {"prev": x, **{f"p.{name}": shape for name, shape in params.items()}}
    for node in layer.ops("p", "prev", x):
        ins = [shapes[ref] for ref in node.inputs]
        shapes[node.id] = OPS[node.op].shape(*ins, **node.attrs)
    return shapes["p.a"]


# --- checks: every bad definition names its field ----------------------------------------


def check_network(spec: NetworkSpec) -> list[Stage]:
    """Structure, shapes, weights and labels; raises an EngineError whose `loc` is the
    request field. Returns the layers' shapes."""
    if not spec.input_shape or min(spec.input_shape) < 1:
        raise ShapeError(
            f"the input needs a size of at least 1 on every axis, got {list(spec.input_shape)}",
            loc=("input_shape" if len(spec.input_shape) != 1 else "input_dim",),
        )
    if not spec.layers:
        raise GraphError("a network needs at least one layer", loc=("layers",))
    for k, layer in enumerate(spec.layers):
        _check_layer(layer, k)
    if spec.dtype not in DTYPES:
        raise GraphError(f"dtype must be one of {', '.join(DTYPES)}", loc=("dtype",))
    if not (math.isfinite(spec.l2) and spec.l2 >= 0):
        raise ValueDomainError(f"l2 must be a finite number >= 0, got {spec.l2}", loc=("l2",))
    stages = layer_shapes(spec, 1)
    _check_loss(spec, stages[-1])
    if spec.weights is not None:
        if spec.init is not None:
            raise GraphError("give `weights` or `init`, not both", loc=("init",))
        _check_weights(spec.weights, stages)
    elif spec.init is not None and spec.init.scheme not in INIT_SCALES:
        known = ", ".join(INIT_SCALES)
        raise GraphError(
            f"unknown init scheme {spec.init.scheme!r}; known: {known}", loc=("init", "scheme")
        )
    if isinstance(spec.batch, RandomBatch):
        if spec.batch.size < 1:
            raise ShapeError("a batch needs at least one example", loc=("batch", "random", "size"))
    else:
        _check_batch(spec, spec.batch, stages[-1])
    return layer_shapes(spec)


def _check_layer(layer: Layer, k: int) -> None:
    loc: Loc = ("layers", k)
    for name in ("units", "filters"):
        if getattr(layer, name, 1) < 1:
            raise ShapeError(
                f"layer {k + 1} needs at least 1 {name[:-1]}, got {getattr(layer, name)}",
                loc=(*loc, name),
            )
    activation = getattr(layer, "activation", "linear")
    if activation not in ACTIVATION_OPS:
        known = ", ".join(ACTIVATION_OPS)
        raise GraphError(
            f"unknown activation {activation!r}; known: {known}", loc=(*loc, "activation")
        )
    if isinstance(layer, BatchNorm) and layer.mode not in BATCHNORM_MODES:
        raise GraphError(
            f"batchnorm mode must be one of {', '.join(BATCHNORM_MODES)}", loc=(*loc, "mode")
        )


def _check_loss(spec: NetworkSpec, last: Stage) -> None:
    if spec.loss not in LOSS_OPS:
        known = ", ".join(LOSS_OPS)
        raise GraphError(f"unknown loss {spec.loss!r}; known: {known}", loc=("loss",))
    scores = last.out
    where: Loc = ("layers", len(spec.layers) - 1)
    if spec.loss != "sum" and len(scores) != 2:
        raise ShapeError(
            f"the {spec.loss} loss takes scores (N, C): the last layer gives "
            f"{list(scores[1:])} per example; end with a dense layer or a flatten",
            loc=where,
        )
    if spec.loss == "softmax_cross_entropy" and scores[1] < 2:
        raise ShapeError(
            f"{spec.loss} needs at least 2 classes: the last layer has {scores[1]} unit",
            loc=(*where, "units"),
        )


def _check_weights(weights: Sequence[Mapping[str, Array]], stages: Sequence[Stage]) -> None:
    if len(weights) != len(stages):
        raise ShapeError(
            f"`weights` has {len(weights)} entries; the network has {len(stages)} layers "
            "(give {} for a layer without parameters)",
            loc=("weights",),
        )
    for k, (given, stage) in enumerate(zip(weights, stages, strict=True)):
        extra = sorted(set(given) - set(stage.params))
        if extra:
            raise ShapeError(
                f"layer {k + 1} ({stage.layer.type}) has no parameter {extra[0]!r}; it takes "
                f"{sorted(stage.params) or 'none'}",
                loc=("weights", k, extra[0]),
            )
        for name, shape in stage.params.items():
            if name not in given:
                raise ShapeError(
                    f"layer {k + 1} ({stage.layer.type}) needs {name} {list(shape[:])}",
                    loc=("weights", k, name),
                )
            got = given[name].shape
            if got != shape:
                raise ShapeError(
                    f"{name} of layer {k + 1} must be {list(shape)}, got {list(got)}",
                    loc=("weights", k, name),
                )


def _check_batch(spec: NetworkSpec, batch: Batch, last: Stage) -> None:
    x = batch.x
    if x.shape[1:] != spec.input_shape or x.shape[0] < 1:
        raise ShapeError(
            f"x must be (N, {', '.join(map(str, spec.input_shape))}) with N >= 1, got shape "
            f"{list(x.shape)}",
            loc=("batch", "x"),
        )
    n = x.shape[0]
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
    classes = last.out[1] if len(last.out) == 2 else 0
    if spec.loss in CLASS_LOSSES:
        _check_labels(y, classes, binary=spec.loss == "svm_hinge" and classes == 1)
    elif spec.loss in ("mse", "bce_with_logits"):
        # (N,) is accepted for a single output unit
        allowed = [(n, classes)] + ([(n,)] if classes == 1 else [])
        if y.shape not in allowed:
            shapes = " or ".join(str(list(shape)) for shape in allowed)
            raise ShapeError(
                f"{spec.loss} targets must be (N, units) = {shapes}, got {list(y.shape)}",
                loc=("batch", "y"),
            )
        if spec.loss == "bce_with_logits":
            _check_probabilities(y)


def _check_labels(y: Array, classes: int, *, binary: bool) -> None:
    if y.ndim != 1:
        raise ShapeError(
            f"class labels must be a flat list (N,), got shape {list(y.shape)}", loc=("batch", "y")
        )
    if binary:
        off = np.flatnonzero(~((y == 1) | (y == -1)))
        if off.size:
            row = int(off[0])
            raise ValueDomainError(
                f"label {float(y[row])!r} is not -1 or +1 (svm_hinge on one output unit is "
                "the binary hinge)",
                loc=("batch", "y", row),
            )
        return
    k = bad_class_label(y, classes)
    if k is not None:
        raise ValueDomainError(
            f"label {float(y[k])!r} is not an integer class in [0, {classes}) "
            f"(the last layer has {classes} units)",
            loc=("batch", "y", k),
        )


def _check_probabilities(y: Array) -> None:
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~((y >= 0) & (y <= 1)).reshape(-1))
    if bad.size:
        k = int(bad[0])
        raise ValueDomainError(
            f"target {float(y.reshape(-1)[k])!r} is not in [0, 1] (bce_with_logits)",
            loc=("batch", "y", *(int(j) for j in np.unravel_index(k, y.shape))),
        )


def check_network_limits(spec: NetworkSpec, limits: NetworkLimits) -> None:
    """The layer, unit and batch counts, off the definition."""
    checks: list[tuple[str, int, int, Loc]] = [
        ("max_layers", limits.max_layers, len(spec.layers), ("layers",)),
        ("max_units", limits.max_units, math.prod(spec.input_shape), ("input_dim",)),
    ]
    for k, layer in enumerate(spec.layers):
        for name in ("units", "filters"):
            if hasattr(layer, name):
                checks.append(("max_units", limits.max_units, getattr(layer, name),
                               ("layers", k, name)))  # fmt: skip
    batch_loc: Loc = (
        ("batch", "random", "size") if isinstance(spec.batch, RandomBatch) else ("batch", "x")
    )
    checks.append(("max_batch", limits.max_batch, spec.batch_size, batch_loc))
    for name, limit, amount, loc in checks:
        check_limits([(name, limit, amount, f"{'.'.join(map(str, loc))} is")], loc=loc)


def compile_network(
    spec: NetworkSpec, limits: NetworkLimits, *, gradients: bool, batch: int | None = None
) -> Program:
    """The network's program, compiled once on zero-stride placeholder leaves (no memory):
    the layer, unit and batch counts are checked off the definition first, then the
    compiler checks the element counts and FLOPs of the lowered graph, all before a weight
    or an example is drawn. `with_leaves` puts the real weights and batch in. X's gradient
    is left out unless the report returns every node's (`gradients`). `batch`: the number
    of examples the program takes (default: the spec's)."""
    check_network_limits(spec, limits)
    nodes, output = build_graph(spec, placeholder_leaves(spec, batch))
    return compile_graph(
        nodes,
        output,
        limits=limits.graph,
        dtype=np.dtype(spec.dtype),
        no_grad=frozenset() if gradients else frozenset({"X"}),
    )


def with_leaves(program: Program, leaves: Mapping[str, Array]) -> Program:
    """The program with these leaf values (by id) in place of its placeholders."""
    ids = program.node_ids()
    tensors = dict(program.tensors)
    for name, value in leaves.items():
        tensors[ids.index(name)] = value
    return dataclasses.replace(program, tensors=tensors)


# --- leaves: weights and batch, explicit or drawn ----------------------------------------


def leaf_shapes(spec: NetworkSpec, batch: int | None = None) -> dict[str, Shape]:
    """The shape of every leaf of the lowered graph (`y` only when the loss takes targets)."""
    stages = layer_shapes(spec, batch)
    n = stages[0].x[0]
    shapes: dict[str, Shape] = {"X": stages[0].x}
    for stage in stages:
        shapes.update({f"{stage.name}.{name}": shape for name, shape in stage.params.items()})
    scores = stages[-1].out
    if spec.loss in CLASS_LOSSES:
        shapes["y"] = (n,)
    elif spec.loss in ("mse", "bce_with_logits"):
        shapes["y"] = scores
    return shapes


def placeholder_leaves(spec: NetworkSpec, batch: int | None = None) -> dict[str, Array]:
    """Zeros of every leaf's shape as zero-stride views: any size, no memory."""
    zero = np.zeros((), np.dtype(spec.dtype))
    return {name: np.broadcast_to(zero, shape) for name, shape in leaf_shapes(spec, batch).items()}


def init_weights(
    spec: NetworkSpec, dtype: np.dtype[Any] | type = np.float64
) -> tuple[dict[str, Array], ...]:
    """W = N(0, 1) * scale(fan_in), drawn layer by layer from default_rng(seed); b = 0;
    batchnorm gamma = 1, beta = 0 (eval: running mean 0, variance 1). Drawn in float64
    whatever the dtype, so float32 runs start from the same weights; each W is cast to
    `dtype` as soon as it is drawn, so at most one float64 W is alive."""
    init = spec.init or Init()
    scale_of = INIT_SCALES[init.scheme]
    rng = np.random.default_rng(init.seed)
    weights = []
    for stage in layer_shapes(spec, 1):
        drawn: dict[str, Array] = {}
        for name, shape in stage.params.items():
            if name == "W":
                scale = scale_of(stage.layer.fan_in(stage.x))
                drawn[name] = _normal(shape, scale, rng).astype(dtype, copy=False)
            else:  # b, beta, running_mean: 0; gamma, running_var: 1
                fill = 1.0 if name in ("gamma", "running_var") else 0.0
                drawn[name] = np.full(shape, fill, dtype)
        weights.append(drawn)
    return tuple(weights)


def _normal(shape: Shape, scale: float, rng: np.random.Generator) -> Array:
    """N(0, 1) * scale in float64, scaled in place (no second array of W's size)."""
    if not scale:  # `zeros` draws nothing: 0 * N(0, 1) would leave -0.0 in the report
        return np.zeros(shape)
    drawn = rng.standard_normal(shape)
    drawn *= scale
    return drawn


def random_batch(spec: NetworkSpec, batch: RandomBatch) -> Batch:
    """x ~ N(0, 1) (N, *input_shape), then the labels or targets, from default_rng(seed)."""
    rng = np.random.default_rng(batch.seed)
    x = rng.standard_normal((batch.size, *spec.input_shape))
    scores = layer_shapes(spec, batch.size)[-1].out
    classes = scores[1] if len(scores) == 2 else 1
    y: Array | None = None
    if spec.loss == "svm_hinge" and classes == 1:
        y = rng.choice([-1.0, 1.0], size=batch.size)
    elif spec.loss in CLASS_LOSSES:
        y = rng.integers(0, classes, size=batch.size).astype(np.float64)
    elif spec.loss == "mse":
        y = rng.standard_normal(scores)
    elif spec.loss == "bce_with_logits":
        y = rng.random(scores)
    return Batch(x, y)


def leaf_values(spec: NetworkSpec) -> dict[str, Array]:
    """Every leaf's value in the network's dtype: the explicit weights and batch, or drawn
    ones. Cast here, so the compiler copies nothing and no float64 twin outlives this."""
    dtype = np.dtype(spec.dtype)
    weights = spec.weights if spec.weights is not None else init_weights(spec, dtype)
    batch = spec.batch if isinstance(spec.batch, Batch) else random_batch(spec, spec.batch)
    values: dict[str, Array] = {"X": np.asarray(batch.x, dtype)}
    for i, params in enumerate(weights, start=1):
        values.update({f"layer{i}.{name}": np.asarray(v, dtype) for name, v in params.items()})
    shapes = leaf_shapes(spec)
    if "y" in shapes:
        assert batch.y is not None  # check_network: every loss with targets has y
        values["y"] = np.asarray(batch.y, dtype).reshape(shapes["y"])  # (N,) -> (N, 1)
    return values


# --- lowering ----------------------------------------------------------------------------


def lower(spec: NetworkSpec) -> tuple[list[NodeSpec], str]:
    """The network as engine nodes with its real leaves (drawn or given), and the id of its
    output (`loss`). The service compiles on placeholders instead (`compile_network`)."""
    return build_graph(spec, leaf_values(spec))


def build_graph(spec: NetworkSpec, leaves: Mapping[str, Array]) -> tuple[list[NodeSpec], str]:
    stages = layer_shapes(spec, leaves["X"].shape[0])
    x_loc: Loc = ("batch", "random") if isinstance(spec.batch, RandomBatch) else ("batch", "x")
    nodes = [NodeSpec("X", "input", value=leaves["X"], loc=x_loc)]
    prev = "X"
    for stage in stages:
        nodes += _layer_nodes(spec, stage, prev, leaves)
        prev = f"{stage.name}.a"
    if "y" in leaves:
        nodes.append(NodeSpec("y", "const", value=leaves["y"], loc=("batch", "y")))
    data_loss = "data_loss" if spec.l2 else "loss"
    targets = ("y",) if "y" in leaves else ()
    nodes.append(NodeSpec(data_loss, LOSS_OPS[spec.loss], (prev, *targets), loc=("loss",)))
    if spec.l2:
        nodes += _l2_nodes(spec, stages)
        nodes.append(NodeSpec("loss", "add", ("data_loss", "l2"), loc=("l2",)))
    return nodes, "loss"


def _layer_nodes(
    spec: NetworkSpec, stage: Stage, prev: str, leaves: Mapping[str, Array]
) -> list[NodeSpec]:
    """The layer's parameters (params; batchnorm's running statistics: consts), then its
    ops, each located at the layer (a parameter at its weights entry or `init`)."""
    k, name, layer = stage.index - 1, stage.name, stage.layer
    weights_loc: Loc = ("weights", k) if spec.weights is not None else ("init",)
    consts = layer.consts()
    nodes = [
        NodeSpec(
            f"{name}.{param}",
            "const" if param in consts else "param",
            value=leaves[f"{name}.{param}"],
            loc=(*weights_loc, param),
        )
        for param in stage.params
    ]
    for node in layer.ops(name, prev, stage.x):
        nodes.append(dataclasses.replace(node, loc=("layers", k)))
    return nodes


def _l2_nodes(spec: NetworkSpec, stages: Sequence[Stage]) -> list[NodeSpec]:
    """l2 = 0.5 * l2 * the sum over layers of sum(W^2) (and sum(b^2) with `l2_biases`)."""
    loc: Loc = ("l2",)
    penalised = ("W", "b") if spec.l2_biases else ("W",)
    nodes: list[NodeSpec] = []
    running = ""
    for stage in stages:
        for param in penalised:
            if param not in stage.params:
                continue
            leaf = f"{stage.name}.{param}"
            nodes.append(NodeSpec(f"{leaf}_squared", "square", (leaf,), loc=loc))
            nodes.append(NodeSpec(f"{leaf}_sq_sum", "sum", (f"{leaf}_squared",), loc=loc))
            if running:  # l2.sum{i}: the squares so far
                total = f"l2.sum{stage.index}" if param == "W" else f"l2.sum{stage.index}b"
                nodes.append(NodeSpec(total, "add", (running, f"{leaf}_sq_sum"), loc=loc))
                running = total
            else:
                running = f"{leaf}_sq_sum"
    if not running:  # nothing to penalise (no weights at all): a zero penalty
        nodes.append(NodeSpec("l2.none", "const", value=np.zeros(()), loc=loc))
        running = "l2.none"
    coef = np.asarray(0.5 * spec.l2)
    nodes.append(NodeSpec("l2.coef", "const", value=coef, loc=loc))
    nodes.append(NodeSpec("l2", "mul", ("l2.coef", running), loc=loc))
    return nodes


# --- diagnostics: read off the one forward/backward pass ---------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    """CS231n's counts: neurons = dense units + conv filters; weights = the elements of every
    W; biases = of every b; batchnorm = gamma and beta."""

    neurons: int
    weights: int
    biases: int
    batchnorm: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.biases + self.batchnorm


def parameter_counts(spec: NetworkSpec) -> ParameterCounts:
    counts = {"W": 0, "b": 0, "gamma": 0, "beta": 0}
    neurons = 0
    for stage in layer_shapes(spec, 1):
        if isinstance(stage.layer, Dense | Conv2d):
            neurons += stage.out[1]  # units or filters
        for name in counts:
            if name in stage.params:
                counts[name] += math.prod(stage.params[name])
    return ParameterCounts(neurons, counts["W"], counts["b"], counts["gamma"] + counts["beta"])


@dataclass
class LayerDiagnostics:
    """One layer's health: its activation read as units (`reading`: dead or saturated units
    and activations), per-channel active fractions of an image layer, activation
    statistics, and the norms of its weights and gradients (None where it has none)."""

    stage: Stage
    reading: Reading | None  # layers with an activation
    channel_active_fraction: list[float] | None  # image layers: per channel, z > 0
    activation_mean: float
    activation_std: float
    weight_norm: float | None
    grad_norms: dict[str, float]  # W, b, gamma, beta, z (those it has)
    status: str = "ok"

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def units(self) -> int:
        """Units, filters or channels: the layer's output along axis 1."""
        return self.stage.out[1] if len(self.stage.out) > 1 else 1

    @property
    def dead_unit_indices(self) -> list[int]:
        return self._flagged("dies", "leaks")

    @property
    def saturated_unit_indices(self) -> list[int]:
        return self._flagged("saturates")

    def _flagged(self, *gates: str) -> list[int]:
        if self.reading is None or OPS[self.reading.op].gate not in gates:
            return []
        return self.reading.flagged_units

    @property
    def update_ratio(self) -> float | None:
        """||dW|| / ||W||: how far one unit-learning-rate step moves W, relative to W
        (multiply by the learning rate for CS231n's ~1e-3 rule of thumb). None when W is 0."""
        grad = self.grad_norms.get("W")
        if not self.weight_norm or grad is None:
            return None
        with np.errstate(all="ignore"):
            return float(np.float64(grad) / np.float64(self.weight_norm))


@dataclass
class NetworkDiagnostics:
    name: str
    loss: float
    data_loss: float
    l2_loss: float
    parameters: ParameterCounts
    layers: list[LayerDiagnostics]
    gradient_ratio: float | None  # ||dW first weighted layer|| / ||dW last||
    signal_ratio: float | None  # ||dz first|| / ||dz last||
    nonfinite_nodes: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        return worst_status(self.findings)


def network_diagnostics(
    result: Result, spec: NetworkSpec, thresholds: Thresholds
) -> NetworkDiagnostics:
    program = result.program
    ids = program.node_ids()
    index = {node: i for i, node in enumerate(ids)}
    stats = _TensorStats()
    stages = layer_shapes(spec, result.value(index["X"]).shape[0])
    layers = [_layer_diagnostics(result, index, stage, thresholds, stats) for stage in stages]
    bad = np.array(
        [
            i
            for i in range(len(ids))
            if not (stats.finite(result.value(i)) and stats.finite(result.grad(i)))
        ],
        np.intp,
    )
    weighted = [layer for layer in layers if "W" in layer.grad_norms]
    ratio = first_to_last(weighted, "W")
    signal = first_to_last(weighted, "z")
    findings: list[Finding] = []
    if bad.size:
        findings.append(nonfinite_finding(result, bad, lambda i: _layer_of(ids[i])))
    for layer in layers:
        findings += _layer_findings(layer, thresholds, finite=not bad.size)
    finding = _vanishing_finding(weighted, ratio, signal, thresholds.vanishing_ratio)
    if finding:
        findings.append(finding)
    findings = cap_findings(findings)
    for layer in layers:
        layer.status = worst_status(f for f in findings if f.location == layer.name)
    loss = float(result.value(index["loss"]))
    data_loss = float(result.value(index["data_loss"])) if spec.l2 else loss
    return NetworkDiagnostics(
        name=spec.name,
        loss=loss,
        data_loss=data_loss,
        l2_loss=float(result.value(index["l2"])) if spec.l2 else 0.0,
        parameters=parameter_counts(spec),
        layers=layers,
        gradient_ratio=ratio,
        signal_ratio=signal,
        nonfinite_nodes=[ids[i] for i in bad.tolist()],
        findings=findings,
    )


def _layer_of(node: str) -> str:
    """A node's finding location: its layer (`layer3.z` -> `layer3`), else the node."""
    return node.split(".")[0] if node.startswith("layer") else node


def _layer_diagnostics(
    result: Result,
    index: Mapping[str, int],
    stage: Stage,
    thresholds: Thresholds,
    stats: _TensorStats,
) -> LayerDiagnostics:
    name, layer = stage.name, stage.layer

    def value(part: str) -> Array:
        return result.value(index[f"{name}.{part}"])

    def grad_norm(part: str) -> float:
        grad = result.grad(index[f"{name}.{part}"])
        assert grad is not None  # params and op nodes get a gradient
        return stats.norm(grad)

    a = value("a")
    reading = None
    channels = None
    with np.errstate(all="ignore"):  # huge or non-finite activations: inf/nan, not a crash
        if f"{name}.z" in index:
            z = value("z")
            op = OPS[ACTIVATION_OPS[getattr(layer, "activation", "linear")]]
            if op.gate is not None:
                reading = read_activation(op, z, a, thresholds.saturation_eps, 0)
            if z.ndim > 2:
                channels = _channel_active_fraction(z, reading, stats.finite(z))
        mean, std = mean_std(a)
        if math.isfinite(mean):  # a float64 sum of a is non-finite when any element is
            stats.known_finite(a)
        norms = {part: grad_norm(part) for part in stage.params if part not in layer.consts()}
        if f"{name}.z" in index:
            norms["z"] = grad_norm("z")
        weight_norm = stats.norm(value("W")) if "W" in stage.params else None
    return LayerDiagnostics(stage, reading, channels, mean, std, weight_norm, norms)


def _channel_active_fraction(z: Array, reading: Reading | None, finite: bool) -> list[float]:
    """Per channel (axis 1), the fraction of its (n, h, w) positions with z > 0. A relu's
    reading has counted the positions with z <= 0 already; with no NaN those are the rest."""
    axes = tuple(k for k in range(z.ndim) if k != 1)
    positions = z.size // max(1, z.shape[1])
    counted = reading is not None and OPS[reading.op].gate in ("dies", "leaks")
    if finite and counted and reading is not None and reading.per_unit is not None:
        active = positions - reading.per_unit
    else:
        active = count_per_unit(z > 0, axes)
    fractions: list[float] = (active / max(1, positions)).tolist()
    return fractions


class _TensorStats:
    """Each tensor read once for the diagnostics: its sum of squares gives its norm and,
    being NaN or inf whenever an element is, its finiteness too. Keyed by id: the result
    keeps every array alive while the report is read."""

    def __init__(self) -> None:
        self._sum_of_squares: dict[int, float] = {}
        self._finite: dict[int, bool] = {}

    def norm(self, x: Array) -> float:
        """The 2-norm, exact for finite data (`norm_of_sum_of_squares`)."""
        total = self._sum_of_squares.get(id(x))
        if total is None:
            total = self._sum_of_squares[id(x)] = sum_of_squares(x)
            if math.isfinite(total):
                self._finite[id(x)] = True
        return norm_of_sum_of_squares(total, x)

    def known_finite(self, x: Array) -> None:
        self._finite[id(x)] = True

    def finite(self, x: Array | None) -> bool:
        if x is None:
            return True
        known = self._finite.get(id(x))
        if known is None:
            known = self._finite[id(x)] = is_finite(x)
        return known


def _layer_findings(layer: LayerDiagnostics, t: Thresholds, *, finite: bool) -> list[Finding]:
    findings = []
    if layer.reading is not None:
        findings += unit_findings(layer.reading, layer.name, layer.name, t)
    grad_w = layer.grad_norms.get("W")
    if finite and grad_w is not None and grad_w > t.exploding_norm:
        message = (
            f"||dW|| of {layer.name} is {grad_w:.3g}, above {t.exploding_norm:g}: the gradient "
            "explodes; lower the learning rate, clip gradients, or scale the weights and "
            "inputs down (He/Xavier init)."
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
    ||dW|| stay level; ||dz|| (the signal backprop carries into each layer) still shows it.
    The advice fits the network: saturating activations are named only where it has them."""
    ratios = [
        (r, what) for r, what in ((weight_ratio, "dW"), (signal_ratio, "dz")) if r is not None
    ]
    below = [(r, what) for r, what in ratios if r < threshold]
    if not below:
        return None
    ratio, what = min(below)
    saturating = sorted(
        {
            lay.reading.op
            for lay in layers
            if lay.reading and OPS[lay.reading.op].gate == "saturates"
        }
    )
    advice = "use He/Xavier init instead of small weights"
    if saturating:
        advice += f", and relu instead of saturating {' and '.join(saturating)}"
    else:
        advice += ", or normalise the layers' inputs (batchnorm)"
    first, last = layers[0].name, layers[-1].name
    message = (
        f"||{what}|| of {first} is {ratio:.2g} times that of {last} (below {threshold:g}): "
        f"the gradient vanishes on its way back; {advice}."
    )
    return Finding("vanishing_gradient", "warn", first, message)


__all__ = [
    "ACTIVATION_OPS",
    "INIT_SCALES",
    "LOSS_OPS",
    "Batch",
    "BatchNorm",
    "Conv2d",
    "Dense",
    "EngineError",
    "Flatten",
    "Init",
    "Layer",
    "LayerDiagnostics",
    "NetworkDiagnostics",
    "NetworkLimits",
    "NetworkSpec",
    "ParameterCounts",
    "Pool",
    "RandomBatch",
    "check_network",
    "compile_network",
    "layer_shapes",
    "lower",
    "network_diagnostics",
    "parameter_counts",
    "with_leaves",
]
