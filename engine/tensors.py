"""Wire tensors (numbers, "NaN"/"Infinity" strings, nested lists) to and from NumPy arrays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradiag.engine.errors import ShapeError
from gradiag.engine.ops import Array


def to_array(
    value: Any, loc: Sequence[str | int], dtype: Any = np.float64, node: str | None = None
) -> Array:
    """A validated wire tensor as an array. The wire schema has already refused anything
    but numbers, the three non-finite strings and lists; NumPy parses those strings."""
    try:
        return np.array(value, dtype=dtype)
    except ValueError:
        raise ShapeError(
            "the nested list is ragged: every row of a tensor must have the same length",
            loc=loc,
            node=node,
        ) from None


def to_wire(array: Any) -> Any:
    """An array as JSON-ready Python: nested lists of floats, non-finite values as strings."""
    if isinstance(array, float):  # float and np.float64: scalar graphs, without NumPy calls
        if math.isfinite(array):
            return float(array)
        return "NaN" if math.isnan(array) else ("Infinity" if array > 0 else "-Infinity")
    array = np.asarray(array)
    if array.ndim == 0 and array.dtype.kind == "f" and math.isfinite(scalar := float(array)):
        return scalar  # the common case of scalar graphs, without NumPy's per-call overhead
    if array.dtype.kind == "b":
        return array.tolist()
    finite = np.isfinite(array)
    if finite.all():
        return array.tolist()
    as_objects = array.astype(object)
    as_objects[np.isnan(array)] = "NaN"
    as_objects[array == np.inf] = "Infinity"
    as_objects[array == -np.inf] = "-Infinity"
    return as_objects.tolist()
