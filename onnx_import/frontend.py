"""One ONNX model diagnosed: read and check the model, check the batch against its input,
lower it, compile (every size limit, on a placeholder batch), run the one executor, read the
health. No Flask, no Pydantic: the service, the command line and the benchmark call this.

The order is the order of the limits: the body's bytes (the service), the model's node count
and its initializers' sizes (from the protobuf's dims), unsupported op types (all listed at
once), the batch's shape and size, then the compiler's element, FLOP and scratch limits on
the lowered graph, all before an activation is allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradiag.engine.compiler import Limits, Program, compile_graph
from gradiag.engine.diagnostics import Thresholds
from gradiag.engine.errors import check_limits
from gradiag.engine.executor import Result, run
from gradiag.engine.network import Batch, RandomBatch, with_leaves
from gradiag.engine.ops import Array
from gradiag.onnx_import.batch import check_targets, random_shape, random_targets
from gradiag.onnx_import.diagnostics import ModelHealth, model_health
from gradiag.onnx_import.lower import (
    LOSS,
    TARGETS,
    Lowered,
    check_batch_shape,
    check_supported,
    lower_model,
    pick,
)
from gradiag.onnx_import.model import OnnxModel, ValueInfo, read_model


@dataclass(frozen=True)
class OnnxOptions:
    """What a request says besides the model and the batch, and the service's limits."""

    loss: str
    input: str | None = None  # the graph input the batch feeds (default: the only one)
    output: str | None = None  # the graph output that feeds the loss (default: the only one)
    dtype: str = "float64"
    gradients: bool = False  # the report returns every node's gradient (the batch's too)
    thresholds: Thresholds = field(default_factory=Thresholds)
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 0


@dataclass
class DiagnosedModel:
    model: OnnxModel
    lowered: Lowered
    result: Result
    health: ModelHealth
    batch_size: int

    @property
    def source(self) -> ValueInfo:
        return self.lowered.source


def diagnose_model(
    data: bytes,
    batch: Batch | RandomBatch | None,
    options: OnnxOptions,
    *,
    deadline: float | None = None,
    check: Callable[[Program], None] | None = None,
) -> DiagnosedModel:
    """The model's bytes and a batch (None: a random one of the input's own batch size).
    `check`: the caller's look at the compiled program before anything is drawn or run (the
    service's answer and memory budget)."""
    limits = options.limits
    model = read_model(
        data,
        max_nodes=limits.max_nodes,
        max_tensor_elements=limits.max_tensor_elements,
        max_total_elements=limits.max_total_elements,
    )
    check_supported(model)
    source = pick(model.inputs, options.input, "input", "input")
    random = batch if not isinstance(batch, Batch) else None
    x_shape = (
        batch.x.shape
        if isinstance(batch, Batch)
        else random_shape(source, None if random is None else random.size)
    )
    check_batch_shape(source, x_shape)
    x_loc = ("batch", "x") if isinstance(batch, Batch) else ("batch", "random", "size")
    check_limits([("max_batch", options.max_batch, x_shape[0], "the batch's size is")],
                 loc=x_loc)  # fmt: skip
    dtype = np.dtype(options.dtype)
    lowered = lower_model(
        model, source, x_shape, loss=options.loss, output=options.output, dtype=dtype,
        limits=limits,
    )  # fmt: skip
    program = compile_graph(
        lowered.nodes,
        LOSS,
        limits=limits,
        dtype=dtype,
        no_grad=frozenset() if options.gradients else frozenset({source.name}),
    )
    if check is not None:
        check(program)
    scores = lowered.shapes[lowered.scores]
    if isinstance(batch, Batch):
        x, y = batch.x, batch.y
    else:
        rng = np.random.default_rng(0 if random is None else random.seed)
        x = rng.standard_normal(x_shape)
        y = random_targets(options.loss, scores, rng)
    leaves: dict[str, Array] = {source.name: np.asarray(x, dtype)}
    targets = check_targets(options.loss, y, scores, lowered.targets_shape)
    if targets is not None:
        leaves[TARGETS] = np.asarray(targets, dtype)
    result = run(with_leaves(program, leaves), deadline=deadline)
    health = model_health(result, lowered, options.thresholds)
    return DiagnosedModel(model, lowered, result, health, x_shape[0])


def batch_of(arrays: dict[str, Any]) -> Batch:
    """An explicit batch from arrays `x` and `y` (y optional: the `sum` loss takes none)."""
    x = np.asarray(arrays["x"])
    y = arrays.get("y")
    return Batch(x, None if y is None else np.asarray(y))
