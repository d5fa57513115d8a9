"""The training what-if (`train` in POST /v1/network, docs/training.md, engine/training.py).

PyTorch's answers are the committed fixtures tests/fixtures/oracle/training/ (README there):
20 SGD steps of a 64-100-100-10 net with L2 (momentum 0 and 0.9) and the dead-ReLU sweep (5
seeds x 4 learning rates x 200 steps). `sgd_reference` (tests/oracle_models.py) is the
independent plain-NumPy loop. The sweep runs once per module, in the engine directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import oracle_models as om
import pytest
import requests
from flask.testing import FlaskClient

from gradiag.engine.diagnostics import Thresholds
from gradiag.engine.histograms import BINS, histogram, value_range
from gradiag.engine.network import NetworkLimits, check_network, compile_network
from gradiag.engine.training import Training, TrainingOutcome, minibatch_order, train
from gradiag.schemas.network import NetworkRequest, NetworkResponse
from gradiag.service import create_app
from gradiag.service import timeline as timeline_module
from gradiag.service.config import Settings
from gradiag.service.network import network_spec
from gradiag.service.training import (
    engine_training,
    report_histogram_bytes,
    training_answer_bytes,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oracle" / "training"
EXACT = 1e-10  # relative, against PyTorch float64 (the bar)


def post(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/network", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    answer: dict[str, Any] = response.get_json()
    return answer


def problem(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/network", json=body)
    assert response.status_code == 422, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "application/problem+json"
    answer: dict[str, Any] = response.get_json()
    return answer


def codes(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(f["code"], f["severity"], f["location"]) for f in report["health"]["findings"]]


def relative(a: Any, b: Any) -> float:
    """max |a - b| / max |b|: one tensor's relative error (elements near 0 do not blow up)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def small_body(**train: Any) -> dict[str, Any]:
    """A 4-8-3 relu net on a random batch of 20: cheap enough for every HTTP case."""
    return {
        "input_dim": 4,
        "layers": [{"units": 8}, {"units": 3, "activation": "linear"}],
        "loss": "softmax_cross_entropy",
        "batch": {"random": {"size": 20, "seed": 1}},
        "train": {"lr": 0.1, "steps": 10, "batch_size": 8, **train},
    }


# --- exactness against PyTorch ------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_twenty_sgd_steps_match_pytorch_float64(client: FlaskClient, momentum: float) -> None:
    """Losses, dead units per step, update ratios and the final weights of 20 steps (L2 1e-3,
    batch 64 of 256, minibatch order from seed 2) against torch.optim.SGD."""
    model = om.training_exact(momentum)
    fixture = np.load(FIXTURES / f"exact_m{momentum:g}.npz")
    recorded = json.loads((FIXTURES / f"exact_m{momentum:g}.json").read_text())
    np.testing.assert_allclose(recorded["checksums"]["x"], om.checksum(model.x), rtol=1e-12)
    answer = post(client, om.network_body(model))
    steps = answer["training"]["steps"]
    assert [s["step"] for s in steps] == list(range(20))
    losses = np.array([s["loss"] for s in steps])
    assert np.all(np.abs(losses - fixture["losses"]) <= EXACT * np.abs(fixture["losses"]))
    dead = [[layer["dead_units"] for layer in s["layers"][:2]] for s in steps]
    assert dead == fixture["dead_units_minibatch"].tolist()
    ratios = np.array([[layer["update_ratio"] for layer in s["layers"]] for s in steps])
    assert np.all(np.abs(ratios - fixture["update_ratio"]) <= EXACT * fixture["update_ratio"])
    nodes = answer["nodes"]
    for name in ("layer1.W", "layer1.b", "layer2.W", "layer2.b", "layer3.W", "layer3.b"):
        # element by element (the worst measured: 1.4e-13, an entry near 0)
        np.testing.assert_allclose(nodes[name]["value"], fixture[name], rtol=EXACT, atol=0)
    # the report is the final weights' on the whole batch, as the fixture's final figures
    assert answer["loss"] == pytest.approx(recorded["final_loss_full_batch"], rel=EXACT)
    dead_fraction = [layer["dead_fraction"] for layer in answer["layers"][:2]]
    assert dead_fraction == recorded["final_dead_fraction"]
    assert answer["training"]["updates"] == 20 and answer["training"]["stopped_at"] is None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_same_steps_match_the_plain_numpy_loop(client: FlaskClient, momentum: float) -> None:
    model = om.training_exact(momentum)
    reference = om.sgd_reference(model)
    answer = post(client, om.network_body(model))
    losses = [s["loss"] for s in answer["training"]["steps"]]
    assert relative(losses, reference["losses"]) <= EXACT
    for i, params in enumerate(reference["params"], 1):
        for key, value in params.items():
            assert relative(answer["nodes"][f"layer{i}.{key}"]["value"], value) <= EXACT


def numpy_unit_history(model: om.OracleModel) -> tuple[list[Any], list[Any], list[Any]]:
    """The exact run replayed in NumPy, keeping each hidden layer's dead mask per minibatch,
    and the masks on the whole batch at the start and the end."""
    cfg = model.train
    assert cfg is not None
    params = tuple({k: v.copy() for k, v in w.items()} for w in model.weights)
    velocity = tuple({k: np.zeros_like(v) for k, v in w.items()} for w in params)
    per_step = []
    start = [np.all(z <= 0, axis=0) for z in om.mlp_forward(params, model.x)[1][:-1]]
    for idx in om.minibatches(cfg["seed"], len(model.x), cfg["batch_size"], cfg["steps"]):
        _, zs, _ = om.mlp_forward(params, model.x[idx])
        per_step.append([np.all(z <= 0, axis=0) for z in zs[:-1]])
        _, grads = om._loss_and_grads(params, model.x[idx], model.y[idx], model.l2)
        for w, v, g in zip(params, velocity, grads, strict=True):
            for k in w:
                v[k] = cfg["momentum"] * v[k] + g[k]
                w[k] -= cfg["lr"] * v[k]
    end = [np.all(z <= 0, axis=0) for z in om.mlp_forward(params, model.x)[1][:-1]]
    return start, per_step, end


def test_died_and_revived_units_follow_their_definition(client: FlaskClient) -> None:
    """Alive at the start and dead at the end (whole batch), with the first step from which
    the unit read dead on every minibatch; revived the reverse. Worked out in NumPy."""
    model = om.training_exact(0.9)
    start, per_step, end = numpy_unit_history(model)
    died, revived = [], []
    for layer in range(2):
        for unit in range(100):
            history = [masks[layer][unit] for masks in per_step]
            if not start[layer][unit] and end[layer][unit]:
                alive = [k for k, dead in enumerate(history) if not dead]
                died.append({"layer": layer + 1, "unit": unit, "step": (alive or [-1])[-1] + 1})
            if start[layer][unit] and not end[layer][unit]:
                dead_at = [k for k, dead in enumerate(history) if dead]
                revived.append(
                    {"layer": layer + 1, "unit": unit, "step": (dead_at or [-1])[-1] + 1}
                )
    answer = post(client, om.network_body(model, include=()))
    assert answer["training"]["died"] == died and answer["training"]["revived"] == revived
    assert len(died) == 5 and len(revived) == 2  # this run has both kinds


def test_a_partial_last_minibatch_is_used_as_it_is(client: FlaskClient) -> None:
    """100 examples in minibatches of 64: every other step is the 36 left (a second program,
    compiled once), across epochs, as the NumPy loop does."""
    model = om.training_exact(0.9)
    train = {**(model.train or {}), "steps": 7}
    model = dataclasses.replace(model, x=model.x[:100], y=model.y[:100], train=train)
    sizes = [idx.size for idx, _ in zip(minibatch_order(2, 100, 64), range(7), strict=False)]
    assert sizes == [64, 36, 64, 36, 64, 36, 64]
    reference = om.sgd_reference(model)
    answer = post(client, om.network_body(model))
    losses = [s["loss"] for s in answer["training"]["steps"]]
    assert relative(losses, reference["losses"]) <= EXACT
    for i, params in enumerate(reference["params"], 1):
        for key, value in params.items():
            assert relative(answer["nodes"][f"layer{i}.{key}"]["value"], value) <= EXACT


# --- the seed's claim: the dead-ReLU sweep ------------------------------------------------


@pytest.fixture(scope="module")
def sweep() -> list[TrainingOutcome]:
    """The 5 seeds, each one engine call with the 4 rates (one run per rate)."""
    outcomes = []
    for seed in om.SWEEP_SEEDS:
        request = NetworkRequest.model_validate(om.sweep_body(seed))
        spec = network_spec(request)
        stages = check_network(spec)
        assert request.train is not None
        training = engine_training(request.train, spec.batch_size, histograms=False)
        outcome = train(
            spec, training, stages, NetworkLimits(), Thresholds(), gradients=False,
            max_training_flops=Settings().max_training_flops,
        )  # fmt: skip
        outcomes.append(outcome)
    return outcomes


def dead_fractions(outcome: TrainingOutcome) -> Any:
    """(rates, 2): each run's final dead fraction of layers 1 and 2 on the whole batch."""
    return np.array(
        [
            [
                len(layer.dead_unit_indices) / layer.units
                for layer in run.final.diagnostics.layers[:2]
            ]
            for run in outcome.runs
        ]
    )


def test_dead_fraction_grows_with_the_learning_rate(sweep: list[TrainingOutcome]) -> None:
    fractions = np.stack([dead_fractions(outcome) for outcome in sweep], axis=1)  # (4, 5, 2)
    layer1 = fractions[:, :, 0].mean(axis=1)
    assert np.all(np.diff(layer1) > 0), layer1
    assert layer1[om.SWEEP_LRS.index(1.0)] > 0.25
    # the figures docs/training.md states
    assert layer1.round(3).tolist() == [0.056, 0.124, 0.552, 0.914]
    assert fractions[:, :, 1].mean(axis=1).round(3).tolist() == [0.024, 0.022, 0.086, 0.746]


def test_no_run_at_0_1_fails_and_every_run_at_2_fails(sweep: list[TrainingOutcome]) -> None:
    statuses = np.array([[run.final.diagnostics.status for run in o.runs] for o in sweep]).T
    assert "fail" not in statuses[om.SWEEP_LRS.index(0.1)]
    assert set(statuses[om.SWEEP_LRS.index(2.0)]) == {"fail"}
    for outcome in sweep:  # and at 2.0 the training finding says why: units died
        found = {f.code for f in outcome.runs[-1].findings}
        assert "dead_relu_onset" in found


def test_every_sweep_run_ends_as_pytorch_and_the_numpy_loop_do(
    sweep: list[TrainingOutcome],
) -> None:
    fixture = np.load(FIXTURES / "sweep.npz")
    assert fixture["lrs"].tolist() == list(om.SWEEP_LRS)
    for s, outcome in enumerate(sweep):
        ours = dead_fractions(outcome)
        assert ours.tolist() == fixture["dead_fraction"][:, s].tolist()
        for k, lr in enumerate(om.SWEEP_LRS):
            reference = om.sgd_reference(om.training_sweep(lr, s))
            assert ours[k].tolist() == reference["dead_fraction"]
            run = outcome.runs[k]
            losses = [step.loss for step in run.steps]
            # 200 steps of chaotic dynamics: the curves agree while rounding has not grown
            assert relative(losses[:50], fixture["losses"][k, s, :50]) <= 1e-8
            assert relative(losses[:50], reference["losses"][:50]) <= 1e-8


# --- the wire -----------------------------------------------------------------------------


def test_a_learning_rate_list_answers_one_run_per_rate_and_a_table(client: FlaskClient) -> None:
    body = small_body(lr=[0.01, 0.1, 1.0])
    answer = post(client, body)
    NetworkResponse.model_validate(answer)
    training = answer["training"]
    assert [run["lr"] for run in training["runs"]] == [0.01, 0.1, 1.0]
    assert training["table"]["layers"] == [1]
    rows = training["table"]["rows"]
    for run, row in zip(training["runs"], rows, strict=True):
        assert row["lr"] == run["lr"]
        assert row["status"] == run["final"]["health"]["status"]
        assert row["loss"] == run["final"]["loss"]
        assert row["dead_fraction"] == [run["final"]["layers"][0]["dead_fraction"]]
    # the top-level report is the start (the initial weights): every run's step 0 shares it
    single = post(client, {k: v for k, v in body.items() if k != "train"})
    assert answer["loss"] == single["loss"] and answer["layers"] == single["layers"]
    step0 = {run["steps"][0]["loss"] for run in training["runs"]}
    assert len(step0) == 1
    # each run equals the same request with that one rate
    one = post(client, small_body(lr=0.1))
    assert one["training"]["steps"] == training["runs"][1]["steps"]
    assert one["loss"] == training["runs"][1]["final"]["loss"]


def test_one_step_on_the_whole_batch_is_w_minus_lr_times_the_gradient(
    client: FlaskClient,
) -> None:
    """A conv net with batchnorm: 1 step at batch_size = N moves every parameter by -lr x the
    single pass's gradient (the whole batch, only reordered), gamma and beta included;
    with momentum 0.5 the second step moves by -lr (0.5 g0 + g1)."""
    body = {
        "input_shape": [1, 6, 6],
        "layers": [
            {"type": "conv2d", "filters": 3, "kernel": 3, "activation": "linear"},
            {"type": "batchnorm", "activation": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"units": 2, "activation": "linear"},
        ],
        "loss": "softmax_cross_entropy",
        "batch": {"random": {"size": 6, "seed": 3}},
        "l2": 0.01,
        "include": ["gradients"],
    }
    start = post(client, body)
    trained = post(client, {**body, "train": {"lr": 0.05, "steps": 1}})
    names = [n for n, node in start["nodes"].items() if node["op"] == "param"]
    assert {n.split(".")[1] for n in names} == {"W", "b", "gamma", "beta"}
    for name in names:
        want = np.array(start["nodes"][name]["value"]) - 0.05 * np.array(
            start["nodes"][name]["grad"]
        )
        got = np.array(trained["nodes"][name]["value"])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=name)
    assert trained["training"]["steps"][0]["loss"] == pytest.approx(start["loss"], rel=1e-12)
    two = post(client, {**body, "train": {"lr": 0.05, "steps": 2, "momentum": 0.5}})
    once = {n: np.array(trained["nodes"][n]["value"]) for n in names}
    g0 = {n: np.array(start["nodes"][n]["grad"]) for n in names}
    g1 = {n: np.array(trained["nodes"][n]["grad"]) for n in names}  # at W1, the whole batch
    for name in names:
        want = once[name] - 0.05 * (0.5 * g0[name] + g1[name])
        got = np.array(two["nodes"][name]["value"])
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13, err_msg=name)


def test_conv_filters_that_die_during_training_are_listed(client: FlaskClient) -> None:
    body = {
        "input_shape": [1, 8, 8],
        "layers": [
            {"type": "conv2d", "filters": 6, "kernel": 3, "padding": 1},
            {"type": "flatten"},
            {"units": 3, "activation": "linear"},
        ],
        "loss": "softmax_cross_entropy",
        "batch": {"random": {"size": 16, "seed": 0}},
        "train": {"lr": 20.0, "steps": 30, "batch_size": 8},
    }
    answer = post(client, body)
    training = answer["training"]
    assert [layer["index"] for layer in training["steps"][0]["layers"]] == [1, 3]
    died = training["died"]
    assert died and all(event["layer"] == 1 and 0 <= event["unit"] < 6 for event in died)
    dead = set(answer["layers"][0]["dead_unit_indices"])
    assert {event["unit"] for event in died} <= dead
    assert ("dead_relu_onset", "fail", "layer1") in codes(answer) or (
        "dead_relu_onset",
        "warn",
        "layer1",
    ) in codes(answer)


def test_a_diverging_run_is_data_with_the_step(client: FlaskClient) -> None:
    """lr 1e3 on the sweep's net: the loss jumps past 10x its start at step 1; the units die
    (the loss stays finite); each finding names a layer and a step."""
    body = om.sweep_body(0)
    body["train"] = {**body["train"], "lr": 1e3, "steps": 20}
    body["include"] = []
    answer = post(client, body)
    assert answer["health"]["status"] == "fail"
    diverged = [f for f in answer["health"]["findings"] if f["code"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["severity"] == "fail"
    assert "at step 1 " in diverged[0]["message"] and diverged[0]["location"].startswith("layer")
    onset = [f for f in answer["health"]["findings"] if f["code"] == "dead_relu_onset"]
    assert {f["location"] for f in onset} == {"layer1", "layer2"}
    assert all("from step" in f["message"] for f in onset)


def test_a_run_stops_at_its_first_nonfinite_loss(client: FlaskClient) -> None:
    """A linear net with mse at lr 5: the loss grows geometrically and overflows; the run
    stops there (recorded, no update after it) and the report says at which step."""
    body = {
        "input_dim": 4,
        "layers": [{"units": 8, "activation": "linear"}, {"units": 2, "activation": "linear"}],
        "loss": "mse",
        "batch": {"random": {"size": 32, "seed": 0}},
        "train": {"lr": 5.0, "steps": 200, "batch_size": 8, "record_every": 50},
    }
    answer = post(client, body)
    training = answer["training"]
    stop = training["stopped_at"]
    assert stop is not None and 0 < stop < 200
    assert training["updates"] == stop
    last = training["steps"][-1]
    assert last["step"] == stop and last["loss"] in ("Infinity", "NaN")
    assert all(layer["update_ratio"] is None for layer in last["layers"])
    assert [s["step"] for s in training["steps"][:-1]] == list(range(0, stop, 50))
    diverged = next(f for f in answer["health"]["findings"] if f["code"] == "diverged")
    assert f"at step {stop}, where training stopped" in diverged["message"]
    assert "nonfinite" in {f["code"] for f in answer["health"]["findings"]}
    NetworkResponse.model_validate(answer)


def test_record_every_keeps_every_kth_step_and_the_last(client: FlaskClient) -> None:
    answer = post(client, small_body(steps=10, record_every=4))
    assert [s["step"] for s in answer["training"]["steps"]] == [0, 4, 8, 9]


def test_update_ratio_findings_follow_the_thresholds(client: FlaskClient) -> None:
    high = post(client, small_body(lr=0.5))
    assert ("update_ratio", "warn", "layer1") in codes(high)
    message = next(f["message"] for f in high["health"]["findings"] if f["code"] == "update_ratio")
    assert "above 0.01" in message and "at step" in message
    quiet = post(client, {**small_body(lr=0.5), "thresholds": {"update_ratio_high": 1e9}})
    assert "update_ratio" not in {code for code, _, _ in codes(quiet)}
    low = post(client, small_body(lr=1e-9))
    assert ("update_ratio", "warn", "layer1") in codes(low)
    assert "raise the learning rate" in str(low["health"]["findings"])
    loose = post(client, {**small_body(lr=1e3), "thresholds": {"diverged_factor": 1e300}})
    assert "diverged" not in {code for code, _, _ in codes(loose)}


def test_the_median_update_ratio_is_the_median_of_the_recorded_ratios(
    client: FlaskClient,
) -> None:
    answer = post(client, small_body(lr=0.5, steps=9))
    ratios = [s["layers"][0]["update_ratio"] for s in answer["training"]["steps"]]
    message = next(
        f["message"]
        for f in answer["health"]["findings"]
        if f["code"] == "update_ratio" and f["location"] == "layer1"
    )
    assert f"is {np.median(ratios):.2g} over 9 updates" in message


@pytest.mark.parametrize(
    ("train", "loc"),
    [
        ({"lr": 0}, ["train", "lr"]),
        ({"lr": -0.1}, ["train", "lr"]),
        ({"lr": "NaN"}, ["train", "lr"]),
        ({"lr": []}, ["train", "lr"]),
        ({"lr": [0.1] * 17}, ["train", "lr"]),
        ({"lr": [0.1, 0]}, ["train", "lr"]),
        ({"lr": 0.1, "momentum": 1.0}, ["train", "momentum"]),
        ({"lr": 0.1, "momentum": -0.5}, ["train", "momentum"]),
        ({"lr": 0.1, "steps": 0}, ["train", "steps"]),
        ({"lr": 0.1, "steps": 100_001}, ["train", "steps"]),
        ({"lr": 0.1, "batch_size": 0}, ["train", "batch_size"]),
        ({"lr": 0.1, "record_every": 0}, ["train", "record_every"]),
        ({"lr": 0.1, "steps": 20_001, "record_every": 2}, ["train", "record_every"]),
        ({"lr": 0.1, "seed": -1}, ["train", "seed"]),
        ({"lr": 0.1, "optimizer": "adam"}, ["train", "optimizer"]),
        ({"lr": 0.1, "steps": 1.5}, ["train", "steps"]),
        ({"lr": 0.1, "epochs": 3}, ["train", "epochs"]),
        ({"steps": 3}, ["train", "lr"]),
        ({"lr": 0.1, "batch_size": 21}, ["train", "batch_size"]),  # the batch has 20
    ],
)
def test_bad_train_specs_are_422_at_their_field(
    client: FlaskClient, train: dict[str, Any], loc: list[Any]
) -> None:
    body = {**small_body(), "train": train}
    out = problem(client, body)
    assert out["errors"][0]["loc"][: len(loc)] == loc, out["errors"]


def test_the_training_budget_is_checked_before_training(client: FlaskClient) -> None:
    """4 rates x 200 steps x (3 x the minibatch program's forward FLOPs (the three affine
    layers' (2 fan_in + 1) x 64 x units = 2,240,640, and the relus and the loss) + 2 x the
    17,610 parameters)."""
    settings = Settings(max_training_flops=5_000_000_000)
    over = create_app(settings, TESTING=True).test_client()
    body = om.sweep_body(0)
    started = time.monotonic()
    out = problem(over, body)
    assert time.monotonic() - started < 2  # refused from the definition, nothing trained
    assert out["limit"] == "max_training_flops" and out["limit_value"] == 5_000_000_000
    assert out["errors"][0]["loc"] == ["train", "steps"]
    request = NetworkRequest.model_validate(body)
    program = compile_network(network_spec(request), NetworkLimits(), gradients=False, batch=64)
    assert 2_240_640 < program.flops < 2_240_640 + 20_000
    per_step = 3 * program.flops + 2 * 17_610
    assert f"{per_step} estimated FLOPs per step come to {800 * per_step};" in out["detail"]
    body["train"]["lr"] = [0.1, 0.5, 1.0]  # 600 x per_step: under
    assert over.post("/v1/network", json=body).status_code == 200


def test_the_time_budget_holds_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(), TESTING=True)
    monkeypatch.setattr(Settings, "deadline", lambda self: time.monotonic() + 0.2)
    body = om.sweep_body(0)
    body["train"] = {**body["train"], "lr": 0.1, "steps": 10_000, "record_every": 100}
    started = time.monotonic()
    out = problem(app.test_client(), body)
    assert out["limit"] == "time_budget_seconds"
    assert time.monotonic() - started < 5


def test_histograms_count_every_value_over_fixed_ranges(client: FlaskClient) -> None:
    body = {**small_body(steps=6, record_every=5), "include": ["histograms", "gradients"]}
    answer = post(client, body)
    NetworkResponse.model_validate(answer)
    # the final weights' pass: every value of z, a, dz and dW counted once
    for layer in answer["layers"]:
        name = f"layer{layer['index']}"
        hists = layer["histograms"]
        assert set(hists) == {"z", "a", "dz", "dW"}
        tensors = {
            "z": answer["nodes"][f"{name}.z"]["value"],
            "a": answer["nodes"][f"{name}.a"]["value"],
            "dz": answer["nodes"][f"{name}.z"]["grad"],
            "dW": answer["nodes"][f"{name}.W"]["grad"],
        }
        for quantity, h in hists.items():
            values = np.asarray(tensors[quantity], np.float64).reshape(-1)
            assert len(h["counts"]) == BINS
            assert sum(h["counts"]) + h["below"] + h["above"] + h["nonfinite"] == values.size
            lo, hi = h["range"]
            counts, _ = np.histogram(values, bins=BINS, range=(lo, hi))
            assert h["counts"] == counts.tolist()
            assert h["below"] == int(np.sum(values < lo)) and h["above"] == int(np.sum(values > hi))
    # one range per layer and quantity, at every recorded step and in the final pass
    steps = answer["training"]["steps"]
    assert [s["step"] for s in steps] == [0, 5]
    for k, layer in enumerate(steps[0]["layers"]):
        for quantity, h in layer["histograms"].items():
            assert h["range"] == steps[1]["layers"][k]["histograms"][quantity]["range"]
            assert h["range"] == answer["layers"][k]["histograms"][quantity]["range"]
            total = sum(h["counts"]) + h["below"] + h["above"] + h["nonfinite"]
            per_example = {"z": 1, "a": 1, "dz": 1}.get(quantity)
            units = answer["layers"][k]["units"]
            assert total == (
                8 * units if per_example else answer["layers"][k]["parameters"]["weights"]
            )


def test_a_single_pass_histogram_spans_its_own_values(client: FlaskClient) -> None:
    body = {**small_body(), "include": ["histograms", "gradients"]}
    del body["train"]
    answer = post(client, body)
    z = np.asarray(answer["nodes"]["layer1.z"]["value"])
    h = answer["layers"][0]["histograms"]["z"]
    assert h["range"] == [float(z.min()), float(z.max())]
    assert h["below"] == h["above"] == h["nonfinite"] == 0
    assert h["counts"][0] >= 1 and h["counts"][-1] >= 1  # min in the first bin, max the last


def test_histogram_edges_and_nonfinite_values() -> None:
    h = histogram(np.array([0.0, 0.5, 1.0, 2.0, -1.0, np.nan, np.inf]), 0.0, 1.0)
    assert h.counts[0] == 1 and h.counts[BINS // 2] == 1 and h.counts[-1] == 1
    assert sum(h.counts) == 3 and (h.below, h.above, h.nonfinite) == (1, 1, 2)
    assert value_range(np.zeros(4)) == (-0.5, 0.5)
    assert value_range(np.array([np.nan])) == (-1.0, 1.0)
    assert value_range(np.array([-2.0, np.inf, 3.0])) == (-2.0, 3.0)


def test_the_same_request_gets_the_same_bytes(client: FlaskClient) -> None:
    body = {**small_body(lr=[0.1, 1.0], steps=12), "include": ["histograms"]}
    first = client.post("/v1/network", json=body)
    second = client.post("/v1/network", json=body)
    assert first.status_code == 200 and first.data == second.data


@pytest.mark.live
def test_the_same_request_gets_the_same_bytes_from_every_worker(live_server: str) -> None:
    body = om.sweep_body(1)
    body["train"]["steps"] = 50
    answers = {
        requests.post(f"{live_server}/v1/network", json=body, timeout=60).content for _ in range(4)
    }
    assert len(answers) == 1
    assert json.loads(answers.pop())["training"]["table"]["layers"] == [1, 2]


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"train": {"lr": [0.1, 0.5, 1.0], "steps": 40, "batch_size": 7}},
        {"train": {"lr": 0.3, "steps": 25, "record_every": 3}, "include": ["histograms"]},
        {"train": {"lr": 30.0, "steps": 60, "batch_size": 5}},
        {"train": {"lr": [0.1, 3.0], "steps": 30, "batch_size": 6}, "include": ["histograms"]},
    ],
)
def test_the_answer_estimate_bounds_the_training_record(
    client: FlaskClient, change: dict[str, Any]
) -> None:
    body = {**small_body(), **change}
    raw = client.post("/v1/network", json=body).get_data()
    answer = json.loads(raw)
    request = NetworkRequest.model_validate(body)
    spec = network_spec(request)
    assert request.train is not None
    training = engine_training(
        request.train, spec.batch_size, histograms="histograms" in request.include
    )
    without = {k: v for k, v in body.items() if k != "train"}
    report_bytes = len(client.post("/v1/network", json=without).get_data())  # the usual answer
    stages = check_network(spec)
    estimate = training_answer_bytes(training, stages, report_bytes)
    if training.histograms:  # what the usual answer's estimate adds for the histograms
        bare = {k: v for k, v in without.items() if k != "include"}
        added_by_histograms = report_bytes - len(client.post("/v1/network", json=bare).get_data())
        assert 0 < added_by_histograms <= report_histogram_bytes(stages, spec.batch_size)
    added = len(raw) - (report_bytes if len(training.lrs) == 1 else 0)
    recorded = len(json.dumps(answer["training"], separators=(",", ":")))
    assert recorded <= added + 100
    assert added <= estimate <= 6 * added + 10_000


def test_openapi_has_the_train_field_and_the_training_answer(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    assert {"TrainSpec", "TrainingRun", "TrainingSweep", "SweepTable"} <= set(schemas)
    assert "train" in schemas["NetworkRequest"]["properties"]


# --- engine pieces -------------------------------------------------------------------------


def test_minibatch_order_matches_the_fixtures_convention() -> None:
    ours = [idx.tolist() for idx, _ in zip(minibatch_order(5, 10, 4), range(7), strict=False)]
    theirs = [idx.tolist() for idx in om.minibatches(5, 10, 4, 7)]
    assert ours == theirs
    assert sorted(np.concatenate(ours[:3]).tolist()) == list(range(10))  # an epoch: each once


def test_a_one_example_batch_trains() -> None:
    """batch_size 1 of one example: every step is that example."""
    spec = network_spec(
        NetworkRequest.model_validate(
            {
                "input_dim": 2,
                "layers": [{"units": 3}, {"units": 1, "activation": "linear"}],
                "loss": "mse",
                "batch": {"x": [[1.0, -1.0]], "y": [0.5]},
            }
        )
    )
    stages = check_network(spec)
    outcome = train(
        spec, Training((0.1,), steps=3, batch_size=1), stages, NetworkLimits(), Thresholds(),
        gradients=False, max_training_flops=0,
    )  # fmt: skip
    losses = [step.loss for step in outcome.runs[0].steps]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[2] < losses[0]  # gradient descent on one example lowers its loss


# --- the picture: /v1/network.svg with `train` ------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def test_network_svg_draws_the_timeline_one_line_per_rate_and_layer(client: FlaskClient) -> None:
    """The layer chain, then the timeline: a polyline per (rate, relu layer) through every
    recorded step, its last point at the last recorded dead fraction (the JSON twin's)."""
    body = small_body(lr=[0.01, 0.5, 3.0], steps=12, record_every=3)
    body["layers"] = [
        {"units": 8},
        {"units": 6, "activation": "leaky_relu"},
        {"units": 3, "activation": "linear"},
    ]
    answer = post(client, body)
    response = client.post("/v1/network.svg", json=body)
    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    root = ET.fromstring(response.get_data())
    (timeline,) = [g for g in root.iter(f"{SVG}g") if g.get("class") == "timeline"]
    lines = [p for p in timeline.iter(f"{SVG}polyline") if p.get("class") == "series"]
    assert [(p.get("data-lr"), p.get("data-layer")) for p in lines] == [
        (lr, layer) for lr in ("0.01", "0.5", "3") for layer in ("1", "2")
    ]
    units = {1: 8, 2: 6}
    for line, (k, layer) in zip(lines, [(k, i) for k in range(3) for i in (1, 2)], strict=True):
        steps = answer["training"]["runs"][k]["steps"]
        points = [tuple(map(float, p.split(","))) for p in (line.get("points") or "").split()]
        assert len(points) == len(steps) == 5  # steps 0, 3, 6, 9 and the last, 11
        assert points[0][0] == timeline_module.LEFT
        assert points[-1][0] == pytest.approx(timeline_module.LEFT + timeline_module.PLOT_W)
        dead = steps[-1]["layers"][layer - 1]["dead_units"] / units[layer]
        want = timeline_module.TOP + (1 - dead) * timeline_module.PLOT_H
        assert points[-1][1] == pytest.approx(want, abs=0.05)
        assert line.get("data-last") == f"{dead:.0%}"
    legend = [
        "".join(t.itertext())
        for t in timeline.iter(f"{SVG}text")
        if t.get("class") == "legend-text"
    ]
    assert len(legend) == 6 and legend[0].startswith("lr 0.01 · layer1: ")
    notes = "".join(root.itertext())
    assert "trained at lr 0.01, 0.5, 3; the layers show the initial weights" in notes


def test_network_svg_without_train_has_no_timeline(client: FlaskClient) -> None:
    body = small_body()
    del body["train"]
    root = ET.fromstring(client.post("/v1/network.svg", json=body).get_data())
    assert not [g for g in root.iter(f"{SVG}g") if g.get("class") == "timeline"]


def test_network_svg_of_one_rate_says_it_shows_the_final_weights(client: FlaskClient) -> None:
    root = ET.fromstring(client.post("/v1/network.svg", json=small_body()).get_data())
    assert "the layers show the final weights" in "".join(root.itertext())
    lines = [p for p in root.iter(f"{SVG}polyline") if p.get("class") == "series"]
    assert len(lines) == 1 and lines[0].get("data-lr") == "0.1"


def test_network_svg_errors_of_train_are_the_json_twins(client: FlaskClient) -> None:
    body = small_body(lr=-1)
    svg_problem = client.post("/v1/network.svg", json=body)
    json_problem = client.post("/v1/network", json=body)
    assert svg_problem.status_code == json_problem.status_code == 422
    assert svg_problem.get_json()["errors"] == json_problem.get_json()["errors"]


# --- docs/training.md says what the service says -----------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_request_of_training_md_answers_what_the_page_quotes(client: FlaskClient) -> None:
    page = (DOCS / "training.md").read_text()
    block = page.split("```json\n", 1)[1].split("```", 1)[0]
    answer = post(client, json.loads(block))
    table = answer["training"]["table"]
    assert table["layers"] == [1, 2]
    for row in table["rows"]:
        dead = " | ".join(f"{f:.0%}" for f in row["dead_fraction"])
        assert f"| {row['lr']:g} | {row['status']} | {dead} |" in page
    runs = {run["lr"]: run["final"]["health"]["findings"] for run in answer["training"]["runs"]}
    assert runs[0.05] == []
    medians = [
        f["message"].split(" is ")[1].split(" ")[0]
        for f in runs[0.5]
        if f["code"] == "update_ratio"
    ]
    assert f"median {', '.join(medians)}: above 1e-2" in page
    diverged = next(f["message"] for f in runs[5.0] if f["code"] == "diverged")
    assert "the loss reaches 24.81 at step 1" in diverged and "its start (2.117)" in diverged
    onset = {f["location"]: f for f in runs[5.0] if f["code"] == "dead_relu_onset"}
    assert (
        onset["layer1"]["message"].startswith("6 of the 32")
        and onset["layer1"]["severity"] == "warn"
    )
    assert (
        onset["layer2"]["message"].startswith("31 of the 31")
        and onset["layer2"]["severity"] == "fail"
    )


def test_the_sweep_figures_of_training_md_are_the_measured_ones(
    sweep: list[TrainingOutcome],
) -> None:
    page = (DOCS / "training.md").read_text()
    fixture = json.loads((FIXTURES / "sweep.json").read_text())["mean_dead_fraction"]
    fractions = np.stack([dead_fractions(outcome) for outcome in sweep], axis=1).mean(axis=1)
    for k, lr in enumerate(om.SWEEP_LRS):
        ours = f"{fractions[k, 0]:.1%}"
        torch = f"{fixture[f'{lr:g}'][0]:.1%}"
        fails = sum(o.runs[k].final.diagnostics.status == "fail" for o in sweep)
        row = f"| {lr:.1f} | {ours} | {torch} | {ours} | {fractions[k, 1]:.1%} | {fails} of 5 |"
        assert row in page, row
