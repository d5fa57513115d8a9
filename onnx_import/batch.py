"""The batch of an ONNX request: arrays `x` and `y` from a NumPy .npz (read without pickles,
each array's size checked from its header before it is read), or drawn at random for the
model's input; and the targets checked against the loss.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradiag.engine.errors import Loc, ShapeError, ValueDomainError, check_limits
from gradiag.engine.network import CLASS_LOSSES
from gradiag.engine.ops import Array, Shape, bad_class_label
from gradiag.onnx_import.model import ModelError, ValueInfo

NPZ_ARRAYS = ("x", "y")


class BatchFileError(ModelError):
    """An .npz that cannot be read as the batch (422 at `("batch", ...)`)."""


def read_npz(data: bytes, *, max_tensor_elements: int = 0) -> dict[str, Array]:
    """`x` (and `y`) of an .npz file's bytes. Object arrays (pickles) are refused, and an
    array's element count is read from its header and checked before its data is read (a
    compressed member cannot inflate past it: reading stops at the header's count)."""
    loc: Loc = ("batch",)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise BatchFileError(f"the batch is not an .npz file (a zip of .npy arrays): {err}",
                             loc=loc) from None  # fmt: skip
    arrays = {name.removesuffix(".npy"): name for name in names}
    unknown = sorted(set(arrays) - set(NPZ_ARRAYS))
    if unknown:
        raise BatchFileError(f"the batch holds arrays {unknown}; it takes only x and y",
                             loc=(*loc, unknown[0]))  # fmt: skip
    if "x" not in arrays:
        raise BatchFileError("the batch .npz has no array `x`", loc=(*loc, "x"))
    return {
        key: _read_member(archive, member, (*loc, key), max_tensor_elements)
        for key, member in arrays.items()
    }


def _read_member(archive: zipfile.ZipFile, member: str, loc: Loc, max_elements: int) -> Array:
    try:
        with archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            shape, dtype = _read_header(stream, version)
            if dtype.hasobject or dtype.kind not in "biuf":
                raise BatchFileError(
                    f"array {loc[-1]} is of dtype {dtype}; numbers only (no pickled objects)",
                    loc=loc,
                )
            check_limits([("max_tensor_elements", max_elements, math.prod(shape),
                           f"array {loc[-1]} of the batch holds elements:")], loc=loc)  # fmt: skip
        with archive.open(member) as stream:
            array = np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise BatchFileError(f"array {loc[-1]} of the batch cannot be read: {err}",
                             loc=loc) from None  # fmt: skip
    return np.asarray(array)


def _read_header(stream: Any, version: tuple[int, int]) -> tuple[Shape, np.dtype[Any]]:
    """(shape, dtype) of an .npy header (the layout, C or Fortran, does not matter here)."""
    read = HEADER_READERS.get(version, np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(stream)
    return tuple(shape), np.dtype(dtype)


HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0}


def random_shape(source: ValueInfo, size: int | None) -> Shape:
    """The shape a random batch takes: the input's, its first (batch) axis `size` when given;
    every other axis must be known."""
    shape = source.shape
    if shape is None or not shape or any(d is None for d in shape[1:]):
        raise ShapeError(
            f"the model's input {source.name!r} has shape {source.shown()}: a random batch "
            "needs every size but the batch's; send a batch (x, y)",
            loc=("batch",),
            node=source.name,
        )
    first = size if size is not None else shape[0]
    if first is None:
        raise ShapeError(
            f"the model's input {source.name!r} leaves the batch size open: give "
            "`batch.random.size`",
            loc=("batch", "random", "size"),
            node=source.name,
        )
    return (first, *(d for d in shape[1:] if d is not None))


def random_targets(loss: str, scores: Shape, rng: np.random.Generator) -> Array | None:
    """Labels uniform in [0, C) (class losses; -1 or +1 for the binary hinge), targets
    N(0, 1) (mse) or U[0, 1) (bce_with_logits); none for `sum`."""
    draws: Mapping[str, Any] = {
        "softmax_cross_entropy": lambda: rng.integers(0, scores[-1], scores[0]),
        "svm_hinge": lambda: (
            rng.choice([-1.0, 1.0], scores[0])
            if scores[-1] == 1
            else rng.integers(0, scores[-1], scores[0])
        ),
        "mse": lambda: rng.standard_normal(scores),
        "bce_with_logits": lambda: rng.random(scores),
    }
    draw = draws.get(loss)
    return None if draw is None else np.asarray(draw(), np.float64)


def check_targets(loss: str, y: Array | None, scores: Shape, targets: Shape | None) -> Array | None:
    """y in the shape the loss node takes (`targets`); class labels in range. None for
    `sum`."""
    if targets is None:
        return None
    if y is None:
        raise ShapeError(f"the {loss} loss needs targets `y`", loc=("batch", "y"))
    if y.shape != targets and not (y.shape == targets[:1] and targets[1:] == (1,)):
        raise ShapeError(
            f"y has shape {list(y.shape)}; the {loss} loss on the model's output "
            f"{list(scores)} takes {list(targets)}",
            loc=("batch", "y"),
        )
    if loss in CLASS_LOSSES and len(scores) == 2:
        _check_labels(y, scores[1], binary=loss == "svm_hinge" and scores[1] == 1)
    return y.reshape(targets)


def _check_labels(y: Array, classes: int, *, binary: bool) -> None:
    if binary:
        bad = np.flatnonzero(~((y == 1) | (y == -1)))
        row = int(bad[0]) if bad.size else None
        want = "-1 or +1 (svm_hinge on one output unit is the binary hinge)"
    else:
        row = bad_class_label(y, classes)
        want = f"an integer class in [0, {classes})"
    if row is not None:
        raise ValueDomainError(
            f"label {float(y[row])!r} at row {row} is not {want}", loc=("batch", "y", row)
        )
