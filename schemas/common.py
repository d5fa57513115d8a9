"""Wire types shared by every endpoint: tensors, thresholds, health, problems."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat
from typing_extensions import TypeAliasType

from gradiag.engine.diagnostics import Thresholds as EngineThresholds

# Numbers are strict (no "1e3", no true); non-finite values travel as the protobuf JSON strings.
NonFinite = Literal["NaN", "Infinity", "-Infinity"]
Number = Annotated[
    StrictFloat | NonFinite,
    Field(description='A number, or "NaN", "Infinity", "-Infinity"'),
]
Tensor = TypeAliasType(
    "Tensor",
    "Number | list[Tensor]",
    # A scalar, or a rectangular nested list (the engine refuses ragged lists by path).
)
NodeId = Annotated[str, Field(min_length=1, max_length=200, description="A node id")]


class WireModel(BaseModel):
    """Strict: no lax coercion, misspelled fields are errors."""

    model_config = ConfigDict(strict=True, extra="forbid", ser_json_inf_nan="strings")


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
DEFAULTS = EngineThresholds()  # the engine defines the defaults; the wire only names them


class Thresholds(WireModel):
    """Where health findings start; every field is optional and overrides one default."""

    # frozen, so hashable: Pydantic then uses the field default as it is instead of
    # deep-copying it into every request that leaves `thresholds` out
    model_config = ConfigDict(frozen=True)

    dead_warn: Fraction = Field(DEFAULTS.dead_warn, description="dead ReLU fraction that warns")
    dead_fail: Fraction = Field(DEFAULTS.dead_fail, description="dead ReLU fraction that fails")
    saturated_warn: Fraction = Field(
        DEFAULTS.saturated_warn, description="saturated fraction that warns"
    )
    saturated_fail: Fraction = Field(
        DEFAULTS.saturated_fail, description="saturated fraction that fails"
    )
    saturated_activations_warn: Fraction = Field(
        DEFAULTS.saturated_activations_warn,
        description="fraction of a layer's (node's) activations saturated that warns",
    )
    saturated_activations_fail: Fraction = Field(
        DEFAULTS.saturated_activations_fail,
        description="fraction of a layer's (node's) activations saturated that fails",
    )
    saturation_eps: float = Field(
        DEFAULTS.saturation_eps,
        gt=0.0,
        lt=0.5,
        description="a sigmoid/tanh output within eps of a bound",
    )
    vanishing_ratio: float = Field(
        DEFAULTS.vanishing_ratio,
        gt=0.0,
        description="||dW first layer|| / ||dW last layer|| below this warns",
    )
    exploding_norm: float = Field(
        DEFAULTS.exploding_norm, gt=0.0, description="a gradient norm above this warns"
    )
    update_ratio_high: float = Field(
        DEFAULTS.update_ratio_high,
        gt=0.0,
        description="training: a layer's median ||lr * update|| / ||W|| above this warns",
    )
    update_ratio_low: float = Field(
        DEFAULTS.update_ratio_low,
        ge=0.0,
        description="training: a layer's median ||lr * update|| / ||W|| below this warns",
    )
    diverged_factor: float = Field(
        DEFAULTS.diverged_factor,
        gt=1.0,
        description="training: a loss above this many times its start (or not finite) fails",
    )


class Finding(BaseModel):
    code: str = Field(
        description="dead_relu, saturated_sigmoid, saturated_tanh, saturated_activations, "
        "vanishing_gradient, exploding_gradient, nonfinite, dead_relu_onset, update_ratio, "
        "diverged"
    )
    severity: Literal["warn", "fail"]
    location: str = Field(description="the node id or layer (layer1, ...) at fault")
    message: str
    count: int | None = Field(
        None,
        description="on a summary finding only: how many findings of its code were left out "
        "(a report lists at most 100 findings)",
    )


class Health(BaseModel):
    status: Literal["ok", "warn", "fail"]
    findings: list[Finding]


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="path to the field at fault")
    msg: str
    node: str | None = Field(None, description="the id of the node at fault, when there is one")


class Problem(BaseModel):
    """RFC 9457 problem details (application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[ErrorItem] | None = None
    limit: str | None = Field(None, description="the limit that was exceeded")
    limit_value: float | None = Field(None, description="that limit's configured value")
