"""Wire types shared by every endpoint: tensors, thresholds, health, problems."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, FailFast, Field, StrictFloat
from typing_extensions import TypeAliasType

from gradiag.engine.diagnostics import Thresholds as EngineThresholds


class FailFirst(FailFast):
    """Pydantic's FailFast, hashable, so that it may sit inside a union (Tensor's)."""

    __hash__ = object.__hash__


# Every list and dict of a request stops at its first bad item: a body of a million bad
# elements then costs one error, not a million (an error flood; docs/hardening.md).
FAIL_FAST = FailFirst()

# Numbers are strict (no "1e3", no true); non-finite values travel as the protobuf JSON strings.
NonFinite = Literal["NaN", "Infinity", "-Infinity"]
Number = Annotated[
    StrictFloat | NonFinite,
    Field(description='A number, or "NaN", "Infinity", "-Infinity"'),
]
Tensor = TypeAliasType(
    "Tensor",
    "Annotated[Annotated[list[Tensor], FAIL_FAST] | Number, Field(union_mode='left_to_right')]",
    # A scalar, or a rectangular nested list (the engine refuses ragged lists by path). A
    # list is tried first and the number only when it is not one: Pydantic's default
    # ("smart") union tried both for every row, 3x the time for a tensor of short rows.
)
# No control characters (C0, DEL, C1) nor U+FFFE/U+FFFF: an id is drawn in SVG and XML
# cannot hold them, and a terminal or a log should not receive them either.
ID_PATTERN = "^[^\x00-\x1f\x7f-\x9f\ufffe\uffff]+$"
ID_MESSAGE = "must not contain control characters (U+0000-U+001F, U+007F-U+009F)"
NodeId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=ID_PATTERN,
        description="A node id: 1-200 characters, no control characters",
    ),
]


class WireModel(BaseModel):
    """Strict: no lax coercion, misspelled fields are errors. An error keeps no copy of the
    input it is about (the answer never quotes it, and a copy of a big tensor is costly)."""

    model_config = ConfigDict(
        strict=True, extra="forbid", ser_json_inf_nan="strings", hide_input_in_errors=True
    )


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
DEFAULTS = EngineThresholds()  # the engine defines the defaults; the wire only names them

Tensors = Annotated[
    Literal["full", "summary"],
    Field(
        description='how `nodes` writes each value and grad: "full" (the arrays) or "summary" '
        "(shape, min, max, mean, norm: a big graph's answer stays small)"
    ),
]


class TensorSummary(BaseModel):
    """A tensor as five numbers (`"tensors": "summary"`); NaN and infinities as strings."""

    shape: list[int]
    min: Number
    max: Number
    mean: Number
    norm: Number = Field(description="the 2-norm of all elements")


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
    errors: list[ErrorItem] | None = Field(
        None, description="the errors found, at most 100 (see `error_count`)"
    )
    error_count: int | None = Field(
        None, description="how many errors there were, when more than `errors` lists"
    )
    limit: str | None = Field(None, description="the limit that was exceeded")
    limit_value: float | None = Field(None, description="that limit's configured value")
