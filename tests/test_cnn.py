"""Convolutional networks through POST /v1/network against PyTorch (float64 fixtures recorded
by `make oracle`, tests/fixtures/oracle/cnn): the LeNet-like net, the CIFAR-like net with
batchnorm in train and in eval mode, and a conv layer with four filters biased dead. Every
gradient to 1e-10, the loss to 1e-12, the dead filters and per-channel activity PyTorch
counts, parameter totals as torch's `sum(p.numel())`; and the bad layers a user sends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from oracle_models import CNN_MODELS, DEAD_FILTERS, network_body

from gradiag.service.config import MIB, Settings

ORACLE = Path(__file__).resolve().parent / "fixtures" / "oracle" / "cnn"


def post(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/network", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:600]
    answer: dict[str, Any] = response.get_json()
    return answer


def problem(client: FlaskClient, body: dict[str, Any], status: int = 422) -> dict[str, Any]:
    response = client.post("/v1/network", json=body)
    assert response.status_code == status, response.get_data(as_text=True)[:600]
    answer: dict[str, Any] = response.get_json()
    return answer


@pytest.fixture(scope="module", params=sorted(CNN_MODELS))
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], dict[str, Any], Any]:
    """(name, body, torch's facts, torch's arrays) of one recorded model."""
    name = request.param
    facts = json.loads((ORACLE / f"{name}.json").read_text())
    with np.load(ORACLE / f"{name}.npz") as arrays:
        return name, network_body(CNN_MODELS[name]()), facts, dict(arrays)


@pytest.fixture(scope="module")
def answered(
    case: tuple[str, dict[str, Any], dict[str, Any], Any],
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    from gradiag.service import create_app

    # every gradient of a CIFAR batch is a ~120 MB answer: over the default 64 MiB limit
    settings = Settings(max_response_bytes=256 * MIB, max_request_memory_bytes=2048 * MIB)
    client = create_app(settings, TESTING=True).test_client()
    _, body, facts, arrays = case
    return post(client, body), facts, arrays


def test_the_loss_and_every_gradient_are_pytorchs(
    answered: tuple[dict[str, Any], dict[str, Any], Any],
) -> None:
    report, facts, arrays = answered
    assert report["loss"] == pytest.approx(facts["loss"], rel=1e-12)
    # a conv bias in front of a training-mode batchnorm has a gradient of exactly zero on
    # paper, so both sides hold rounding noise (~1e-17): compare on the model's scale
    model_scale = max(float(np.max(np.abs(arrays[name]))) for name in facts["gradients"])
    for name in facts["gradients"]:
        got = np.array(report["nodes"][name]["grad"])
        want = arrays[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * model_scale, err_msg=name)


def test_dead_units_and_channel_activity_are_pytorchs(
    answered: tuple[dict[str, Any], dict[str, Any], Any],
) -> None:
    report, facts, _ = answered
    for layer, want in zip(report["layers"], facts["layers"], strict=True):
        assert layer["type"] == want["type"]
        if "dead_units" in want:
            assert layer["dead_unit_indices"] == want["dead_units"], layer["index"]
        if "channel_active_fraction" in want:
            np.testing.assert_allclose(
                layer["channel_active_fraction"], want["channel_active_fraction"], rtol=1e-12
            )


def test_parameters_are_torchs_count_and_the_name_counts_layers_with_weights(
    answered: tuple[dict[str, Any], dict[str, Any], Any],
) -> None:
    report, facts, _ = answered
    assert report["parameters"]["total"] == facts["parameters_torch"]
    weighted = sum(layer["type"] in ("conv2d", "dense") for layer in report["layers"])
    assert report["name"] == f"{weighted}-layer neural network"


def test_lenet_reports_each_layer_as_c_x_h_x_w(client: FlaskClient) -> None:
    report = post(client, network_body(CNN_MODELS["lenet"](), include=()))
    shapes = [layer["shape"] for layer in report["layers"]]
    assert shapes == [[6, 24, 24], [6, 12, 12], [16, 8, 8], [16, 4, 4], [120], [84], [10]]
    conv = report["layers"][0]
    assert (conv["filters"], conv["fan_in"], conv["parameters"]) == (
        6,
        25,
        {"weights": 150, "biases": 6},
    )
    assert report["parameters"]["neurons"] == 6 + 16 + 120 + 84 + 10
    assert report["layers"][1]["parameters"] == {"weights": 0, "biases": 0}


def test_four_filters_biased_to_minus_five_are_the_dead_ones(client: FlaskClient) -> None:
    report = post(client, network_body(CNN_MODELS["dead_filters"]()))
    conv = report["layers"][0]
    assert conv["dead_unit_indices"] == list(DEAD_FILTERS)
    assert conv["dead_fraction"] == 4 / 16
    assert [conv["channel_active_fraction"][k] for k in DEAD_FILTERS] == [0.0] * 4
    findings = [(f["code"], f["severity"], f["location"]) for f in report["health"]["findings"]]
    assert ("dead_relu", "warn", "layer1") in findings  # 25%: warn at 10%, fail at 50%
    body = network_body(CNN_MODELS["dead_filters"]())
    body["thresholds"] = {"dead_fail": 0.2}
    assert post(client, body)["layers"][0]["status"] == "fail"


def test_a_random_batch_and_drawn_weights_of_a_cnn_float32(client: FlaskClient) -> None:
    body = {
        "input_shape": [3, 16, 16],
        "layers": [
            {"type": "conv2d", "filters": 8, "kernel": 3, "padding": 1},
            {"type": "batchnorm", "activation": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"type": "flatten"},
            {"units": 10, "activation": "linear"},
        ],
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "he", "seed": 3},
        "batch": {"random": {"size": 8, "seed": 3}},
        "dtype": "float32",
    }
    report = post(client, body)
    assert report["parameters"] == {
        "neurons": 18,
        "weights": 8 * 3 * 9 + 8 * 8 * 8 * 10,
        "biases": 18,
        "batchnorm": 16,
        "total": 8 * 3 * 9 + 5120 + 18 + 16,
    }
    assert report["layers"][1]["parameters"] == {"weights": 0, "biases": 0, "batchnorm": 16}
    assert np.isfinite(report["loss"]) and report["dtype"] == "float32"


# --- bad layers are 422s that name them ------------------------------------------------------


def small_cnn(**conv: Any) -> dict[str, Any]:
    return {
        "input_shape": [2, 5, 5],
        "layers": [{"type": "conv2d", "filters": 3, "kernel": 3, **conv}, {"units": 2}],
        "loss": "softmax_cross_entropy",
        "batch": {"random": {"size": 2, "seed": 0}},
    }


@pytest.mark.parametrize(
    ("conv", "words"),
    [
        ({"kernel": 7}, "larger than"),
        ({"kernel": [3, 9], "padding": 1}, "larger than"),
        ({"stride": 0}, "stride"),
    ],
)
def test_a_bad_conv_layer_is_a_422_naming_it(
    client: FlaskClient, conv: dict[str, Any], words: str
) -> None:
    out = problem(client, small_cnn(**conv))
    assert out["errors"][0]["loc"] == ["layers", 0]
    assert "layer 1 (conv2d)" in out["detail"] and words in out["detail"]


def test_a_channel_mismatch_in_the_weights_is_a_422_at_the_weights(client: FlaskClient) -> None:
    body = small_cnn()
    body["weights"] = [
        {"W": np.zeros((3, 1, 3, 3)).tolist(), "b": [0.0] * 3},
        {"W": np.zeros((27, 2)).tolist(), "b": [0.0, 0.0]},
    ]
    out = problem(client, body)
    assert out["errors"][0]["loc"] == ["weights", 0, "W"]
    assert "[3, 2, 3, 3]" in out["detail"]


def test_an_image_into_a_class_loss_without_a_dense_layer_is_a_422(client: FlaskClient) -> None:
    body = small_cnn()
    body["layers"] = body["layers"][:1]
    out = problem(client, body)
    assert out["errors"][0]["loc"] == ["layers", 0]
    assert "scores (N, C)" in out["detail"]


@pytest.mark.parametrize(
    ("settings", "limit"),
    [
        (Settings(max_flops=1_000_000), "max_flops"),
        (Settings(max_scratch_elements=10_000), "max_scratch_elements"),
    ],
)
def test_conv_work_and_im2col_memory_are_limits_checked_before_any_allocation(
    client: FlaskClient, limit: str
) -> None:
    """`settings` overrides conftest's fixture, so `client` has the low limit."""
    body = network_body(CNN_MODELS["lenet"](), include=())
    out = problem(client, body)
    assert out["limit"] == limit
