"""The array types every engine module shares, and the one finiteness test they use."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Array = np.ndarray[Any, np.dtype[Any]]
Shape = tuple[int, ...]

SMALL = 4096  # elements: below this, per-call overhead decides, not memory traffic


def all_finite(x: Array) -> bool:
    """No NaN or infinity in x, in one read and no bool array: a sum of squares is NaN or inf
    whenever an element is, so a finite one settles it (BLAS dot, faster than isfinite);
    only an inf sum (an overflow of finite squares, or a real inf) takes the exact check."""
    if x.ndim == 0:  # scalar graphs call this per node: skip NumPy's per-call overhead
        return math.isfinite(float(x))
    if x.size <= SMALL:  # a batched level's slice: errstate's cost is more than the read
        return bool(np.logical_and.reduce(np.isfinite(x), axis=None))  # not .all(): 2x faster
    flat = x.reshape(-1)
    with np.errstate(all="ignore"):
        total = np.dot(flat, flat)
    return math.isfinite(total) or bool(np.isfinite(x).all())
