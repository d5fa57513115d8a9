"""POST /v1/network: a network definition (dense and convolutional layers), and its report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gradiag.engine.network import ACTIVATION_OPS, BATCHNORM_MODES, DTYPES, INIT_SCALES, LOSS_OPS
from gradiag.schemas.common import (
    FAIL_FAST,
    Health,
    Number,
    Tensor,
    Tensors,
    Thresholds,
    WireModel,
)
from gradiag.schemas.graph import NodeReport

# the engine's names (engine/network.py); the wire lists them, never again by hand
if TYPE_CHECKING:
    Activation = str
    Loss = str
    Scheme = str
    Dtype = str
    Mode = str
else:
    Activation = Literal[tuple(ACTIVATION_OPS)]
    Loss = Literal[tuple(LOSS_OPS)]
    Scheme = Literal[tuple(INIT_SCALES)]
    Dtype = Literal[DTYPES]
    Mode = Literal[BATCHNORM_MODES]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="numpy default_rng seed")]
Size = Annotated[int, Field(ge=1)]
Pair = (
    Annotated[int, Field(ge=0)]
    | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]
)
Alpha = Annotated[
    float, Field(ge=0.0, allow_inf_nan=False, description="leaky_relu's slope for z <= 0")
]


class DenseLayer(WireModel):
    """A fully-connected layer: a = act(a_prev @ W + b), W (fan_in, units). After an image
    layer it flattens a_prev first (C, H, W order, as torch.flatten)."""

    type: Literal["dense"] = "dense"
    units: Size = Field(description="neurons in the layer")
    activation: Activation = "relu"
    alpha: Alpha = 0.01


class Conv2dLayer(WireModel):
    """a = act(conv2d(a_prev, W, b)): W (F, C, kh, kw), b (F,), cross-correlation as
    PyTorch's Conv2d (NCHW)."""

    type: Literal["conv2d"]
    filters: Size = Field(description="F: output channels")
    kernel: Pair = Field(description="kh = kw, or [kh, kw]")
    stride: Pair = 1
    padding: Pair = Field(0, description="zeros on each side of H and W")
    activation: Activation = "relu"
    alpha: Alpha = 0.01


class PoolLayer(WireModel):
    """The maximum (first maximum takes the gradient, as PyTorch) or mean of each window."""

    type: Literal["maxpool2d", "avgpool2d"]
    kernel: Pair = 2
    stride: Pair | None = Field(None, description="default: the kernel")
    padding: Pair = 0


class BatchNormLayer(WireModel):
    """Per channel over (N, H, W) for an image, per feature over N otherwise: train mode
    normalises with the batch's statistics, eval mode with the given running ones. The
    learnable gamma and beta count as parameters. `activation` follows the normalisation
    (conv (linear) -> batchnorm (relu) is PyTorch's Conv-BN-ReLU)."""

    type: Literal["batchnorm"]
    mode: Mode = "train"
    eps: float = Field(1e-5, ge=0.0, allow_inf_nan=False)
    activation: Activation = "linear"
    alpha: Alpha = 0.01


class FlattenLayer(WireModel):
    """(N, C, H, W) -> (N, C * H * W), C, H, W order (torch.flatten(x, 1))."""

    type: Literal["flatten"]


LAYER_TYPES = ("dense", "conv2d", "maxpool2d", "avgpool2d", "batchnorm", "flatten")


def layer_type(layer: Any) -> str:
    """A layer's `type`; a layer without one is dense (the contract's `{"units", ...}`)."""
    if isinstance(layer, dict):
        return str(layer.get("type", "dense"))
    return str(getattr(layer, "type", "dense"))


LayerSpec = Annotated[
    Union[  # noqa: UP007
        Annotated[DenseLayer, Tag("dense")],
        Annotated[Conv2dLayer, Tag("conv2d")],
        Annotated[PoolLayer, Tag("maxpool2d")],
        Annotated[PoolLayer, Tag("avgpool2d")],
        Annotated[BatchNormLayer, Tag("batchnorm")],
        Annotated[FlattenLayer, Tag("flatten")],
    ],
    Discriminator(layer_type),
]


class WeightsSpec(WireModel):
    """One layer's parameters: `W` and `b` (dense: (fan_in, units), (units,); conv2d:
    (F, C, kh, kw), (F,)), `gamma` and `beta` (batchnorm, (C,)) and in eval mode
    `running_mean` and `running_var`; `{}` for a layer without parameters."""

    W: Tensor | None = None
    b: Tensor | None = None
    gamma: Tensor | None = None
    beta: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None


class InitSpec(WireModel):
    """Draws W = N(0, 1) * scale (biases 0; batchnorm gamma 1, beta 0, running mean 0 and
    variance 1): he sqrt(2 / fan_in), xavier sqrt(1 / fan_in), small 0.01, zeros 0, with
    fan_in = C * kh * kw for a conv layer."""

    scheme: Scheme = "he"
    seed: Seed = 0


class RandomBatchSpec(WireModel):
    """x ~ N(0, 1); labels uniform in [0, classes) for the class losses (-1 or +1 for the
    binary hinge), targets ~ N(0, 1) for mse and uniform in [0, 1) for bce_with_logits."""

    size: int = Field(ge=1, description="examples in the batch")
    seed: Seed = 0


class BatchSpec(WireModel):
    """Either an explicit batch (`x`, with `y` unless the loss is `sum`) or `random`."""

    x: Annotated[list[Tensor], Field(min_length=1), FAIL_FAST] | None = Field(
        None, description="(N, input_dim) or (N, C, H, W) examples"
    )
    y: Tensor | None = Field(
        None,
        description="(N,) integer class labels (softmax_cross_entropy, svm_hinge; -1 or +1 "
        "for svm_hinge on one output unit); (N, units) targets, or (N,) for one output unit "
        "(mse; bce_with_logits, in [0, 1]); not needed for sum",
    )
    random: RandomBatchSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BatchSpec:
        if (self.x is None) == (self.random is None):
            raise ValueError("give either `x` (with `y`) or `random`")
        if self.random is not None and self.y is not None:
            raise ValueError("`y` goes with `x`; a random batch draws its own labels")
        return self


MAX_RATES = 16  # learning rates in one sweep
MAX_STEPS = 100_000
MAX_RECORDED_STEPS = 10_000  # per run: bounds the answer (steps / record_every)
LearningRate = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
# a number or a list: an error's loc reads ["train", "lr", "number"] or ["train", "lr", "list", k]
LearningRates = Annotated[
    Union[  # noqa: UP007
        Annotated[LearningRate, Tag("number")],
        Annotated[list[LearningRate], Field(min_length=1, max_length=MAX_RATES), Tag("list")],
    ],
    Discriminator(lambda value: "list" if isinstance(value, list) else "number"),
]


class TrainSpec(WireModel):
    """The training what-if (docs/training.md): SGD as torch.optim.SGD (v = momentum * v + g,
    W -= lr * v; g includes the l2 term) on minibatches of the request's batch, drawn without
    replacement per epoch from `seed`. `lr` a list: one run per rate from the same start."""

    optimizer: Literal["sgd"] = "sgd"
    lr: LearningRates = Field(description="the learning rate, or a list of them (a sweep)")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    steps: int = Field(100, ge=1, le=MAX_STEPS, description="SGD updates per run")
    batch_size: int | None = Field(
        None, ge=1, description="examples per step (default: the whole batch, every step)"
    )
    seed: Seed = 0
    record_every: int = Field(
        1,
        ge=1,
        validate_default=True,  # the bound on recorded steps holds for the default too
        description="record every k-th step (and the last); at most 10,000 per run",
    )

    @field_validator("record_every")
    @classmethod
    def _bounded_record(cls, record_every: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and -(-steps // record_every) > MAX_RECORDED_STEPS:
            least = -(-steps // MAX_RECORDED_STEPS)
            raise ValueError(
                f"{steps} steps recorded every {record_every} make more than "
                f"{MAX_RECORDED_STEPS} recorded steps; record_every must be at least {least}"
            )
        return record_every


class NetworkRequest(WireModel):
    """A network of dense and convolutional layers, lowered to a graph of the engine's ops."""

    input_dim: int | None = Field(None, ge=1, description="features per example")
    input_shape: Annotated[list[Size], Field(min_length=1, max_length=3)] | None = Field(
        None, description="instead of input_dim: [C, H, W] for images (NCHW)"
    )
    layers: Annotated[list[LayerSpec], Field(min_length=1), FAIL_FAST] = Field(
        description="the layers after the input, in order (the input layer is not counted)"
    )
    loss: Loss
    weights: Annotated[list[WeightsSpec], FAIL_FAST] | None = Field(
        None, description="explicit parameters per layer (otherwise `init` draws them)"
    )
    init: InitSpec | None = Field(
        None, description="how to draw the weights when `weights` is absent (default he, seed 0)"
    )
    batch: BatchSpec = Field(
        default_factory=lambda: BatchSpec(random=RandomBatchSpec(size=32)),
        description="default: a random batch of 32 from seed 0",
    )
    l2: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="adds 0.5 * l2 * sum(W^2) over every W"
    )
    l2_biases: bool = Field(False, description="the l2 term penalises every b too")
    include: Annotated[list[Literal["gradients", "histograms"]], FAIL_FAST] = Field(
        default_factory=list,
        description='"gradients": add `nodes`, as in /v1/graph; "histograms": each layer\'s '
        "64-bin histograms of z, a, dz and dW (and at every recorded training step)",
    )
    explain: bool = Field(
        False,
        description='with `include: ["gradients"]`: each node also has `role`, `inputs` and '
        "`local_grad`, as /v1/graph's `explain`",
    )
    dtype: Dtype = "float64"
    thresholds: Thresholds = Thresholds()
    tensors: Tensors = "full"
    train: TrainSpec | None = Field(
        None, description="train the network with SGD and report what happens (training)"
    )

    @model_validator(mode="after")
    def _one_input(self) -> NetworkRequest:
        if (self.input_dim is None) == (self.input_shape is None):
            raise ValueError("give either `input_dim` or `input_shape`")
        return self


# --- response --------------------------------------------------------------------------


class NetworkParameters(BaseModel):
    neurons: int = Field(description="dense units + conv filters")
    weights: int = Field(description="the elements of every W")
    biases: int = Field(description="the elements of every b")
    batchnorm: int = Field(0, description="batchnorm gamma and beta")
    total: int = Field(description="weights + biases + batchnorm")


class LayerParameters(BaseModel):
    weights: int
    biases: int
    batchnorm: int = 0


class GradNorms(BaseModel):
    W: Number | None = Field(None, description="||d loss / d W|| (Frobenius)")
    b: Number | None = Field(None, description="||d loss / d b||")
    gamma: Number | None = None
    beta: Number | None = None
    z: Number | None = Field(None, description="||d loss / d z||, z the pre-activation")


class HistogramReport(BaseModel):
    range: list[float] = Field(
        description="[lo, hi]: 64 equal bins, fixed per layer and quantity from the single "
        "pass of the initial weights ([min, max] of its finite values)"
    )
    counts: list[int] = Field(description="values per bin (the last bin includes hi)")
    below: int = Field(description="finite values below lo")
    above: int = Field(description="finite values above hi")
    nonfinite: int = Field(description="NaN and Infinity values")


class LayerHistograms(BaseModel):
    z: HistogramReport | None = Field(None, description="the pre-activation")
    a: HistogramReport | None = Field(None, description="the activation (the layer's output)")
    dz: HistogramReport | None = Field(None, description="d loss / d z")
    dW: HistogramReport | None = Field(None, description="d loss / d W")


class LayerReport(BaseModel):
    index: int = Field(description="1-based; the input layer is not counted")
    type: str = Field(description="dense, conv2d, maxpool2d, avgpool2d, batchnorm, flatten")
    shape: list[int] = Field(description="the layer's output per example: [units] or [C, H, W]")
    units: int | None = Field(None, description="units, filters or channels (axis 1)")
    filters: int | None = Field(None, description="conv2d: F")
    activation: Activation | None = None
    fan_in: int | None = None
    parameters: LayerParameters
    dead_units: int = Field(
        0, description="relu/leaky_relu units (conv: filters) with z <= 0 on every example"
    )
    dead_unit_indices: list[int] = Field(default_factory=list)
    dead_fraction: float = Field(0.0, description="dead_units / units")
    dead_activation_fraction: float = Field(0.0, description="activations with z <= 0")
    saturated_units: int = Field(
        0, description="sigmoid/tanh units within saturation_eps of a bound on every example"
    )
    saturated_unit_indices: list[int] = Field(default_factory=list)
    saturated_fraction: float = Field(0.0, description="saturated_units / units")
    saturated_activation_fraction: float = 0.0
    channel_active_fraction: list[float] | None = Field(
        None, description="image layers: per channel, the fraction of (n, h, w) with z > 0"
    )
    activation_mean: Number
    activation_std: Number
    weight_norm: Number | None = Field(None, description="||W|| (Frobenius)")
    grad_norm: GradNorms
    update_ratio: Number | None = Field(None, description="||dW|| / ||W||; null when ||W|| is 0")
    status: Literal["ok", "warn", "fail"] = Field(description="the worst finding at this layer")
    histograms: LayerHistograms | None = Field(None, description='with include ["histograms"]')


# --- training (docs/training.md) ---------------------------------------------------------


class TrainingLayer(BaseModel):
    index: int = Field(description="the layer (1-based), one with weights or a gated activation")
    dead_units: int = Field(description="on this step's minibatch, before the update")
    saturated_units: int = Field(description="on this step's minibatch, before the update")
    update_ratio: Number | None = Field(
        description="||lr * update|| / ||W||, W before the update; null without W, ||W|| = 0 "
        "or no update (the run stopped at this step)"
    )
    histograms: LayerHistograms | None = None


class TrainingStep(BaseModel):
    step: int = Field(description="k: k updates done (0: the initial weights)")
    loss: Number = Field(description="the total loss on step k's minibatch, before update k")
    layers: list[TrainingLayer]


class UnitEvent(BaseModel):
    layer: int
    unit: int = Field(description="0-based unit (a conv layer: filter)")
    step: int = Field(description="dead (died) or alive (revived) on every minibatch from here")


class TrainingRun(BaseModel):
    lr: float
    updates: int = Field(description="SGD updates made (steps, unless the run stopped)")
    stopped_at: int | None = Field(description="the step whose loss was not finite, if any")
    steps: list[TrainingStep] = Field(description="every record_every-th step, and the last")
    died: list[UnitEvent] = Field(description="alive at the start, dead at the end")
    revived: list[UnitEvent] = Field(description="dead at the start, alive at the end")


class SweepRun(TrainingRun):
    final: NetworkResponse = Field(description="the report of this run's final weights")


class SweepRow(BaseModel):
    lr: float
    status: Literal["ok", "warn", "fail"]
    loss: Number = Field(description="the final weights' loss on the whole batch")
    dead_fraction: list[float] = Field(description="per layer of the table's `layers`")


class SweepTable(BaseModel):
    layers: list[int] = Field(description="the relu and leaky_relu layers")
    rows: list[SweepRow]


class TrainingSweep(BaseModel):
    runs: list[SweepRun]
    table: SweepTable


class NetworkResponse(BaseModel):
    name: str = Field(description='"3-layer neural network": layers with weights count')
    loss: Number = Field(description="the total loss: data loss + l2 term")
    data_loss: Number
    l2_loss: Number = Field(description="0.5 * l2 * sum(W^2) (and b^2 with l2_biases)")
    input_dim: int | None = None
    input_shape: list[int]
    batch_size: int
    dtype: Literal["float64", "float32"]
    parameters: NetworkParameters
    layers: list[LayerReport]
    gradient_ratio: Number | None = Field(
        description="||dW first|| / ||dW last|| (layers with weights); null with one such layer "
        "or a zero last"
    )
    signal_ratio: Number | None = Field(
        description="||dz first|| / ||dz last|| (d loss / d pre-activation); null likewise"
    )
    health: Health
    nodes: dict[str, NodeReport] | None = Field(
        None, description='with include ["gradients"]: every lowered node, as in /v1/graph'
    )
    training: TrainingRun | TrainingSweep | None = Field(
        None,
        description="with `train`: the record of the run (the report is the final weights'); "
        "with a list of rates, every run (the report is the initial weights')",
    )


SweepRun.model_rebuild()
