"""The cheap paths for scalars give the very numbers of the general ones they stand in for:
the report's bytes must not depend on which path a value took."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradiag.engine.diagnostics import _finite_norm
from gradiag.engine.ops import sigmoid_forward
from gradiag.service.report import _scalars_wire

EDGES = [0.0, -0.0, 1.0, -1.0, 1e-320, -1e-320, 1e-160, -1e-160, 36.7, -36.7, 700.0, -700.0]
EDGES += [800.0, -800.0, 1e154, 1e155, -1e200, 1e308, math.inf, -math.inf, math.nan]


def two_quotient_sigmoid(x: np.ndarray) -> np.ndarray:
    """The textbook stable form: both quotients, then np.where picks one per element."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_is_the_two_quotient_form_bit_for_bit(dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate((rng.normal(0, 20, 10_000), rng.normal(0, 1e-3, 1000), EDGES))
    with np.errstate(all="ignore"):
        x = x.astype(dtype)  # float32: the huge edges become infinities
        out, _ = sigmoid_forward(x)
        assert out.dtype == dtype
        assert out.tobytes() == two_quotient_sigmoid(x).tobytes()
        for value in x[-len(EDGES) :]:  # 0-d operands, as a node-by-node run has them
            scalar, _ = sigmoid_forward(np.asarray(value))
            assert np.asarray(scalar).tobytes() == two_quotient_sigmoid(np.asarray(value)).tobytes()


@pytest.mark.parametrize("value", [v for v in EDGES if math.isfinite(v)] + [3e-170, 2.5])
def test_scalar_norm_is_numpys(value: float) -> None:
    """sqrt(g * g) in Python floats, as np.linalg.norm computes it for one number: tiny
    values whose square underflows and huge ones whose square overflows included."""
    grad = np.asarray(value)
    with np.errstate(all="ignore"):
        expected = float(np.linalg.norm(grad))
    assert _finite_norm(grad) == expected
    assert _finite_norm(np.asarray(-value)) == _finite_norm(grad)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_scalar_norm_of_a_non_finite_gradient_is_none(bad: float) -> None:
    assert _finite_norm(np.asarray(bad)) is None
    assert _finite_norm(np.array([1.0, bad])) is None


def test_scalar_wire_numbers_are_the_flat_arrays() -> None:
    """A node-by-node run's 0-d arrays (None for a const's gradient) give the wire numbers
    of the same values as one flat array, the non-finite ones as their strings."""
    values = [np.asarray(v) for v in EDGES] + [None, np.asarray(np.float32(0.1))]
    shapes = [()] * len(values)
    flat = np.array([np.nan if v is None else v for v in values], np.float64)
    assert _scalars_wire(values, shapes) == _scalars_wire(values, shapes, flat)
    assert _scalars_wire(values, shapes)[EDGES.index(math.inf)] == "Infinity"
    assert _scalars_wire([np.ones(2)], [(2,)]) is None  # a tensor: `to_wire` each
