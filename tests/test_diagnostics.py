"""The reductions the reports are read with, against the straightforward formulas: norms and
moments accumulated in float64 without float64 copies, and the one-read finiteness check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradiag.engine.diagnostics import (
    CHUNK,
    WHOLE,
    count_per_unit,
    is_finite,
    mean_std,
    norm,
    sum_of_squares,
)

DTYPES = [np.float32, np.float64]
# one chunk, exactly one, several with a tail; mean_std's chunked path above WHOLE
SIZES = [1, 7, CHUNK, 3 * CHUNK + 5, WHOLE + 5]


def straightforward_norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64)))


def exact_norm(x: np.ndarray) -> float:
    """The oracle: Python's exactly rounded `math.fsum` of the squares of x / max|x|."""
    values = [float(v) for v in np.ravel(x)]
    if any(math.isnan(v) for v in values):
        return math.nan
    scale = max((abs(v) for v in values), default=0.0)
    if scale == 0.0 or math.isinf(scale):
        return scale
    return scale * math.sqrt(math.fsum((v / scale) ** 2 for v in values))


def sample(dtype: type, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(size) * 3.0 + 0.5).astype(dtype)


# a float32 tensor's sum of squares is a float32 BLAS dot (engine.diagnostics): float32's
# own precision, ~1e-6 relative; float64 tensors and the fallbacks are exact to rounding
NORM_REL = {np.float32: 1e-5, np.float64: 1e-12}


def same(got: float, want: float, rel: float = 1e-12) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want):
        return got == want
    return got == pytest.approx(want, rel=rel, abs=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_sum_of_squares_is_the_float64_norm_squared(dtype: type, size: int) -> None:
    x = sample(dtype, size).reshape(-1, 1) if size % 2 else sample(dtype, size)
    want = straightforward_norm(x) ** 2
    assert same(sum_of_squares(x), want, NORM_REL[dtype])
    assert same(norm(x), straightforward_norm(x), NORM_REL[dtype])


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_float32_sums_outside_the_trusted_range_are_exact(scale: float) -> None:
    """Tiny gradients (whose float32 squares would be subnormal) and huge ones (whose float32
    sum would overflow) take the float64 chunks: exact, not 0 or inf."""
    x = (sample(np.float64, 3 * CHUNK + 5) * scale).astype(np.float32)
    assert np.isfinite(x).all() and np.all(x != 0)
    assert same(sum_of_squares(x), straightforward_norm(x) ** 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_mean_std_match_numpy_in_float64(dtype: type, size: int) -> None:
    x = sample(dtype, size, seed=1).reshape(1, -1)
    mean, std = mean_std(x)
    assert same(mean, float(np.mean(x, dtype=np.float64)))
    assert same(std, float(np.std(x, dtype=np.float64)))


def test_float32_norm_does_not_overflow_where_float32_arithmetic_would() -> None:
    x = np.full(3 * CHUNK, 3e19, np.float32)  # each square is 9e38 > float32's 3.4e38
    with np.errstate(over="ignore"):
        assert np.isinf(np.dot(x, x))  # what a float32 sum of squares gives
    assert same(norm(x), straightforward_norm(x))
    assert math.isfinite(norm(x))


def special(dtype: type, kind: str, size: int = 2 * CHUNK + 4) -> np.ndarray:
    x = sample(dtype, size, seed=2)
    big = float(np.finfo(dtype).max) / 2  # finite, but its square overflows in any dtype
    values = {"finite": None, "nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": big}
    if values[kind] is not None:
        x[CHUNK + 1] = values[kind]
    if kind == "inf":
        x[3] = -np.inf  # inf - inf: NaN, still non-finite
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["finite", "nan", "inf", "-inf", "huge"])
@pytest.mark.parametrize("size", [2 * CHUNK + 4, WHOLE + CHUNK])  # mean_std: whole, chunked
def test_finiteness_and_norms_with_non_finite_and_overflowing_elements(
    dtype: type, kind: str, size: int
) -> None:
    x = special(dtype, kind, size)
    expected = bool(np.isfinite(x).all())
    assert expected is (kind in ("finite", "huge"))
    assert is_finite(x) is expected
    assert is_finite(x.reshape(2, -1)[:, ::2]) is bool(np.isfinite(x.reshape(2, -1)[:, ::2]).all())
    with np.errstate(over="ignore", invalid="ignore"):
        want_mean, want_std = (
            float(np.mean(x, dtype=np.float64)),
            float(np.std(x, dtype=np.float64)),
        )
        got_mean, got_std = mean_std(x)
    # finite data has a finite norm: the huge element's square overflows, the norm does not
    assert same(norm(x), exact_norm(x), NORM_REL[dtype] if kind == "finite" else 1e-12)
    assert same(got_mean, want_mean)
    assert same(got_std, want_std)


@pytest.mark.parametrize("magnitude", [1e200, 1e300, -1e300, 1e-200, 1e-310])
@pytest.mark.parametrize("size", [1, 5, 3 * CHUNK + 5])
def test_norms_of_huge_and_tiny_elements_are_exact(magnitude: float, size: int) -> None:
    """Elements of 1e200 and 1e300 (squares overflow) and of 1e-200 or subnormal (squares
    underflow): within 1e-12 of `math.fsum`'s exact value, never Infinity or 0."""
    rng = np.random.default_rng(size)
    x = rng.uniform(0.5, 1.5, size) * magnitude
    got = norm(x)
    assert math.isfinite(got) and got > 0
    assert got == pytest.approx(exact_norm(x), rel=1e-12, abs=0.0)
    assert norm(x.reshape(1, -1)) == got


def test_none_gradient_counts_as_finite() -> None:
    assert is_finite(None)


@pytest.mark.parametrize(
    "shape",
    [(3, 4), (5, 3, 7), (4, 2, 3, 5), (2, 3, 2, 2, 3), (1, 2, 256, 257), (0, 3, 2, 2)],
)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_count_per_unit_is_count_nonzero_over_the_unit_axes(
    shape: tuple[int, ...], layout: str
) -> None:
    """Per channel (every axis but 1) and per column (rank 2): the same counts as
    np.count_nonzero, including a channel of more than 2**16 positions (summed in int64)
    and a mask that is a strided view."""
    rng = np.random.default_rng(len(shape))
    if layout == "strided":
        mask = rng.random((*shape[:-1], 2 * shape[-1])) > 0.3
        mask = mask[..., ::2]
    else:
        mask = rng.random(shape) > 0.3
    axes = (0,) if mask.ndim == 2 else (0, *range(2, mask.ndim))
    got = count_per_unit(mask, axes)
    assert got.dtype == np.int64
    assert got.tolist() == np.count_nonzero(mask, axis=axes).tolist()
