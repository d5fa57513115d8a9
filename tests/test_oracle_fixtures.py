"""The whole-model oracle fixtures (tests/fixtures/oracle/{cnn,micrograd_demo,training,
onnx_models}) and the NumPy builders of tests/oracle_models.py that regenerate their inputs.

No torch here (`make oracle` recorded what PyTorch answered). These tests check that each
fixture loads with its documented keys and shapes, that the builders still draw exactly the
inputs it was recorded on (its checksums), that each request body is valid JSON in the
contract's form, and that independent NumPy references agree with PyTorch's numbers: a conv
forward for the layouts, micrograd against torch, and the SGD loop of the training what-if.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import oracle_models as om
import pytest
from flask.testing import FlaskClient
from numpy.lib.stride_tricks import sliding_window_view

from gradiag.schemas.network import NetworkRequest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oracle"
Array = np.ndarray[Any, np.dtype[Any]]


def load(subject: str, name: str) -> tuple[dict[str, Any], dict[str, Array]]:
    """A fixture's json summary and npz arrays."""
    summary = json.loads((FIXTURES / subject / f"{name}.json").read_text())
    with np.load(FIXTURES / subject / f"{name}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return summary, arrays


def assert_checksums(recorded: dict[str, Any], model: om.OracleModel) -> None:
    """The builder regenerates the very inputs the fixture was recorded on."""
    now = om.checksums(model)
    assert recorded["x"] == pytest.approx(now["x"], rel=1e-12)
    assert recorded["y"] == pytest.approx(now["y"], rel=1e-12)
    assert recorded["params"].keys() == now["params"].keys()
    for name, sums in now["params"].items():
        assert recorded["params"][name] == pytest.approx(sums, rel=1e-12, abs=1e-300), name


def learnable(model: om.OracleModel) -> dict[str, Array]:
    """The parameters that get gradients: W, b, gamma, beta (not the running stats)."""
    return {k: v for k, v in model.params().items() if not k.split(".")[1].startswith("running")}


# --- a NumPy reference forward of the wire form ------------------------------------------


def numpy_forward(model: om.OracleModel) -> tuple[Array, dict[int, Array], dict[int, Array]]:
    """scores, and per layer index its pre-activation and output, computed from the wire form
    and gradiag's layouts alone: the check that the builders' layouts are torch's."""
    a, pre, out = model.x, {}, {}
    for i, (layer, w) in enumerate(zip(model.layers, model.weights, strict=True), 1):
        z = _layer(layer, w, a)
        pre[i] = z
        a = np.maximum(z, 0.0) if layer.get("activation") == "relu" else z
        out[i] = a
    return a, pre, out


def _layer(layer: dict[str, Any], w: dict[str, Array], a: Array) -> Array:
    kind = layer.get("type", "dense")
    if kind == "conv2d":
        k, p = layer["kernel"], layer["padding"]
        padded = np.pad(a, ((0, 0), (0, 0), (p, p), (p, p)))
        windows = sliding_window_view(padded, (k, k), axis=(2, 3))  # (N, C, H, W, k, k)
        z = np.tensordot(windows, w["W"], axes=([1, 4, 5], [1, 2, 3]))  # (N, H, W, F)
        return np.asarray(z.transpose(0, 3, 1, 2) + w["b"][None, :, None, None])
    if kind == "batchnorm":
        if layer["mode"] == "train":
            mean, var = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))  # biased variance
        else:
            mean, var = w["running_mean"], w["running_var"]
        scale = w["gamma"] / np.sqrt(var + 1e-5)
        return np.asarray(
            (a - mean[:, None, None]) * scale[:, None, None] + w["beta"][:, None, None]
        )
    if kind in ("maxpool2d", "avgpool2d"):
        n, c, h, wd = a.shape
        k = layer["kernel"]
        blocks = a.reshape(n, c, h // k, k, wd // k, k)
        return np.asarray(
            blocks.max(axis=(3, 5)) if kind == "maxpool2d" else blocks.mean(axis=(3, 5))
        )
    return np.asarray(a.reshape(len(a), -1) @ w["W"] + w["b"])


def dead(pre: Array) -> list[int]:
    axes = (0,) if pre.ndim == 2 else (0, 2, 3)
    return [int(j) for j in np.flatnonzero(np.all(pre <= 0, axis=axes))]


# --- cnn ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(om.CNN_MODELS))
def test_cnn_fixture_matches_builder_and_numpy_forward(name: str) -> None:
    model = om.CNN_MODELS[name]()
    summary, arrays = load("cnn", name)
    assert_checksums(summary["checksums"], model)
    params = learnable(model)
    assert set(arrays) == {"scores", *params}
    for key, value in params.items():
        assert arrays[key].shape == value.shape and arrays[key].dtype == np.float64, key
        assert np.all(np.isfinite(arrays[key])) and np.any(arrays[key] != 0), key
    assert summary["parameters_torch"] == sum(v.size for v in params.values())
    scores, pre, out = numpy_forward(model)
    np.testing.assert_allclose(arrays["scores"], scores, rtol=1e-10, atol=1e-12)
    loss, _ = om.softmax_cross_entropy(arrays["scores"], model.y)
    assert summary["loss"] == pytest.approx(loss, rel=1e-12)
    for report in summary["layers"]:
        i = report["index"]
        if model.layers[i - 1].get("activation") == "relu":
            assert report["dead_units"] == dead(pre[i])
        if report["type"] in ("conv2d", "batchnorm"):
            active = (out[i] > 0).mean(axis=(0, 2, 3))
            assert report["channel_active_fraction"] == pytest.approx(active, abs=1e-12)


def test_cnn_numbers_that_the_features_will_be_held_to() -> None:
    lenet, _ = load("cnn", "lenet")
    assert lenet["parameters_torch"] == 44426  # 156 + 2416 + 30840 + 10164 + 850
    cifar = load("cnn", "cifar_train")[0]
    assert cifar["parameters_torch"] == 448 + 32 + 4640 + 64 + 20490  # BN: gamma, beta only
    dead_filters, arrays = load("cnn", "dead_filters")
    assert dead_filters["layers"][0]["dead_units"] == list(om.DEAD_FILTERS)
    for j in om.DEAD_FILTERS:  # a dead filter passes no gradient to its weights
        assert dead_filters["layers"][0]["channel_active_fraction"][j] == 0.0
        assert not np.any(arrays["layer1.W"][j]) and arrays["layer1.b"][j] == 0.0
    assert load("cnn", "cifar_eval")[0]["loss"] != cifar["loss"]  # the two modes differ


# --- micrograd ----------------------------------------------------------------------------


def test_micrograd_and_torch_agree_within_1e12() -> None:
    model = om.micrograd_moons()
    summary, arrays = load("micrograd_demo", "moons")
    assert_checksums(summary["checksums"], model)
    assert summary["micrograd"]["loss"] == pytest.approx(summary["torch"]["loss"], abs=1e-12)
    for name, value in model.params().items():
        mg, tr = arrays[f"micrograd.{name}"], arrays[f"torch.{name}"]
        assert mg.shape == tr.shape == value.shape, name
        np.testing.assert_allclose(mg, tr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(arrays["micrograd.scores"], arrays["torch.scores"], atol=1e-12)
    assert summary["torch"]["parameters_torch"] == 2 * 16 + 16 + 16 * 16 + 16 + 16 + 1


def test_micrograd_network_body_means_the_demo_loss() -> None:
    """gradiag's svm_hinge on one unit plus 0.5 * l2 * sum(p^2) with l2_biases is the demo's
    loss; and make_moons draws what sklearn's does (two half circles, noise 0.1)."""
    model = om.micrograd_moons()
    summary, _ = load("micrograd_demo", "moons")
    body = network_body_json(model)
    assert body["loss"] == "svm_hinge" and body["l2"] == 2e-4 and body["l2_biases"] is True
    assert sorted(set(body["batch"]["y"])) == [-1.0, 1.0]
    scores, pre, _ = numpy_forward(model)
    hinge = np.maximum(0.0, 1.0 - model.y * scores[:, 0]).mean()
    penalty = 0.5 * body["l2"] * sum(float(np.sum(v**2)) for v in model.params().values())
    assert hinge + penalty == pytest.approx(summary["torch"]["loss"], rel=1e-12)
    assert {str(i): dead(pre[i]) for i in (1, 2)} == summary["torch"]["dead_units"]
    x, y = om.make_moons(100, 0.1, seed=0)
    assert x.shape == (100, 2) and np.sum(y == 1) == 50 == np.sum(y == -1)
    # -1: the upper unit half circle about (0, 0); +1: the lower one about (1, 0.5); noise 0.1
    inner = y > 0
    radius = np.hypot(x[:, 0] - inner, x[:, 1] - 0.5 * inner)
    assert np.all(np.abs(radius - 1.0) < 0.5)
    assert np.mean(x[~inner, 1]) > 0.4 > -0.4 > np.mean(x[inner, 1] - 0.5)


def test_micrograd_graph_body_gives_micrograds_gradients(client: FlaskClient) -> None:
    """The demo as a tensor graph, posted to today's /v1/graph: micrograd's loss and
    gradients to 1e-12."""
    model = om.micrograd_moons()
    summary, arrays = load("micrograd_demo", "moons")
    response = client.post("/v1/graph", json=om.micrograd_graph_body(model))
    assert response.status_code == 200, response.get_data(as_text=True)
    report = response.get_json()
    assert report["output"]["value"] == pytest.approx(summary["micrograd"]["loss"], abs=1e-12)
    for i in (1, 2, 3):
        for p in ("W", "b"):
            grad = np.array(report["nodes"][f"{p}{i}"]["grad"])
            np.testing.assert_allclose(grad, arrays[f"micrograd.layer{i}.{p}"], atol=1e-12)


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_training_exact_numpy_sgd_reproduces_torch(momentum: float) -> None:
    model = om.training_exact(momentum)
    summary, arrays = load("training", model.name)
    assert_checksums(summary["checksums"], model)
    steps = om.TRAIN_EXACT["steps"]
    assert arrays["losses"].shape == arrays["data_losses"].shape == (steps,)
    assert arrays["update_ratio"].shape == (steps, 3)
    assert arrays["dead_units_minibatch"].shape == (steps, 2)
    assert summary["train"] == model.train and summary["l2"] == 1e-3
    ref = om.sgd_reference(model)
    np.testing.assert_allclose(ref["losses"], arrays["losses"], rtol=1e-12)
    for i, w in enumerate(ref["params"], 1):
        for k in ("W", "b"):
            np.testing.assert_allclose(w[k], arrays[f"layer{i}.{k}"], rtol=0, atol=1e-12)
    assert ref["dead_fraction"] == summary["final_dead_fraction"]
    # the loss the report gives with the final weights: the whole 256-example batch
    scores, _, _ = om.mlp_forward(ref["params"], model.x)
    data_loss, _ = om.softmax_cross_entropy(scores, model.y)
    penalty = 0.5 * model.l2 * sum(float(np.sum(w["W"] ** 2)) for w in ref["params"])
    assert data_loss + penalty == pytest.approx(summary["final_loss_full_batch"], rel=1e-12)


def test_training_steps_are_consecutive_slices_of_each_epochs_permutation() -> None:
    batches = om.minibatches(7, 10, 4, 7)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    rng = np.random.default_rng(7)
    first, second = rng.permutation(10), rng.permutation(10)
    assert np.array_equal(np.concatenate(batches[:3]), first)
    assert np.array_equal(np.concatenate(batches[3:6]), second)


def test_step_zero_loss_is_what_todays_service_answers(client: FlaskClient) -> None:
    """Step 0 of the exact run, posted without `train` on its first minibatch, weights drawn
    by gradiag's own `init` (the builder's he_init is gradiag's init_weights)."""
    model = om.training_exact(0.0)
    _, arrays = load("training", model.name)
    assert model.train is not None
    idx = om.minibatches(model.train["seed"], len(model.x), model.train["batch_size"], 1)[0]
    body = om.network_body(model, explicit_weights=False, include=())
    del body["train"]
    body["batch"] = {"x": model.x[idx].tolist(), "y": [int(v) for v in model.y[idx]]}
    response = client.post("/v1/network", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["loss"] == pytest.approx(arrays["losses"][0], rel=1e-12)


def test_sweep_fixture_and_numpy_reference() -> None:
    summary, arrays = load("training", "sweep")
    lrs, seeds = list(om.SWEEP_LRS), list(om.SWEEP_SEEDS)
    assert arrays["lrs"].tolist() == lrs and arrays["seeds"].tolist() == seeds
    assert arrays["dead_fraction"].shape == (4, 5, 2)
    assert arrays["losses"].shape == (4, 5, om.SWEEP["steps"])
    assert arrays["diverged"].dtype == np.bool_ and arrays["diverged"].shape == (4, 5)
    means = arrays["dead_fraction"].mean(axis=1)
    for a, lr in enumerate(lrs):
        assert summary["mean_dead_fraction"][f"{lr:g}"] == pytest.approx(means[a], abs=1e-15)
    # more learning rate, more dead units in layer 1 (torch: about 6%, 12%, 55%, 91%)
    assert list(means[:, 0]) == sorted(means[:, 0]) and means[3, 0] > 0.8 > 0.1 > means[0, 0]
    for key, x_sums in summary["x_checksums"].items():
        lr, seed = key[2:].split("_s")
        model = om.training_sweep(float(lr), int(seed))
        assert x_sums == pytest.approx(om.checksum(model.x), rel=1e-12), key


def test_sweep_body_is_one_request_per_seed() -> None:
    body = om.sweep_body(3)
    assert body["train"]["lr"] == [0.1, 0.5, 1.0, 2.0] and body["train"]["seed"] == 3
    assert body["train"]["momentum"] == 0.0 and "l2" not in body
    assert body["batch"]["x"] == om.training_sweep(2.0, 3).x.tolist()


@pytest.mark.parametrize(("lr", "seed"), [(0.1, 0), (1.0, 2)])
def test_numpy_sgd_reproduces_the_sweeps_dead_fractions(lr: float, seed: int) -> None:
    """The NumPy loop the training feature will be compared with gives torch's final dead
    fractions (every pair agrees; two are checked to keep the suite fast)."""
    _, arrays = load("training", "sweep")
    a, b = om.SWEEP_LRS.index(lr), om.SWEEP_SEEDS.index(seed)
    ref = om.sgd_reference(om.training_sweep(lr, seed))
    assert ref["dead_fraction"] == arrays["dead_fraction"][a, b].tolist()
    np.testing.assert_allclose(ref["losses"], arrays["losses"][a, b], rtol=1e-10)


# --- onnx ---------------------------------------------------------------------------------

ONNX = FIXTURES / "onnx_models"


@pytest.mark.parametrize("name", sorted(om.ONNX_MODELS))
def test_onnx_fixture_keys_shapes_and_forward(name: str) -> None:
    model = om.ONNX_MODELS[name]()
    summary, arrays = load("onnx_models", name)
    assert_checksums(summary["checksums"], model)
    assert summary["batch_size"] == len(model.x) and "legacy" in summary["exports"]
    for exporter, report in summary["exports"].items():
        assert (ONNX / report["file"]).is_file() and report["opset"] >= 13
        for init, entry in report["initializers"].items():
            assert arrays[entry["npz"]].shape == tuple(entry["shape"]), init
        assert report["float_initializer_elements"] == sum(
            math.prod(e["shape"]) for e in report["initializers"].values()
        )
        forward, scores = arrays[f"forward.{exporter}"], arrays[f"scores.{exporter}"]
        assert forward.shape == scores.shape == (len(model.x), 10)
        np.testing.assert_allclose(forward, scores, rtol=0, atol=1e-12)
        loss, _ = om.softmax_cross_entropy(scores, model.y)
        assert report["loss"] == pytest.approx(loss, rel=1e-12)
        relus = [n for n, op in report["nodes"] if op == "Relu"]
        assert sorted(report["relu_nodes"]) == sorted(relus)


def test_onnx_gradients_are_the_builders_models_gradients() -> None:
    """By initializer name, in the initializer's layout: LeNet's are the cnn fixture's (Gemm
    weights transposed), the MLP's a NumPy backward's."""
    lenet, arrays = load("onnx_models", "lenet")
    _, cnn = load("cnn", "lenet")
    pairs = {"0": 1, "3": 3, "7": 5, "9": 6, "11": 7}  # torch module index -> wire layer
    for torch_index, layer in pairs.items():
        w = arrays[f"grad.{torch_index}.weight"]
        ours = cnn[f"layer{layer}.W"]
        np.testing.assert_allclose(w if w.ndim == 4 else w.T, ours, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(arrays[f"grad.{torch_index}.bias"], cnn[f"layer{layer}.b"])
    assert lenet["exports"]["legacy"]["initializers"]["7.weight"]["shape"] == [120, 256]
    model = om.mlp784()
    _, mlp = load("onnx_models", "mlp")
    scores, zs, inputs = om.mlp_forward(model.weights, model.x)
    _, dz = om.softmax_cross_entropy(scores, model.y)
    for i in reversed(range(3)):
        np.testing.assert_allclose(mlp[f"grad.{2 * i}.weight"], (inputs[i].T @ dz).T, atol=1e-14)
        np.testing.assert_allclose(mlp[f"grad.{2 * i}.bias"], dz.sum(axis=0), atol=1e-14)
        if i:
            dz = (dz @ model.weights[i]["W"].T) * (zs[i - 1] > 0)


def test_onnx_batchnorm_variants() -> None:
    """Folded: no BatchNormalization, conv initializers of new values (legacy renames them
    onnx::Conv_*, dynamo keeps 0.weight); kept: the running stats are initializers, with a
    gradient in eval mode and none (zeros) in train mode."""
    folded, _ = load("onnx_models", "cifar_folded")
    for report in folded["exports"].values():
        assert "BatchNormalization" not in {op for _, op in report["nodes"]}
        assert report["float_initializer_elements"] == 25674 - 2 * (16 + 32)
    legacy = folded["exports"]["legacy"]["initializers"]
    assert {v["matched_by"] for k, v in legacy.items() if k.startswith("onnx::Conv")} == {"value"}
    kept_eval, eval_arrays = load("onnx_models", "cifar_kept_eval")
    kept_train, train_arrays = load("onnx_models", "cifar_kept_train")
    assert np.any(eval_arrays["grad.1.running_mean"] != 0)
    assert not np.any(train_arrays["grad.1.running_var"])
    assert kept_eval["exports"]["legacy"]["loss"] == pytest.approx(
        load("cnn", "cifar_eval")[0]["loss"], rel=1e-12
    )
    assert kept_train["exports"]["legacy"]["loss"] == pytest.approx(
        load("cnn", "cifar_train")[0]["loss"], rel=1e-12
    )


def test_lstm_fixture_lists_lstm_as_unsupported() -> None:
    summary = json.loads((ONNX / "lstm.json").read_text())
    assert summary["batch_checksum"] == pytest.approx(om.checksum(om.lstm_batch()), rel=1e-12)
    for report in summary["exports"].values():
        assert (ONNX / report["file"]).is_file()
        assert report["unsupported"]["LSTM"]


def test_onnx_files_hold_the_documented_initializers() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    for name, build in om.ONNX_MODELS.items():
        summary, _ = load("onnx_models", name)
        model = build()
        for report in summary["exports"].values():
            proto = onnx.load(str(ONNX / report["file"]))
            inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
            floats = {k: v for k, v in inits.items() if v.dtype.kind == "f"}
            assert {k: list(v.shape) for k, v in floats.items()} == {
                k: e["shape"] for k, e in report["initializers"].items()
            }
            assert [[n.name, n.op_type] for n in proto.graph.node] == report["nodes"]
            assert floats and model.x.shape[0] == summary["batch_size"]


# --- request bodies -----------------------------------------------------------------------


def all_models() -> list[om.OracleModel]:
    models = [build() for build in (*om.CNN_MODELS.values(), om.mlp784, om.reshape_net)]
    models += [om.micrograd_moons(), om.training_exact(0.9), om.training_sweep(0.5, 3)]
    return models


def network_body_json(model: om.OracleModel) -> dict[str, Any]:
    """network_body through strict JSON and back."""
    body: dict[str, Any] = json.loads(json.dumps(om.network_body(model), allow_nan=False))
    return body


@pytest.mark.parametrize("model", all_models(), ids=lambda m: m.name)
def test_network_body_has_the_contracts_fields(model: om.OracleModel) -> None:
    body = network_body_json(model)
    assert len(body["layers"]) == len(body["weights"]) == len(model.layers)
    image = len(model.input_shape) == 3
    assert body.get("input_shape" if image else "input_dim") == (
        list(model.input_shape) if image else model.input_shape[0]
    )
    for layer, weights in zip(body["layers"], body["weights"], strict=True):
        kind = layer.get("type", "dense")
        expected = {"conv2d": {"W", "b"}, "dense": {"W", "b"}, "batchnorm": {"gamma", "beta"}}
        keys = expected.get(kind, set())
        if kind == "batchnorm" and layer["mode"] == "eval":
            keys = keys | {"running_mean", "running_var"}
        assert set(weights) == keys, layer
    x = np.array(body["batch"]["x"])
    assert x.shape == model.x.shape and np.array_equal(x, model.x)
    y = body["batch"]["y"]
    assert len(y) == len(model.x)
    binary = model.loss == "svm_hinge" and model.layers[-1]["units"] == 1
    assert all(type(v) is (float if binary else int) for v in y)
    assert body["include"] == ["gradients"]
    if model.train is not None:
        assert set(body["train"]) == {
            "optimizer", "lr", "momentum", "steps", "batch_size", "seed", "record_every",
        }  # fmt: skip


@pytest.mark.parametrize("model", all_models()[-3:], ids=lambda m: m.name)
def test_dense_bodies_pass_todays_schema(model: om.OracleModel) -> None:
    """The dense bodies, less the fields revision 2 adds (`train`, `l2_biases`), are valid
    requests for today's schema."""
    body = {k: v for k, v in network_body_json(model).items() if k in NetworkRequest.model_fields}
    request = NetworkRequest.model_validate(body)
    assert len(request.layers) == 3 and request.input_dim == model.input_shape[0]


def test_builders_are_deterministic_and_seeded() -> None:
    a, b = om.lenet(), om.lenet()
    assert np.array_equal(a.x, b.x) and all(
        np.array_equal(a.params()[k], b.params()[k]) for k in a.params()
    )
    assert not np.array_equal(om.lenet(seed=1).x, a.x)
    he = om.he_init(0)
    assert [w["W"].shape for w in he] == [(64, 100), (100, 100), (100, 10)]
    assert np.array_equal(
        he[0]["W"], np.random.default_rng(0).standard_normal((64, 100)) * math.sqrt(2 / 64)
    )
    train, evals = om.cifar("train"), om.cifar("eval")
    assert np.array_equal(train.weights[3]["W"], evals.weights[3]["W"])
    assert "running_var" in evals.weights[1] and "running_var" not in train.weights[1]
    assert np.all(evals.weights[1]["running_var"] > 0)
