"""`"tensors": "summary"` (the contract's revision 2): each tensor of an answer's `nodes` as
its shape, min, max, mean and 2-norm instead of the full array, so that a big graph can
still be diagnosed in a small answer.

The report (service/report.py) turns a column of arrays into wire values with one function,
`rows(arrays, shapes, flat)`; `rows_for(tensors, full)` picks it: `full` itself, or the
summaries. A picture (the SVG endpoints) asks for "picture": the summaries, except that
scalars and vectors of up to PICTURE_ELEMENTS elements stay numbers, since the drawing
writes those out (service/svg.py `fmt_tensor`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradiag.engine.diagnostics import sum_of_squares
from gradiag.engine.ops import Array
from gradiag.engine.tensors import to_wire

Rows = Callable[[Sequence[Any], Sequence[tuple[int, ...]], np.ndarray | None], list[Any]]

PICTURE_ELEMENTS = 3  # what svg.fmt_tensor lists element by element
# A sum of squares in this range has lost nothing to overflow or to subnormal underflow.
TRUSTED_SQUARES = (1e-280, 1e300)


def rows_for(tensors: str, full: Rows) -> Rows:
    """The function that writes a column of tensors for this `tensors` mode."""
    if tensors == "full":
        return full
    keep = PICTURE_ELEMENTS if tensors == "picture" else 0

    def summarized(
        arrays: Sequence[Any], shapes: Sequence[tuple[int, ...]], flat: np.ndarray | None
    ) -> list[Any]:
        return summary_rows(arrays, shapes, flat, full=full, keep=keep)

    return summarized


def summary_rows(
    arrays: Sequence[Any],
    shapes: Sequence[tuple[int, ...]],
    flat: np.ndarray | None,
    *,
    full: Rows,
    keep: int = 0,
) -> list[Any]:
    """Every row as a summary (None stays None), except tensors of at most `keep` elements,
    which `full` writes. An all-scalar column goes through `full` once and each number
    becomes its own summary (min = max = mean = x, norm = |x|): no NumPy call per row."""
    if not any(shapes):  # a shape () is falsy: every row is a scalar
        numbers = full(arrays, shapes, flat)
        if keep >= 1:
            return numbers
        return [None if x is None else _scalar_summary(x) for x in numbers]
    out: list[Any] = []
    for array, shape in zip(arrays, shapes, strict=True):
        if array is None:
            out.append(None)
        elif math.prod(shape) <= keep and len(shape) <= 1:
            out.append(to_wire(array))
        else:
            out.append(tensor_summary(np.asarray(array)))
    return out


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
