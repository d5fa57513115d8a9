"""A PyTorch `nn.Sequential` as a /v1/network body: the glue a user would otherwise write.

    from gradiag.client import Client
    from gradiag.client.pytorch import network_body

    body = network_body(model, x, y, loss="softmax_cross_entropy")
    report = Client("http://127.0.0.1:8000").network(body)

`nn.Linear.weight` is (out, in); gradiag's dense W is (fan_in, units) = weight.T, so it is
transposed here (a square layer posted untransposed would pass silently and be wrong). An
activation module (ReLU, LeakyReLU, Sigmoid, Tanh) becomes the `activation` of the layer
before it. Conv2d, MaxPool2d, AvgPool2d, BatchNorm1d/2d (eval mode: its running statistics;
train mode: batch statistics) and Flatten map to gradiag's layers; Dropout and Identity are
skipped in eval mode. Anything else is refused by name before anything is sent.

torch is not imported here: modules are read by their class name and attributes, so this
module imports without torch (the `torch` extra installs it for users who have models).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

ACTIVATIONS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}
SUPPORTED = (
    "Linear",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Flatten",
    *ACTIVATIONS,
    "Dropout",
    "Identity",
)


class UnsupportedLayer(ValueError):
    """A module gradiag cannot express; the message names it and its place."""


def network_body(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: str,
    l2: float = 0.0,
    l2_biases: bool = False,
    include: Iterable[str] = (),
) -> dict[str, Any]:
    """The /v1/network body of `model` (an nn.Sequential, or any iterable of modules) on
    the batch `x` (N, ...) with targets `y` (omit for the `sum` loss)."""
    x_array = _array(x)
    layers: list[dict[str, Any]] = []
    weights: list[dict[str, Any]] = []
    for place, module in enumerate(_children(model)):
        kind = type(module).__name__
        converter = _CONVERTERS.get(kind)
        if converter is None:
            raise UnsupportedLayer(
                f"module {place} ({kind}) is not supported; gradiag takes {', '.join(SUPPORTED)}"
            )
        converter(module, place, layers, weights)
    shape = list(x_array.shape[1:])
    body: dict[str, Any] = {"input_dim": shape[0]} if len(shape) == 1 else {"input_shape": shape}
    body.update(layers=layers, loss=loss, weights=weights, batch={"x": x_array.tolist()})
    if y is not None:
        body["batch"]["y"] = _array(y).tolist()
    if l2:
        body["l2"] = l2
    if l2_biases:
        body["l2_biases"] = True
    if include:
        body["include"] = list(include)
    return body


def _children(model: Any) -> list[Any]:
    children = getattr(model, "children", None)
    return list(children()) if callable(children) else list(model)


def _array(value: Any) -> np.ndarray:
    """A tensor (detached, on the CPU) or an array as float64 NumPy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _bias(module: Any, size: int) -> list[float]:
    bias = getattr(module, "bias", None)
    return [0.0] * size if bias is None else _array(bias).tolist()


def _linear(module: Any, place: int, layers: list[Any], weights: list[Any]) -> None:
    W = _array(module.weight).T  # (out, in) -> (fan_in, units)
    layers.append({"type": "dense", "units": W.shape[1], "activation": "linear"})
    weights.append({"W": W.tolist(), "b": _bias(module, W.shape[1])})


def _conv(module: Any, place: int, layers: list[Any], weights: list[Any]) -> None:
    for name, plain in (("groups", 1), ("dilation", (1, 1)), ("padding_mode", "zeros")):
        if getattr(module, name, plain) not in (plain, 1):
            raise UnsupportedLayer(f"module {place} (Conv2d): {name} other than {plain!r}")
    if isinstance(module.padding, str):
        raise UnsupportedLayer(f"module {place} (Conv2d): padding {module.padding!r}")
    W = _array(module.weight)  # (F, C, kh, kw), as gradiag's
    layers.append(
        {
            "type": "conv2d",
            "filters": W.shape[0],
            "kernel": list(W.shape[2:]),
            "stride": list(_pair(module.stride)),
            "padding": list(_pair(module.padding)),
            "activation": "linear",
        }
    )
    weights.append({"W": W.tolist(), "b": _bias(module, W.shape[0])})


def _pool(module: Any, place: int, layers: list[Any], weights: list[Any]) -> None:
    kind = type(module).__name__
    if getattr(module, "ceil_mode", False) or _pair(getattr(module, "dilation", 1)) != (1, 1):
        raise UnsupportedLayer(f"module {place} ({kind}): ceil_mode or dilation")
    layer: dict[str, Any] = {
        "type": "maxpool2d" if kind == "MaxPool2d" else "avgpool2d",
        "kernel": list(_pair(module.kernel_size)),
        "padding": list(_pair(module.padding)),
    }
    if module.stride is not None:
        layer["stride"] = list(_pair(module.stride))
    if kind == "AvgPool2d" and not getattr(module, "count_include_pad", True):
        raise UnsupportedLayer(f"module {place} (AvgPool2d): count_include_pad=False")
    layers.append(layer)
    weights.append({})


def _batchnorm(module: Any, place: int, layers: list[Any], weights: list[Any]) -> None:
    mode = "train" if getattr(module, "training", False) else "eval"
    layers.append(
        {"type": "batchnorm", "mode": mode, "eps": float(module.eps), "activation": "linear"}
    )
    params = {"gamma": _array(module.weight).tolist(), "beta": _array(module.bias).tolist()}
    if mode == "eval":
        params["running_mean"] = _array(module.running_mean).tolist()
        params["running_var"] = _array(module.running_var).tolist()
    weights.append(params)


def _flatten(module: Any, place: int, layers: list[Any], weights: list[Any]) -> None:
    if getattr(module, "start_dim", 1) != 1 or getattr(module, "end_dim", -1) != -1:
        raise UnsupportedLayer(f"module {place} (Flatten): only start_dim=1, end_dim=-1")
    layers.append({"type": "flatten"})
    weights.append({})


def _activation(module: Any, place: int, layers: list[Any], weights: list[Any]) -> None:
    kind = type(module).__name__
    if not layers or layers[-1].get("activation") != "linear":
        raise UnsupportedLayer(
            f"module {place} ({kind}) must follow a Linear, Conv2d or BatchNorm module"
        )
    layers[-1]["activation"] = ACTIVATIONS[kind]
    if kind == "LeakyReLU":
        layers[-1]["alpha"] = float(module.negative_slope)


def _skip(module: Any, place: int, layers: list[Any], weights: list[Any]) -> None:
    if getattr(module, "training", False) and getattr(module, "p", 0):
        raise UnsupportedLayer(f"module {place} (Dropout) in train mode: call model.eval()")


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


_CONVERTERS = {
    "Linear": _linear,
    "Conv2d": _conv,
    "MaxPool2d": _pool,
    "AvgPool2d": _pool,
    "BatchNorm1d": _batchnorm,
    "BatchNorm2d": _batchnorm,
    "Flatten": _flatten,
    **dict.fromkeys(ACTIVATIONS, _activation),
    "Dropout": _skip,
    "Identity": _skip,
}
