"""POST /v1/network: a fully-connected network definition, and its report."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from gradiag.schemas.common import FAIL_FAST, Health, Number, Tensor, Tensors, Thresholds, WireModel
from gradiag.schemas.graph import NodeReport

Activation = Literal["relu", "leaky_relu", "sigmoid", "tanh", "linear"]
Loss = Literal["mse", "softmax_cross_entropy", "svm_hinge", "sum"]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="numpy default_rng seed")]


class LayerSpec(WireModel):
    """One fully-connected layer: a = act(a_prev @ W + b)."""

    units: int = Field(ge=1, description="neurons in the layer")
    activation: Activation = "relu"
    alpha: float = Field(
        0.01, ge=0.0, allow_inf_nan=False, description="leaky_relu's slope for z <= 0"
    )


class WeightsSpec(WireModel):
    """One layer's parameters."""

    W: Tensor = Field(description="(fan_in, units)")
    b: Tensor = Field(description="(units,)")


class InitSpec(WireModel):
    """Draws W = N(0, 1) * scale (biases 0): he sqrt(2 / fan_in), xavier sqrt(1 / fan_in),
    small 0.01, zeros 0."""

    scheme: Literal["he", "xavier", "small", "zeros"] = "he"
    seed: Seed = 0


class RandomBatchSpec(WireModel):
    """x ~ N(0, 1); labels uniform in [0, classes) for the class losses, targets ~ N(0, 1)
    for mse."""

    size: int = Field(ge=1, description="examples in the batch")
    seed: Seed = 0


class BatchSpec(WireModel):
    """Either an explicit batch (`x`, with `y` unless the loss is `sum`) or `random`."""

    x: (
        Annotated[list[Annotated[list[Number], FAIL_FAST]], Field(min_length=1), FAIL_FAST] | None
    ) = Field(None, description="(N, input_dim) examples, one per row")
    y: Tensor | None = Field(
        None,
        description="(N,) integer class labels (softmax_cross_entropy, svm_hinge); (N, units) "
        "targets, or (N,) for one output unit (mse); not needed for sum",
    )
    random: RandomBatchSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BatchSpec:
        if (self.x is None) == (self.random is None):
            raise ValueError("give either `x` (with `y`) or `random`")
        if self.random is not None and self.y is not None:
            raise ValueError("`y` goes with `x`; a random batch draws its own labels")
        return self


class NetworkRequest(WireModel):
    """A fully-connected network, lowered to a graph of the engine's ops."""

    input_dim: int = Field(ge=1, description="features per example")
    layers: Annotated[list[LayerSpec], Field(min_length=1), FAIL_FAST] = Field(
        description="the layers after the input, in order (the input layer is not counted)"
    )
    loss: Loss
    weights: Annotated[list[WeightsSpec], FAIL_FAST] | None = Field(
        None, description="explicit W and b per layer (otherwise `init` draws them)"
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
    include: Annotated[list[Literal["gradients"]], FAIL_FAST] = Field(
        default_factory=list, description='"gradients": add `nodes`, as in /v1/graph'
    )
    dtype: Literal["float64", "float32"] = "float64"
    thresholds: Thresholds = Thresholds()
    tensors: Tensors = "full"


# --- response --------------------------------------------------------------------------


class NetworkParameters(BaseModel):
    neurons: int = Field(description="sum of units")
    weights: int = Field(description="sum of fan_in * units")
    biases: int = Field(description="sum of units")
    total: int = Field(description="weights + biases")


class LayerParameters(BaseModel):
    weights: int
    biases: int


class GradNorms(BaseModel):
    W: Number = Field(description="||d loss / d W|| (Frobenius)")
    b: Number = Field(description="||d loss / d b||")
    z: Number = Field(description="||d loss / d z||, z the pre-activation (N, units)")


class LayerReport(BaseModel):
    index: int = Field(description="1-based; the input layer is not counted")
    units: int
    activation: Activation
    fan_in: int
    parameters: LayerParameters
    dead_units: int = Field(description="relu/leaky_relu units with z <= 0 on every example")
    dead_unit_indices: list[int]
    dead_fraction: float = Field(description="dead_units / units")
    dead_activation_fraction: float = Field(description="activations with z <= 0 / N * units")
    saturated_units: int = Field(
        description="sigmoid/tanh units within saturation_eps of a bound on every example"
    )
    saturated_unit_indices: list[int]
    saturated_fraction: float = Field(description="saturated_units / units")
    saturated_activation_fraction: float
    activation_mean: Number
    activation_std: Number
    weight_norm: Number = Field(description="||W|| (Frobenius)")
    grad_norm: GradNorms
    update_ratio: Number | None = Field(description="||dW|| / ||W||; null when ||W|| is 0")
    status: Literal["ok", "warn", "fail"] = Field(description="the worst finding at this layer")


class NetworkResponse(BaseModel):
    name: str = Field(description='"3-layer neural network": the input layer is not counted')
    loss: Number = Field(description="the total loss: data loss + l2 term")
    data_loss: Number
    l2_loss: Number = Field(description="0.5 * l2 * sum(W^2)")
    input_dim: int
    batch_size: int
    dtype: Literal["float64", "float32"]
    parameters: NetworkParameters
    layers: list[LayerReport]
    gradient_ratio: Number | None = Field(
        description="||dW layer1|| / ||dW last layer||; null with one layer or a zero last"
    )
    signal_ratio: Number | None = Field(
        description="||dz layer1|| / ||dz last layer|| (d loss / d pre-activation); null likewise"
    )
    health: Health
    nodes: dict[str, NodeReport] | None = Field(
        None, description='with include ["gradients"]: every lowered node, as in /v1/graph'
    )
