"""Seeded NumPy builders of the whole models that tests/fixtures/oracle/ records PyTorch on.

Pure NumPy: no torch, no gradiag. `make oracle` (bench/oracle/cnn.py, micrograd_demo.py,
training.py, onnx_models.py) builds each model here, hands it to PyTorch and stores only
what PyTorch answered; a test builds the same model again, posts `network_body(model)` to
gradiag and compares. Every draw comes from `numpy.random.default_rng`, whose streams are
the same on every machine, so the weights and batches are never stored in a fixture (each
fixture keeps a checksum of them instead: `checksums(model)`).

Conventions (tests/fixtures/oracle/README.md says the same):

- Layer i (1-based) counts every entry of `layers`, pooling and flatten included; its
  parameters are `layer{i}.W`, `layer{i}.b`, `layer{i}.gamma`, `layer{i}.beta`.
- Layouts are gradiag's: dense W (fan_in, units) = torch `Linear.weight.T`; conv W
  (F, C, kh, kw) as torch; batchnorm `gamma`, `beta` and, in eval mode, `running_mean`,
  `running_var`; `{}` for a layer without parameters. A dense layer after a conv stack
  flattens implicitly in (C, H, W) order, as torch.flatten does.
- conv -> batchnorm -> relu is a conv layer with `"activation": "linear"` followed by a
  batchnorm layer with `"activation": "relu"`.
- The whole models (`lenet`, `cifar`, `dead_filters`, `mlp784`, `reshape_net`) draw their
  weights from `default_rng(seed)`, layer by layer in order: conv/dense W ~ N(0, 1) *
  sqrt(2 / fan_in) (He; fan_in = C*kh*kw for a conv), then b ~ 0.1 * N(0, 1); batchnorm
  gamma = 1 + 0.1 * N(0, 1), beta = 0.1 * N(0, 1), running_mean = 0.2 * N(0, 1), running_var
  ~ U(0.5, 2.5) (drawn in both modes, so the train and eval CIFAR nets share their weights).
  Their batch comes from `default_rng(seed + BATCH_STREAM)`: x ~ N(0, 1), then labels
  uniform in [0, classes).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

Array = np.ndarray[Any, np.dtype[Any]]
Layer = dict[str, Any]
Params = dict[str, Array]

# The batch of a model with weight seed s is drawn from default_rng(s + BATCH_STREAM), so that
# no model's batch shares a stream with another model's weights.
BATCH_STREAM = 10_000
# The training set-ups (deliverable 4): the net and its dataset.
TRAIN_DIMS = (64, 100, 100, 10)
TRAIN_EXACT = {"examples": 256, "batch_size": 64, "steps": 20, "lr": 0.1, "l2": 1e-3}
TRAIN_EXACT_SEEDS = {"init": 0, "data": 1, "train": 2}
SWEEP = {"examples": 512, "batch_size": 64, "steps": 200}
SWEEP_LRS = (0.1, 0.5, 1.0, 2.0)
SWEEP_SEEDS = (0, 1, 2, 3, 4)
SWEEP_DATA_STREAM = 1_000  # sweep seed s: data from default_rng(1000 + s), init and order s
# micrograd's demo: 1e-4 * sum(p^2) over every parameter = gradiag's 0.5 * l2 * sum, l2 = 2e-4
MICROGRAD_ALPHA = 1e-4
MICROGRAD_SEED = 5  # weights: default_rng(5); moons: default_rng(5 + BATCH_STREAM)


@dataclass(frozen=True)
class OracleModel:
    """One model and its batch, in gradiag's wire form and layouts.

    `input_shape` is `(input_dim,)` for a dense network, `(C, H, W)` for an image one (then
    `x` is (N, C, H, W)); `weights` has one dict per entry of `layers`; `y` holds integer
    class labels, or targets in {-1, +1} for the binary hinge."""

    name: str
    seed: int
    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    weights: tuple[Params, ...]
    x: Array
    y: Array
    loss: str = "softmax_cross_entropy"
    l2: float = 0.0
    l2_biases: bool = False
    train: dict[str, Any] | None = None
    init_seed: int | None = None  # He weights drawn as gradiag's `init` does with this seed

    def params(self) -> dict[str, Array]:
        """Every parameter under gradiag's name `layer{i}.<key>` (running stats included)."""
        return {f"layer{i}.{k}": v for i, w in enumerate(self.weights, 1) for k, v in w.items()}


# --- layers in wire form -----------------------------------------------------------------


def conv(filters: int, kernel: int, activation: str = "relu", padding: int = 0) -> Layer:
    return {
        "type": "conv2d",
        "filters": filters,
        "kernel": kernel,
        "stride": 1,
        "padding": padding,
        "activation": activation,
    }


def pool(kind: str, kernel: int = 2) -> Layer:
    return {"type": f"{kind}pool2d", "kernel": kernel, "stride": kernel}


def dense(units: int, activation: str = "relu", typed: bool = True) -> Layer:
    """A dense layer; `typed=False` leaves out `"type"` (the revision 1 form)."""
    layer: Layer = {"units": units, "activation": activation}
    return {"type": "dense", **layer} if typed else layer


def batchnorm(mode: str, activation: str = "relu") -> Layer:
    return {"type": "batchnorm", "mode": mode, "activation": activation}


def shapes(input_shape: tuple[int, ...], layers: tuple[Layer, ...]) -> list[tuple[int, ...]]:
    """The output shape (without the batch axis) of every layer, in order."""
    out, shape = [], input_shape
    for layer in layers:
        kind = layer.get("type", "dense")
        if kind == "conv2d":
            k, p = layer["kernel"], layer["padding"]
            shape = (layer["filters"], shape[1] + 2 * p - k + 1, shape[2] + 2 * p - k + 1)
        elif kind in ("maxpool2d", "avgpool2d"):
            k = layer["kernel"]
            shape = (shape[0], shape[1] // k, shape[2] // k)
        elif kind in ("dense", "flatten"):
            shape = (layer["units"],) if kind == "dense" else (math.prod(shape),)
        out.append(shape)
    return out


# --- weights -----------------------------------------------------------------------------


def draw_weights(
    rng: np.random.Generator, input_shape: tuple[int, ...], layers: tuple[Layer, ...]
) -> tuple[Params, ...]:
    """He W and 0.1 * N(0, 1) biases, batchnorm parameters and running stats, layer by layer
    (the module docstring gives the order of the draws)."""
    weights: list[Params] = []
    prev = input_shape
    for layer, shape in zip(layers, shapes(input_shape, layers), strict=True):
        kind = layer.get("type", "dense")
        if kind == "conv2d":
            k = layer["kernel"]
            fan_in = prev[0] * k * k
            W = rng.standard_normal((layer["filters"], prev[0], k, k)) * math.sqrt(2 / fan_in)
            weights.append({"W": W, "b": 0.1 * rng.standard_normal(layer["filters"])})
        elif kind == "dense":
            fan_in = math.prod(prev)
            W = rng.standard_normal((fan_in, layer["units"])) * math.sqrt(2 / fan_in)
            weights.append({"W": W, "b": 0.1 * rng.standard_normal(layer["units"])})
        elif kind == "batchnorm":
            weights.append(_batchnorm_params(rng, prev[0], layer["mode"]))
        else:
            weights.append({})
        prev = shape
    return tuple(weights)


def _batchnorm_params(rng: np.random.Generator, channels: int, mode: str) -> Params:
    params = {
        "gamma": 1 + 0.1 * rng.standard_normal(channels),
        "beta": 0.1 * rng.standard_normal(channels),
        "running_mean": 0.2 * rng.standard_normal(channels),
        "running_var": rng.uniform(0.5, 2.5, channels),
    }
    if mode == "train":  # drawn all the same, so that both modes share every other weight
        del params["running_mean"], params["running_var"]
    return params


def class_batch(
    seed: int, size: int, input_shape: tuple[int, ...], classes: int, pixels: bool = False
) -> tuple[Array, Array]:
    """From default_rng(seed + BATCH_STREAM): x of shape (size, *input_shape), N(0, 1) (or
    U[0, 1) with `pixels`), then labels uniform in [0, classes)."""
    rng = np.random.default_rng(seed + BATCH_STREAM)
    shape = (size, *input_shape)
    x = rng.random(shape) if pixels else rng.standard_normal(shape)
    return x, rng.integers(0, classes, size)


def _whole_model(
    name: str,
    seed: int,
    input_shape: tuple[int, ...],
    layers: tuple[Layer, ...],
    batch: int,
    pixels: bool = False,
) -> OracleModel:
    weights = draw_weights(np.random.default_rng(seed), input_shape, layers)
    classes = shapes(input_shape, layers)[-1][0]
    x, y = class_batch(seed, batch, input_shape, classes, pixels)
    return OracleModel(name, seed, input_shape, layers, weights, x, y)


# --- the conv networks (bench/oracle/cnn.py) ---------------------------------------------


def lenet(seed: int = 0, batch: int = 32) -> OracleModel:
    """1x28x28 -> conv 6@5x5 relu -> maxpool 2 -> conv 16@5x5 relu -> maxpool 2 -> dense 120
    relu -> dense 84 relu -> dense 10 linear; softmax cross-entropy."""
    layers = (
        conv(6, 5),
        pool("max"),
        conv(16, 5),
        pool("max"),
        dense(120),
        dense(84),
        dense(10, "linear"),
    )
    return _whole_model("lenet", seed, (1, 28, 28), layers, batch)


def cifar(mode: str = "train", seed: int = 1, batch: int = 32) -> OracleModel:
    """3x32x32 -> conv 16@3x3 pad 1 (linear) -> batchnorm (relu) -> maxpool 2 -> conv 32@3x3
    pad 1 (linear) -> batchnorm (relu) -> avgpool 2 -> dense 10 linear; batchnorm in `mode`
    ("train": batch statistics; "eval": the drawn running stats)."""
    layers = (
        conv(16, 3, "linear", padding=1),
        batchnorm(mode),
        pool("max"),
        conv(32, 3, "linear", padding=1),
        batchnorm(mode),
        pool("avg"),
        dense(10, "linear"),
    )
    return _whole_model(f"cifar_{mode}", seed, (3, 32, 32), layers, batch)


DEAD_FILTERS = (2, 5, 9, 14)  # the filters whose bias dead_filters sets to -5


def dead_filters(seed: int = 2, batch: int = 16) -> OracleModel:
    """3x12x12 pixels in U[0, 1) -> conv 16@3x3 pad 1 relu -> dense 10 linear, He weights and
    zero conv biases, except the filters DEAD_FILTERS' biases, set to -5: those filters never
    fire on this batch, and no other filter is dead. (On N(0, 1) inputs a -5 bias is not
    enough: a filter of norm 1.4 reaches 5 within a few thousand positions.)"""
    layers = (conv(16, 3, padding=1), dense(10, "linear"))
    model = _whole_model("dead_filters", seed, (3, 12, 12), layers, batch, pixels=True)
    b = np.zeros(16)
    b[list(DEAD_FILTERS)] = -5.0
    first = {"W": model.weights[0]["W"], "b": b}
    return replace(model, weights=(first, *model.weights[1:]))


CNN_MODELS: dict[str, Callable[[], OracleModel]] = {
    "lenet": lenet,
    "cifar_train": lambda: cifar("train"),
    "cifar_eval": lambda: cifar("eval"),
    "dead_filters": dead_filters,
}


# --- models exported to ONNX (bench/oracle/onnx_models.py) -------------------------------


def mlp784(seed: int = 3, batch: int = 16) -> OracleModel:
    """784-256-128-10, relu, relu, linear; softmax cross-entropy."""
    layers = (dense(256), dense(128), dense(10, "linear"))
    return _whole_model("mlp", seed, (784,), layers, batch)


def reshape_net(seed: int = 4, batch: int = 16) -> OracleModel:
    """LeNet-5's trunk on 1x32x32 (conv 6@5x5 relu, maxpool 2, conv 16@5x5 relu, maxpool 2),
    then dense 10 linear; its torch module flattens with x.reshape(-1, 16 * 5 * 5), which the
    exporters write as a Reshape with a constant shape."""
    layers = (conv(6, 5), pool("max"), conv(16, 5), pool("max"), dense(10, "linear"))
    return _whole_model("reshape", seed, (1, 32, 32), layers, batch)


def lstm_batch(seed: int = 6, size: int = 4) -> Array:
    """The LSTM model's input (size, 5 steps, 8 features), x ~ N(0, 1); the model is refused."""
    return np.random.default_rng(seed + BATCH_STREAM).standard_normal((size, 5, 8))


# Each ONNX fixture's model and batch: the builder the torch module was made from.
ONNX_MODELS: dict[str, Callable[[], OracleModel]] = {
    "mlp": mlp784,
    "lenet": lenet,
    "cifar_folded": lambda: cifar("eval"),
    "cifar_kept_eval": lambda: cifar("eval"),
    "cifar_kept_train": lambda: cifar("eval"),
    "reshape": reshape_net,
}


# --- micrograd's demo (bench/oracle/micrograd_demo.py) -----------------------------------


def make_moons(n_samples: int = 100, noise: float = 0.1, seed: int = 0) -> tuple[Array, Array]:
    """sklearn's make_moons (two interleaving half circles, shuffled, + N(0, noise) noise) on
    default_rng(seed): the permutation is drawn first, then the noise; labels in {-1, +1}."""
    rng = np.random.default_rng(seed)
    n_out, n_in = n_samples // 2, n_samples - n_samples // 2
    t_out, t_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    x = np.concatenate([np.cos(t_out), 1 - np.cos(t_in)])
    y = np.concatenate([np.sin(t_out), 1 - np.sin(t_in) - 0.5])
    X = np.stack([x, y], axis=1)
    labels = np.concatenate([np.zeros(n_out), np.ones(n_in)])
    perm = rng.permutation(n_samples)
    X, labels = X[perm], labels[perm]
    X = X + rng.normal(scale=noise, size=X.shape)
    return X, 2.0 * labels - 1.0


def micrograd_moons(seed: int = MICROGRAD_SEED) -> OracleModel:
    """micrograd's demo: MLP 2-16-16-1 (relu, relu, linear) on make_moons(100, 0.1).

    Every W and every b is drawn U(-1, 1) from default_rng(seed), layer by layer, W then b
    (micrograd's Neuron draws its w that way; its b starts at 0, but drawn biases make the
    L2 term on biases count). The loss is the binary hinge mean(max(0, 1 - y*s)) plus
    1e-4 * sum(p^2) over every parameter: gradiag's svm_hinge on one unit with l2 = 2e-4 and
    l2_biases (0.5 * l2 * sum)."""
    rng = np.random.default_rng(seed)
    layers = (dense(16, typed=False), dense(16, typed=False), dense(1, "linear", typed=False))
    weights, fan_in = [], 2
    for layer in layers:
        W = rng.uniform(-1, 1, (fan_in, layer["units"]))
        weights.append({"W": W, "b": rng.uniform(-1, 1, layer["units"])})
        fan_in = layer["units"]
    x, y = make_moons(100, 0.1, seed + BATCH_STREAM)
    return OracleModel(
        "micrograd_moons",
        seed,
        (2,),
        layers,
        tuple(weights),
        x,
        y,
        loss="svm_hinge",
        l2=2 * MICROGRAD_ALPHA,
        l2_biases=True,
    )


# --- training what-if (bench/oracle/training.py) -----------------------------------------


def he_init(seed: int, dims: tuple[int, ...] = TRAIN_DIMS) -> tuple[Params, ...]:
    """gradiag's `init_weights` with {"scheme": "he", "seed": seed}: one default_rng(seed),
    per layer W = standard_normal((fan_in, units)) * sqrt(2 / fan_in), b = 0."""
    rng = np.random.default_rng(seed)
    return tuple(
        {"W": rng.standard_normal((m, n)) * math.sqrt(2.0 / m), "b": np.zeros(n)}
        for m, n in itertools.pairwise(dims)
    )


def uniform_dataset(
    seed: int, examples: int, dims: tuple[int, ...] = TRAIN_DIMS
) -> tuple[Array, Array]:
    """x ~ U[0, 1) (examples, dims[0]) from default_rng(seed), then labels uniform."""
    rng = np.random.default_rng(seed)
    x = rng.random((examples, dims[0]))
    return x, rng.integers(0, dims[-1], examples)


def minibatches(train_seed: int, examples: int, batch_size: int, steps: int) -> list[Array]:
    """The example indices of each step: order_rng = default_rng(train_seed); each epoch
    perm = order_rng.permutation(examples), cut into consecutive slices of batch_size (a final
    partial slice is used as it is); steps run on across epochs."""
    order_rng = np.random.default_rng(train_seed)
    out: list[Array] = []
    while len(out) < steps:
        perm = order_rng.permutation(examples)
        out.extend(perm[i : i + batch_size] for i in range(0, examples, batch_size))
    return out[:steps]


def _train_model(
    name: str, init_seed: int, data: tuple[Array, Array], train: dict[str, Any], l2: float
) -> OracleModel:
    layers = tuple(
        dense(n, "relu" if i < 3 else "linear", typed=False)
        for i, n in enumerate(TRAIN_DIMS[1:], 1)
    )
    x, y = data
    return OracleModel(
        name,
        init_seed,
        (TRAIN_DIMS[0],),
        layers,
        he_init(init_seed),
        x,
        y,
        l2=l2,
        train=train,
        init_seed=init_seed,
    )


def training_exact(momentum: float) -> OracleModel:
    """Deliverable 4(a): 64-100-100-10 relu, He init seed 0, 256 examples U[0, 1) from
    default_rng(1), 20 steps of SGD (lr 0.1, `momentum`, l2 1e-3 on weights), batch 64, order
    from train seed 2."""
    cfg, seeds = TRAIN_EXACT, TRAIN_EXACT_SEEDS
    train = {
        "optimizer": "sgd",
        "lr": cfg["lr"],
        "momentum": momentum,
        "steps": cfg["steps"],
        "batch_size": cfg["batch_size"],
        "seed": seeds["train"],
        "record_every": 1,
    }
    data = uniform_dataset(seeds["data"], int(cfg["examples"]))
    return _train_model(f"exact_m{momentum:g}", seeds["init"], data, train, float(cfg["l2"]))


def training_sweep(lr: float, seed: int) -> OracleModel:
    """Deliverable 4(b): one (lr, seed) run: data x ~ U[0, 1) (512, 64) and labels from
    default_rng(1000 + seed); He init seed `seed`; minibatch order train seed `seed`; 200
    steps of plain SGD (momentum 0, no L2), batch 64."""
    train = {
        "optimizer": "sgd",
        "lr": lr,
        "momentum": 0.0,
        "steps": SWEEP["steps"],
        "batch_size": SWEEP["batch_size"],
        "seed": seed,
        "record_every": 1,
    }
    data = uniform_dataset(SWEEP_DATA_STREAM + seed, SWEEP["examples"])
    return _train_model(f"sweep_lr{lr:g}_s{seed}", seed, data, train, 0.0)


def sweep_body(seed: int) -> dict[str, Any]:
    """The sweep of one seed as one request: `"lr"` the list SWEEP_LRS (the contract's
    learning-rate sweep, one run per rate from the same start)."""
    body = network_body(training_sweep(SWEEP_LRS[0], seed))
    body["train"]["lr"] = list(SWEEP_LRS)
    return body


# --- request bodies ----------------------------------------------------------------------


def network_body(
    model: OracleModel, *, explicit_weights: bool = True, include: tuple[str, ...] = ("gradients",)
) -> dict[str, Any]:
    """The complete /v1/network request for `model` (contract revision 2): every tensor a
    nested list, the weights explicit (or, with `explicit_weights=False` for a He-drawn
    training model, `"init": {"scheme": "he", "seed": ...}`, which draws the same ones)."""
    body: dict[str, Any] = {}
    if len(model.input_shape) == 1:
        body["input_dim"] = model.input_shape[0]
    else:
        body["input_shape"] = list(model.input_shape)
    body["layers"] = [dict(layer) for layer in model.layers]
    body["loss"] = model.loss
    if explicit_weights or model.init_seed is None:
        body["weights"] = [{k: v.tolist() for k, v in w.items()} for w in model.weights]
    else:
        body["init"] = {"scheme": "he", "seed": model.init_seed}
    if model.loss == "svm_hinge" and model.layers[-1]["units"] == 1:
        y: list[Any] = [float(v) for v in model.y]  # binary targets in {-1, +1}
    else:
        y = [int(v) for v in model.y]  # class labels
    body["batch"] = {"x": model.x.tolist(), "y": y}
    if model.l2:
        body["l2"] = model.l2
    if model.l2_biases:
        body["l2_biases"] = True
    if model.train is not None:
        body["train"] = dict(model.train)
    body["include"] = list(include)
    return body


def micrograd_graph_body(model: OracleModel) -> dict[str, Any]:
    """The micrograd demo as a /v1/graph body of tensor ops: X, W_i, b_i, matmul/add/relu,
    the binary hinge mean(relu(1 - y * s)) and 1e-4 * sum(p^2) over every parameter."""
    nodes: list[dict[str, Any]] = [
        {"id": "X", "op": "const", "value": model.x.tolist()},
        {"id": "y", "op": "const", "value": model.y[:, None].tolist()},
        {"id": "one", "op": "const", "value": 1.0},
        {"id": "alpha", "op": "const", "value": MICROGRAD_ALPHA},
    ]
    prev, squares = "X", []
    for i, (layer, w) in enumerate(zip(model.layers, model.weights, strict=True), 1):
        nodes += [
            {"id": f"W{i}", "op": "param", "value": w["W"].tolist()},
            {"id": f"b{i}", "op": "param", "value": w["b"].tolist()},
            {"id": f"m{i}", "op": "matmul", "inputs": [prev, f"W{i}"]},
            {"id": f"z{i}", "op": "add", "inputs": [f"m{i}", f"b{i}"]},
        ]
        prev = f"z{i}"
        if layer["activation"] == "relu":
            nodes.append({"id": f"a{i}", "op": "relu", "inputs": [prev]})
            prev = f"a{i}"
        for p in (f"W{i}", f"b{i}"):
            nodes += [
                {"id": f"sq_{p}", "op": "square", "inputs": [p]},
                {"id": f"sum_{p}", "op": "sum", "inputs": [f"sq_{p}"]},
            ]
            squares.append(f"sum_{p}")
    nodes += [
        {"id": "ys", "op": "mul", "inputs": ["y", prev]},
        {"id": "margin", "op": "sub", "inputs": ["one", "ys"]},
        {"id": "hinge", "op": "relu", "inputs": ["margin"]},
        {"id": "data_loss", "op": "mean", "inputs": ["hinge"]},
    ]
    total = squares[0]
    for k, s in enumerate(squares[1:], 1):
        nodes.append({"id": f"reg{k}", "op": "add", "inputs": [total, s]})
        total = f"reg{k}"
    nodes += [
        {"id": "reg_loss", "op": "mul", "inputs": ["alpha", total]},
        {"id": "loss", "op": "add", "inputs": ["data_loss", "reg_loss"]},
    ]
    return {"nodes": nodes, "output": "loss"}


# --- checksums and references ------------------------------------------------------------


def checksum(a: Array) -> list[float]:
    """[sum, sum of squares] in float64: compared with rtol 1e-12, so a last-bit difference in
    a libm call between machines passes and a different draw does not."""
    a = np.asarray(a, dtype=np.float64)
    return [float(a.sum()), float(np.square(a).sum())]


def checksums(model: OracleModel) -> dict[str, Any]:
    """What a fixture stores to prove it was recorded on this builder's inputs."""
    return {
        "x": checksum(model.x),
        "y": checksum(model.y),
        "params": {name: checksum(v) for name, v in model.params().items()},
    }


def softmax_cross_entropy(scores: Array, labels: Array) -> tuple[float, Array]:
    """Mean softmax cross-entropy and its gradient d loss / d scores."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -float(logp[np.arange(n), labels].mean())
    dscores = np.exp(logp)
    dscores[np.arange(n), labels] -= 1.0
    return loss, dscores / n


def mlp_forward(params: tuple[Params, ...], x: Array) -> tuple[Array, list[Array], list[Array]]:
    """A relu MLP (last layer linear): scores, the pre-activations z and the layer inputs."""
    zs, inputs, a = [], [], x
    for i, w in enumerate(params):
        inputs.append(a)
        z = a @ w["W"] + w["b"]
        zs.append(z)
        a = np.maximum(z, 0.0) if i < len(params) - 1 else z
    return a, zs, inputs


def sgd_reference(model: OracleModel) -> dict[str, Any]:
    """The training what-if in plain NumPy: torch.optim.SGD (v = momentum * v + g, W -= lr *
    v; g includes l2 * W for weights, not biases) on `model.train`'s minibatches.

    Returns the loss before each update (with the 0.5 * l2 * sum(W^2) term), the final
    weights and, measured on the whole batch with them, each hidden layer's dead fraction
    (pre-activation <= 0 on every example). The later training feature is compared with it."""
    assert model.train is not None
    cfg, x, y = model.train, model.x, model.y
    params = tuple({k: v.copy() for k, v in w.items()} for w in model.weights)
    velocity = tuple({k: np.zeros_like(v) for k, v in w.items()} for w in params)
    losses = []
    for idx in minibatches(cfg["seed"], len(x), cfg["batch_size"], cfg["steps"]):
        loss, grads = _loss_and_grads(params, x[idx], y[idx], model.l2)
        losses.append(loss)
        for w, v, g in zip(params, velocity, grads, strict=True):
            for k in w:
                v[k] *= cfg["momentum"]
                v[k] += g[k]
                w[k] -= cfg["lr"] * v[k]
    _, zs, _ = mlp_forward(params, x)
    dead = [float(np.mean(np.all(z <= 0, axis=0))) for z in zs[:-1]]
    return {"losses": np.array(losses), "params": params, "dead_fraction": dead}


def _loss_and_grads(
    params: tuple[Params, ...], x: Array, y: Array, l2: float
) -> tuple[float, list[Params]]:
    scores, zs, inputs = mlp_forward(params, x)
    loss, dz = softmax_cross_entropy(scores, y)
    loss += 0.5 * l2 * sum(float(np.sum(w["W"] ** 2)) for w in params)
    grads: list[Params] = [{} for _ in params]
    for i in reversed(range(len(params))):
        grads[i] = {"W": inputs[i].T @ dz + l2 * params[i]["W"], "b": dz.sum(axis=0)}
        if i:
            dz = (dz @ params[i]["W"].T) * (zs[i - 1] > 0)
    return loss, grads
