"""gradiag.client.pytorch: an nn.Sequential as a /v1/network body. torch is not imported by
the test suite: the modules here are stand-ins with torch's class names and attributes (the
helper reads nothing else), holding NumPy arrays where torch holds tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from oracle_models import micrograd_moons

from gradiag.client.pytorch import UnsupportedLayer, network_body

ORACLE = Path(__file__).resolve().parent / "fixtures" / "oracle" / "micrograd_demo"


def module(kind: str, **attrs: Any) -> Any:
    """A stand-in module: an instance of a class named `kind` with these attributes."""
    instance = type(kind, (), {})()
    instance.__dict__.update({"training": False, **attrs})
    return instance


def linear(W: np.ndarray, b: np.ndarray | None) -> Any:
    return module("Linear", weight=W.T.copy(), bias=b)  # torch keeps (out, in)


def test_the_micrograd_demo_through_the_helper(client: FlaskClient) -> None:
    model = micrograd_moons()
    w = model.weights
    sequential = [
        linear(w[0]["W"], w[0]["b"]),
        module("ReLU"),
        linear(w[1]["W"], w[1]["b"]),
        module("ReLU"),
        linear(w[2]["W"], w[2]["b"]),
    ]
    body = network_body(
        sequential, model.x, model.y, loss="svm_hinge", l2=model.l2, l2_biases=True,
        include=["gradients"],
    )  # fmt: skip
    assert body["layers"][0] == {"type": "dense", "units": 16, "activation": "relu"}
    assert np.array(body["weights"][0]["W"]).shape == (2, 16)  # transposed back
    report = client.post("/v1/network", json=body).get_json()
    with np.load(ORACLE / "moons.npz") as arrays:
        for i in range(1, 4):
            for p in ("W", "b"):
                want = arrays[f"micrograd.layer{i}.{p}"]
                got = np.array(report["nodes"][f"layer{i}.{p}"]["grad"])
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    facts = json.loads((ORACLE / "moons.json").read_text())
    assert report["loss"] == pytest.approx(facts["micrograd"]["loss"], rel=1e-12)


def test_a_square_layer_is_transposed() -> None:
    W = np.array([[1.0, 2.0], [3.0, 4.0]])  # gradiag's (fan_in, units)
    body = network_body([linear(W, None)], np.zeros((1, 2)), loss="sum")
    assert body["weights"][0] == {"W": W.tolist(), "b": [0.0, 0.0]}


def test_conv_pool_batchnorm_flatten_and_leaky_relu() -> None:
    conv = module(
        "Conv2d", weight=np.ones((4, 3, 3, 3)), bias=None, stride=(1, 1), padding=(1, 1),
        groups=1, dilation=(1, 1), padding_mode="zeros",
    )  # fmt: skip
    bn = module(
        "BatchNorm2d", weight=np.ones(4), bias=np.zeros(4), running_mean=np.zeros(4),
        running_var=np.ones(4), eps=1e-5,
    )  # fmt: skip
    pool = module("MaxPool2d", kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
    sequential = [
        conv,
        bn,
        module("LeakyReLU", negative_slope=0.1),
        pool,
        module("Flatten", start_dim=1, end_dim=-1),
        module("Dropout", p=0.5),
        linear(np.ones((16, 2)), np.zeros(2)),
    ]
    body = network_body(sequential, np.zeros((2, 3, 4, 4)), [0, 1], loss="softmax_cross_entropy")
    assert body["input_shape"] == [3, 4, 4]
    assert [layer["type"] for layer in body["layers"]] == [
        "conv2d", "batchnorm", "maxpool2d", "flatten", "dense",
    ]  # fmt: skip
    assert body["layers"][1]["activation"] == "leaky_relu" and body["layers"][1]["alpha"] == 0.1
    assert set(body["weights"][1]) == {"gamma", "beta", "running_mean", "running_var"}
    assert body["weights"][2] == body["weights"][3] == {}


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ([module("LSTM")], "module 0 (LSTM) is not supported"),
        ([module("ReLU")], "module 0 (ReLU) must follow a Linear"),
        ([module("Dropout", p=0.5, training=True)], "call model.eval()"),
    ],
)
def test_unsupported_modules_are_refused_by_name(modules: list[Any], message: str) -> None:
    with pytest.raises(UnsupportedLayer, match=message.replace("(", r"\(").replace(")", r"\)")):
        network_body(modules, np.zeros((1, 2)), loss="sum")
