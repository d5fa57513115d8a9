"""A reference interpreter for tests: the textbook walk, node by node.

Forward in row order, each op called on its own operands (0-d arrays for scalars); backward in
reverse row order, each op's backward at its node's gradient, summed back to each operand's
shape and added in. Unreached nodes (no path to the output) are skipped, so their gradient
stays 0. No batching, no plan: what the executor must agree with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradiag.engine import OPS, Program
from gradiag.engine.ops import Array, unbroadcast


def reference_values(program: Program) -> tuple[list[Array], list[Any]]:
    values: list[Array] = []
    caches: list[Any] = []
    with np.errstate(all="ignore"):
        for i in range(len(program)):
            op = OPS.get(program.op(i))
            if op is None:
                leaf = program.tensors.get(i)
                values.append(np.asarray(program.scalars[i]) if leaf is None else leaf)
                caches.append(None)
                continue
            out, cache = op.forward(*(values[j] for j in program.inputs(i)), **program.attrs[i])
            values.append(np.asarray(out))
            caches.append(cache)
    return values, caches


def reference_run(
    program: Program, output_grad: Array | None = None
) -> tuple[list[Array], list[Array | None]]:
    """(values, grads) by row; a const's (and a no_grad node's) gradient is None."""
    values, caches = reference_values(program)
    n, out = len(program), program.output
    grads: list[Array | None] = [None] * n
    shape = program.shapes[out]
    grads[out] = np.ones(shape, program.dtype) if output_grad is None else output_grad
    with np.errstate(all="ignore"):
        for i in range(out, -1, -1):
            op = OPS.get(program.op(i))
            dout = grads[i]
            if op is None or dout is None:
                continue
            operands = program.inputs(i)
            if op.takes_needs:
                local = op.backward(dout, caches[i], tuple(True for _ in operands))
            else:
                local = op.backward(dout, caches[i])
            for j, d in zip(operands, local, strict=True):
                if d is None:
                    continue
                d = unbroadcast(d, program.shapes[j])
                held = grads[j]
                grads[j] = d if held is None else held + d
    return values, [
        None
        if not program.has_grad(i)
        else (np.zeros(program.shapes[i], program.dtype) if g is None else g)
        for i, g in enumerate(grads)
    ]


def reference_local(program: Program, values: list[Array], caches: list[Any], i: int) -> Any:
    """Node i's local derivatives: its op's backward at an upstream gradient of 1."""
    op = OPS[program.op(i)]
    with np.errstate(all="ignore"):
        return op.backward(np.ones(program.shapes[i], program.dtype), caches[i])
