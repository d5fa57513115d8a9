"""Real exported models through the ONNX front end and POST /v1/onnx, against PyTorch's
answers recorded in tests/fixtures/oracle/onnx_models (README there): every exported model
(mlp, lenet legacy + dynamo, cifar_folded legacy + dynamo, cifar_kept_eval, cifar_kept_train,
reshape legacy + dynamo) on the batch its builder in tests/oracle_models.py draws (the
fixture's checksums prove it is the recorded one), and the LSTM exports, refused.

Tolerances: the loss to 1e-12 relative; every float initializer's gradient to 1e-10
relative; the forward output to 1e-12 (against onnx.reference.ReferenceEvaluator's output,
recorded; this test never runs it). No torch, no model code run here.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import oracle_models as om
import pytest
from flask.testing import FlaskClient
from onnx_helpers import npz, post_onnx

from gradiag.engine.network import Batch
from gradiag.onnx_import.frontend import DiagnosedModel, OnnxOptions, diagnose_model
from gradiag.schemas.onnx import OnnxResponse
from gradiag.service import create_app
from gradiag.service.config import MIB, Settings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oracle" / "onnx_models"
Array = np.ndarray[Any, np.dtype[Any]]

EXPORTS = [
    (name, exporter)
    for name in sorted(om.ONNX_MODELS)
    for exporter in sorted(json.loads((FIXTURES / f"{name}.json").read_text())["exports"])
]
FOLDED = ("cifar_folded",)  # BatchNorm folded into the convs: the torch module's counts differ


def fixture(name: str) -> tuple[dict[str, Any], dict[str, Array]]:
    summary = json.loads((FIXTURES / f"{name}.json").read_text())
    with np.load(FIXTURES / f"{name}.npz") as npz:
        return summary, {k: npz[k] for k in npz.files}


@cache
def model_and_batch(name: str) -> om.OracleModel:
    model = om.ONNX_MODELS[name]()
    recorded = fixture(name)[0]["checksums"]
    assert recorded["x"] == pytest.approx(om.checksum(model.x), rel=1e-12)
    assert recorded["y"] == pytest.approx(om.checksum(model.y), rel=1e-12)
    return model


@cache
def diagnosed(name: str, exporter: str) -> DiagnosedModel:
    summary, _ = fixture(name)
    model = model_and_batch(name)
    data = (FIXTURES / summary["exports"][exporter]["file"]).read_bytes()
    options = OnnxOptions(loss=summary["loss_name"], gradients=True)
    return diagnose_model(data, Batch(model.x, model.y), options)


def grads_by_name(done: DiagnosedModel) -> dict[str, Array]:
    ids = done.result.program.node_ids()
    return {node: done.result.grad(i) for i, node in enumerate(ids) if node in done.lowered.params}


def assert_gradients(got: dict[str, Array], export: dict[str, Any], arrays: dict[str, Array]):
    """Every float initializer's gradient, in its own layout, to 1e-10 relative. Values that
    are zero on paper (a conv bias before a train-mode batchnorm: the batch mean removes it;
    PyTorch's is ~1e-16, ours too, but not the same 1e-16) are held to an absolute floor of
    1e-12 times the model's largest gradient, far below anything a diagnosis reads. The
    running statistics of a train-mode batchnorm, which the output does not read, get an
    exact zero, as the fixture records (`zero_grad_buffer`)."""
    initializers = export["initializers"]
    assert set(got) == set(initializers)
    floor = 1e-12 * max(float(np.max(np.abs(arrays[e["npz"]]))) for e in initializers.values())
    worst = 0.0
    for init, entry in initializers.items():
        want, grad = arrays[entry["npz"]], got[init]
        assert grad.shape == want.shape == tuple(entry["shape"]), init
        if entry["zero_grad_buffer"]:
            assert not np.any(grad), init
            continue
        np.testing.assert_allclose(grad, want, rtol=1e-10, atol=floor, err_msg=init)
        worst = max(worst, float(np.max(np.abs(grad - want) / np.maximum(np.abs(want), floor))))
    return worst


@pytest.mark.parametrize(("name", "exporter"), EXPORTS)
def test_loss_gradients_and_forward_match_pytorch(name: str, exporter: str) -> None:
    summary, arrays = fixture(name)
    export = summary["exports"][exporter]
    done = diagnosed(name, exporter)
    assert done.health.loss == pytest.approx(export["loss"], rel=1e-12)
    assert_gradients(grads_by_name(done), export, arrays)
    ids = done.result.program.node_ids()
    assert done.lowered.scores == export["output"] and done.source.name == export["input"]
    forward = done.result.value(ids.index(export["output"]))
    reference = arrays[f"forward.{exporter}"]
    np.testing.assert_allclose(
        forward, reference, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(reference)))
    )


@pytest.mark.parametrize(("name", "exporter"), EXPORTS)
def test_dead_units_and_active_channels_are_pytorchs(name: str, exporter: str) -> None:
    export = fixture(name)[0]["exports"][exporter]
    layers = {layer.name: layer for layer in diagnosed(name, exporter).health.layers}
    relus = {name: layer for name, layer in layers.items() if layer.layer.op == "relu"}
    assert set(relus) == set(export["relu_nodes"])
    for node, want in export["relu_nodes"].items():
        layer = relus[node]
        assert layer.flagged_units("dies") == want["dead_units"], node
        assert layer.units == want["units"]
        if "channel_active_fraction" in want:
            assert layer.channel_active_fraction == want["channel_active_fraction"], node


@pytest.mark.parametrize(("name", "exporter"), EXPORTS)
def test_parameter_totals_are_the_float_initializers(name: str, exporter: str) -> None:
    """The contract counts every float initializer (running statistics too); less those,
    the count is PyTorch's `sum(p.numel())` of the exported module, except where BatchNorm
    was folded away (then it is the folded mirror's; the kept eval mirror counts the running
    statistics as parameters, as the contract does)."""
    summary = fixture(name)[0]
    export = summary["exports"][exporter]
    totals = diagnosed(name, exporter).health.parameters
    assert totals.total == export["float_initializer_elements"]
    assert totals.tensors == len(export["initializers"])
    trainable = totals.total - totals.running_stats
    mirror = totals.total if name == "cifar_kept_eval" else trainable
    assert mirror == export["parameters_mirror"]
    if name not in FOLDED:
        assert trainable == summary["parameters_torch"]


def test_the_kept_batchnorms_are_lowered_by_training_mode() -> None:
    ops = {
        mode: {spec.op for spec in diagnosed(f"cifar_kept_{mode}", "legacy").lowered.nodes}
        for mode in ("eval", "train")
    }
    assert "batchnorm_eval" in ops["eval"] and "batchnorm" not in ops["eval"]
    assert "batchnorm" in ops["train"] and "batchnorm_eval" not in ops["train"]
    totals = diagnosed("cifar_kept_eval", "legacy").health.parameters
    assert (totals.batchnorm, totals.running_stats) == (2 * 48, 2 * 48)


# --- over HTTP ---------------------------------------------------------------------------


def post_model(
    client: FlaskClient, model: bytes, request: dict[str, Any], x: Array, y: Array | None
) -> Any:
    batch = npz(x=x) if y is None else npz(x=x, y=y)
    return post_onnx(client, model, request, batch)


@pytest.fixture(scope="module")
def big_client() -> FlaskClient:
    """Every gradient of a CIFAR batch is a ~130 MB answer: over the default 64 MiB limit."""
    settings = Settings(max_response_bytes=256 * MIB, max_request_memory_bytes=2048 * MIB)
    return create_app(settings, TESTING=True).test_client()


@pytest.mark.parametrize(("name", "exporter"), EXPORTS)
def test_over_http_the_report_holds_pytorchs_numbers(
    big_client: FlaskClient, name: str, exporter: str
) -> None:
    client = big_client
    summary, arrays = fixture(name)
    export = summary["exports"][exporter]
    model = model_and_batch(name)
    request = {"loss": summary["loss_name"], "include": ["gradients"]}
    response = post_model(
        client, (FIXTURES / export["file"]).read_bytes(), request, model.x, model.y
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    report = OnnxResponse.model_validate_json(response.get_data())
    assert report.loss == pytest.approx(export["loss"], rel=1e-12)
    assert report.model.input == export["input"] and report.model.output == export["output"]
    assert report.batch_size == summary["batch_size"]
    assert report.parameters.total == export["float_initializer_elements"]
    assert report.nodes is not None
    got = {init: np.array(report.nodes[init].grad) for init in export["initializers"]}
    assert_gradients(got, export, arrays)
    dead = {
        layer.name: layer.dead_unit_indices for layer in report.layers if layer.op_type == "Relu"
    }
    assert dead == {node: want["dead_units"] for node, want in export["relu_nodes"].items()}
    assert [layer.name for layer in report.layers] == [
        node for node, op in export["nodes"] if op in ("Relu", "Conv", "Gemm", "BatchNormalization")
    ]
    assert report.nodes["loss"].value == pytest.approx(export["loss"], rel=1e-12)


def test_lenet_through_onnx_and_network_gives_one_diagnosis(client: FlaskClient) -> None:
    """The same net and batch as /v1/network's body and as an ONNX export: one loss, the same
    dead units, the same gradient norms layer for layer (Gemm's weight is W transposed)."""
    model = om.lenet()
    network = client.post("/v1/network", json=om.network_body(model)).get_json()
    data = (FIXTURES / "lenet.legacy.onnx").read_bytes()
    onnx = post_model(client, data, {"loss": "softmax_cross_entropy"}, model.x, model.y)
    onnx_report = onnx.get_json()
    assert onnx_report["loss"] == pytest.approx(network["loss"], rel=1e-12)
    weighted = [layer for layer in onnx_report["layers"] if layer["initializers"]]
    with_w = [layer for layer in network["layers"] if layer["grad_norm"].get("W") is not None]
    assert len(weighted) == len(with_w) == 5
    for ours, theirs in zip(weighted, with_w, strict=True):
        for part in ("W", "b", "z"):
            assert ours["grad_norm"][part] == pytest.approx(theirs["grad_norm"][part], rel=1e-10)
        assert ours["weight_norm"] == pytest.approx(theirs["weight_norm"], rel=1e-12)
    relus = [layer["dead_units"] for layer in onnx_report["layers"] if layer["op_type"] == "Relu"]
    assert relus == [
        layer["dead_units"] for layer in network["layers"] if layer["activation"] == "relu"
    ]
    assert onnx_report["name"] == network["name"] == "5-layer neural network"
    assert onnx_report["health"]["status"] == network["health"]["status"] == "warn"
    assert [f["code"] for f in onnx_report["health"]["findings"]] == ["dead_relu", "dead_relu"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_lstm_is_refused_naming_every_unsupported_op_and_its_nodes(
    client: FlaskClient, exporter: str
) -> None:
    recorded = json.loads((FIXTURES / "lstm.json").read_text())["exports"][exporter]
    x = om.lstm_batch()
    assert om.checksum(x) == pytest.approx(
        json.loads((FIXTURES / "lstm.json").read_text())["batch_checksum"], rel=1e-12
    )
    data = (FIXTURES / recorded["file"]).read_bytes()
    response = post_model(client, data, {"loss": "mse"}, x, None)
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    problem = response.get_json()
    assert problem["unsupported"] == recorded["unsupported"]
    assert "LSTM" in problem["detail"]
    by_op = {error["op_type"]: error for error in problem["errors"]}
    assert set(by_op) == set(recorded["unsupported"])
    nodes = [name for name, _ in recorded["nodes"]]
    for op, names in recorded["unsupported"].items():
        assert by_op[op]["nodes"] == names
        assert by_op[op]["node"] == names[0]
        assert by_op[op]["loc"] == ["model", "graph", "node", nodes.index(names[0])]


def test_the_fixture_files_are_what_the_tests_read() -> None:
    assert len(EXPORTS) == 9
    for name, exporter in EXPORTS:
        export = fixture(name)[0]["exports"][exporter]
        assert export["opset"] >= 13
        assert math.isfinite(export["loss"])
