"""`"tensors": "summary"` (the contract's revision 2): each tensor of an answer's `nodes` as
its shape, min, max, mean and 2-norm instead of the full array, so that a big graph can
still be diagnosed in a small answer.

The report (service/report.py) writes a column of scalars in one NumPy call and each tensor
row on its own; `scalar_writer` and `tensor_writer` say how for a `tensors` mode. A picture
(the SVG endpoints) asks for "picture": the summaries, except that scalars and vectors of up
to PICTURE_ELEMENTS elements stay numbers, since the drawing writes those out
(service/svg.py `fmt_tensor`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gradiag.engine.diagnostics import sum_of_squares
from gradiag.engine.ops import Array
from gradiag.engine.tensors import to_wire

PICTURE_ELEMENTS = 3  # what svg.fmt_tensor lists element by element
# A sum of squares in this range has lost nothing to overflow or to subnormal underflow.
TRUSTED_SQUARES = (1e-280, 1e300)


def scalar_writer(tensors: str) -> Callable[[Any], Any] | None:
    """How a scalar row's wire number is written: None keeps it (full, picture)."""
    return _scalar_summary if tensors == "summary" else None


def tensor_writer(tensors: str) -> Callable[[Array], Any]:
    """How a tensor row is written: the nested lists, its summary, or (a picture) the lists
    of a vector of up to PICTURE_ELEMENTS elements and the summary of anything larger."""
    if tensors == "full":
        return to_wire
    if tensors == "summary":
        return tensor_summary

    def for_picture(x: Array) -> Any:
        small = x.size <= PICTURE_ELEMENTS and x.ndim <= 1
        return to_wire(x) if small else tensor_summary(x)

    return for_picture


def summary_value(array: Any, tensors: str) -> Any:
    """One tensor (the output's value) as the mode writes it."""
    value = np.asarray(array)
    if tensors == "full" or (tensors == "picture" and value.size <= PICTURE_ELEMENTS):
        return to_wire(value)
    return tensor_summary(value)


def _scalar_summary(number: Any) -> dict[str, Any]:
    norm = abs(number) if isinstance(number, float) else ("NaN" if number == "NaN" else "Infinity")
    return {"shape": [], "min": number, "max": number, "mean": number, "norm": norm}


def tensor_summary(x: Array) -> dict[str, Any]:
    """shape, min, max, mean, 2-norm, as wire numbers (NaN and infinities as strings). An
    empty tensor has NaN for min, max and mean, and norm 0. Any NaN makes all four NaN."""
    shape = list(x.shape)
    if x.size == 0:
        return {"shape": shape, "min": "NaN", "max": "NaN", "mean": "NaN", "norm": 0.0}
    flat = x.reshape(-1)
    low, high = float(flat.min()), float(flat.max())
    if math.isnan(low) or math.isnan(high):
        nan = "NaN"
        return {"shape": shape, "min": nan, "max": nan, "mean": nan, "norm": nan}
    return {
        "shape": shape,
        "min": to_wire(low),
        "max": to_wire(high),
        "mean": to_wire(_mean(flat, low, high)),
        "norm": to_wire(_norm(flat, max(abs(low), abs(high)))),
    }


def _mean(flat: Array, low: float, high: float) -> float:
    """The mean in float64; for finite data whose sum overflows, the sum of x / n instead."""
    with np.errstate(all="ignore"):
        mean = float(np.mean(flat, dtype=np.float64))
        if not math.isfinite(mean) and math.isfinite(low) and math.isfinite(high):
            mean = float(np.sum(flat / flat.size, dtype=np.float64))
    return mean


def _norm(flat: Array, largest: float) -> float:
    """The 2-norm; finite data never gives infinity (scaled by the largest magnitude, as
    BLAS nrm2 does, when the plain sum of squares overflows or underflows)."""
    if not math.isfinite(largest):
        return math.inf
    if largest == 0.0:
        return 0.0
    with np.errstate(all="ignore"):
        squares = sum_of_squares(flat)
    low, high = TRUSTED_SQUARES
    if low < squares < high:
        return math.sqrt(squares)
    scaled = flat / largest
    return largest * math.sqrt(sum_of_squares(scaled))
