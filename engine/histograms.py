"""Per-layer histograms of z, a, dz and dW (CS231n: "dump the histograms of activations and
gradients, per layer"), read off a `Result`.

Every histogram has `BINS` equal bins over a fixed range, so that the histograms of one
quantity at different training steps can be laid side by side. The range of each layer's
quantity is chosen once, from a reference pass (the network's single pass: its initial
weights on the whole batch): [min, max] of its finite values (a constant quantity gets
[v - 0.5, v + 0.5]; one without a finite value [-1, 1]). Later passes count the values
outside that range in `below` and `above`, and NaN or Infinity in `nonfinite`, so growth
shows instead of being rescaled away. Each histogram is a few whole-array NumPy calls
(np.histogram's equal-bin path is one bincount).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gradiag.engine.executor import Result
from gradiag.engine.ops import Array

BINS = 64
QUANTITIES = ("z", "a", "dz", "dW")  # in this order in every layer's histograms


@dataclass(frozen=True)
class Histogram:
    """`counts[k]` values in [lo + k w, lo + (k + 1) w), w = (hi - lo) / BINS (the last bin
    closed: hi counts there); `below`/`above` the finite values outside [lo, hi]."""

    lo: float
    hi: float
    counts: list[int]
    below: int
    above: int
    nonfinite: int


Ranges = Mapping[str, tuple[float, float]]  # per quantity of a layer


def histogram(x: Array, lo: float, hi: float) -> Histogram:
    """`x` (any shape) counted into BINS bins over [lo, hi]."""
    flat = np.asarray(x).reshape(-1)
    finite = np.isfinite(flat)
    nonfinite = int(flat.size - np.count_nonzero(finite))
    values = flat if not nonfinite else flat[finite]
    counts, _ = np.histogram(values, bins=BINS, range=(lo, hi))
    below = int(np.count_nonzero(values < lo))
    above = int(np.count_nonzero(values > hi))
    return Histogram(lo, hi, counts.tolist(), below, above, nonfinite)


def value_range(x: Array) -> tuple[float, float]:
    """[min, max] of x's finite values, widened when they are all one number."""
    flat = np.asarray(x).reshape(-1)
    values = flat[np.isfinite(flat)]
    if not values.size:
        return -1.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if lo == hi or not math.isfinite(hi - lo):  # one value, or a span float64 cannot hold
        return (lo - 0.5, hi + 0.5) if lo == hi else (max(lo, -1e300), min(hi, 1e300))
    return lo, hi


def layer_tensors(result: Result, index: Mapping[str, int], name: str) -> dict[str, Array]:
    """The quantities layer `name` has in this pass: z and dz (a layer with a pre-activation),
    a (every layer), dW (a layer with weights)."""
    tensors: dict[str, Array] = {}
    z = index.get(f"{name}.z")
    if z is not None:
        tensors["z"] = result.value(z)
    tensors["a"] = result.value(index[f"{name}.a"])
    if z is not None:
        dz = result.grad(z)
        if dz is not None:
            tensors["dz"] = dz
    w = index.get(f"{name}.W")
    if w is not None:
        dw = result.grad(w)
        if dw is not None:
            tensors["dW"] = dw
    return tensors


def layer_ranges(
    result: Result, index: Mapping[str, int], names: Sequence[str]
) -> list[dict[str, tuple[float, float]]]:
    """Each layer's fixed ranges, from this (reference) pass."""
    return [
        {q: value_range(x) for q, x in layer_tensors(result, index, name).items()} for name in names
    ]


def layer_histograms(
    result: Result, index: Mapping[str, int], names: Sequence[str], ranges: Sequence[Ranges]
) -> list[dict[str, Histogram]]:
    """Each layer's histograms in this pass, over the reference pass's ranges."""
    out = []
    for name, fixed in zip(names, ranges, strict=True):
        tensors = layer_tensors(result, index, name)
        out.append({q: histogram(tensors[q], *fixed[q]) for q in QUANTITIES if q in tensors})
    return out
