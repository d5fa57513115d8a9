"""POST /v1/onnx: the `request` part of the multipart body, and the report.

The body is `multipart/form-data`: `model` (the .onnx file's bytes), `request` (JSON,
`OnnxRequest`) and optionally `batch` (a NumPy .npz with arrays `x` and `y`, in place of
`request.batch`). The report has /v1/network's form (`OnnxResponse` extends
`NetworkResponse`), with one layer per ONNX node that has weights or an activation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from gradiag.schemas.common import FAIL_FAST, Number, Tensors, Thresholds, WireModel
from gradiag.schemas.network import (
    BatchSpec,
    Dtype,
    GradNorms,
    LayerParameters,
    LayerReport,
    Loss,
    NetworkParameters,
    NetworkResponse,
)


class OnnxRequest(WireModel):
    """The JSON part `request`: what the model's output is scored with, and on which batch."""

    loss: Loss = Field(description="the loss on the model's output (as /v1/network's)")
    batch: BatchSpec | None = Field(
        None,
        description="`x` (the input's shape, N first) and `y`, or `random`; or send a part "
        "`batch` (.npz with x, y) instead; neither: a random batch of the input's batch size, "
        "seed 0",
    )
    input: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="the graph input the batch feeds (default: the only one)",
    )
    output: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="the graph output that feeds the loss (default: the only one)",
    )
    include: Annotated[list[Literal["gradients"]], FAIL_FAST] = Field(
        default_factory=list,
        description='"gradients": add `nodes`: every float initializer under its ONNX name '
        "(its own shape and layout), every node output under its ONNX tensor name, `loss`",
    )
    explain: bool = Field(False, description="with gradients: `role`, `inputs`, `local_grad`")
    tensors: Tensors = "full"
    dtype: Dtype = Field("float64", description="the precision of the run (initializers cast)")
    thresholds: Thresholds = Thresholds()


# --- response --------------------------------------------------------------------------


class OnnxModelInfo(BaseModel):
    producer: str = Field(description='the exporter, e.g. "pytorch 2.13.0"')
    opset: int = Field(description="the default domain's opset")
    ir_version: int
    graph: str = Field(description="the graph's name")
    input: str = Field(description="the graph input the batch fed")
    output: str = Field(description="the graph output the loss scored")
    nodes: int = Field(description="ONNX nodes in the graph")


class OnnxParameters(NetworkParameters):
    total: int = Field(
        description="every float initializer's elements (running statistics included)"
    )
    running_stats: int = Field(
        0,
        description="batchnorm running mean and variance (PyTorch's buffers: total minus this "
        "is PyTorch's parameter count)",
    )
    other: int = Field(0, description="float initializers in no other group")
    tensors: int = Field(description="float initializers")


class OnnxLayerParameters(LayerParameters):
    running_stats: int = 0
    other: int = 0


class OnnxGradNorms(GradNorms):
    running_mean: Number | None = None
    running_var: Number | None = None


class OnnxLayerReport(LayerReport):
    name: str = Field(description="the ONNX node's name (`<op_type>#<index>` when it has none)")
    op_type: str
    initializers: dict[str, str] = Field(
        default_factory=dict, description="role (W, b, gamma, beta, ...) -> initializer name"
    )
    parameters: OnnxLayerParameters
    grad_norm: OnnxGradNorms


class OnnxResponse(NetworkResponse):
    model: OnnxModelInfo
    parameters: OnnxParameters
    layers: list[OnnxLayerReport]  # type: ignore[assignment]  # the network's, with names
