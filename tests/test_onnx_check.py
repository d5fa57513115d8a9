"""`gradiag check MODEL.onnx --batch BATCH.npz --loss LOSS`: in process and with --url, the
exit codes of the contract's Command line section, thresholds from flags and config, and a
client-only install (no onnx, no Flask) checking through a running service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import oracle_models as om
import pytest

from gradiag.service.cli import main

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "oracle" / "onnx_models"
LENET = json.loads((FIXTURES / "lenet.json").read_text())["exports"]["legacy"]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """model.onnx (the LeNet legacy export), batch.npz (its builder's batch), lstm.onnx; run
    from that folder, which has no config file."""
    shutil.copy(FIXTURES / "lenet.legacy.onnx", tmp_path / "model.onnx")
    shutil.copy(FIXTURES / "lstm.legacy.onnx", tmp_path / "lstm.onnx")
    model = om.lenet()
    np.savez(tmp_path / "batch.npz", x=model.x, y=model.y)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


ARGS = ("model.onnx", "--batch", "batch.npz", "--loss", "softmax_cross_entropy")


def test_a_warn_model_exits_0_and_1_with_strict(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = check(capsys, *ARGS)
    assert code == 0
    assert out.splitlines()[0].startswith(
        "WARN  model.onnx  onnx: 5-layer neural network, loss 2.83, 44426 parameters, batch 32"
    )
    assert "6 /8/Relu" in out and "dead_relu at /10/Relu" in out
    assert check(capsys, *ARGS, "--strict")[0] == 1


def test_the_json_report_is_the_services(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, *ARGS, "--format", "json")
    doc = json.loads(out)
    (entry,) = doc["files"]
    assert (code, entry["kind"], entry["status"]) == (0, "onnx", "warn")
    assert entry["report"]["loss"] == pytest.approx(LENET["loss"], rel=1e-12)
    dead = {
        layer["name"]: layer["dead_unit_indices"]
        for layer in entry["report"]["layers"]
        if layer["op_type"] == "Relu"
    }
    assert dead == {node: v["dead_units"] for node, v in LENET["relu_nodes"].items()}


def test_thresholds_from_flags_and_config_reach_the_request(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check(capsys, *ARGS, "--dead-fail", "0.12")[0] == 1  # /10/Relu: 15% dead
    (files / "gradiag.toml").write_text("dead_warn = 0.5\ndead_fail = 0.9\n")
    code, out, _ = check(capsys, *ARGS)
    assert code == 0 and out.startswith("OK ")


def test_bad_files_and_usage_exit_2(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, "lstm.onnx", "--loss", "mse")
    assert code == 2
    assert "Unsupported ONNX ops" in out and "(node '/lstm/LSTM')" in out
    code, out, _ = check(capsys, "model.onnx", "--batch", "batch.npz")
    assert code == 2 and "needs --loss" in out
    code, out, _ = check(capsys, "model.onnx", "--batch", "nope.npz", "--loss", "mse")
    assert code == 2 and "cannot read nope.npz" in out
    np.savez(files / "wrong.npz", x=np.zeros((32, 3, 28, 28)), y=np.zeros(32))
    code, out, _ = check(capsys, "model.onnx", "--batch", "wrong.npz", "--loss", "mse")
    assert code == 2 and "[32, 1, 28, 28]" in out
    (files / "garbage.onnx").write_bytes(b"not a model")
    code, out, _ = check(capsys, "garbage.onnx", "--loss", "mse")
    assert code == 2 and "400 Not an ONNX model" in out


def test_with_url_the_same_report_and_exit_codes(
    files: Path, capsys: pytest.CaptureFixture[str], live_server: str
) -> None:
    local = json.loads(check(capsys, *ARGS, "--format", "json")[1])["files"][0]["report"]
    code, out, _ = check(capsys, *ARGS, "--format", "json", "--url", live_server)
    remote = json.loads(out)["files"][0]["report"]
    assert code == 0 and remote["health"] == local["health"]
    assert remote["loss"] == pytest.approx(local["loss"], rel=1e-12)  # BLAS threads: last bits
    assert [layer["dead_unit_indices"] for layer in remote["layers"]] == [
        layer["dead_unit_indices"] for layer in local["layers"]
    ]
    assert check(capsys, "lstm.onnx", "--loss", "mse", "--url", live_server)[0] == 2


def test_a_client_only_install_checks_through_a_service(files: Path, live_server: str) -> None:
    """No onnx, no Flask: `gradiag check model.onnx --url` still works (exit 0), in process
    says which extra it needs (exit 2)."""
    blocked = ("flask", "werkzeug", "gunicorn", "prometheus_client", "orjson", "onnx")
    script = (
        f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
        "from gradiag.service.cli import main\nsys.exit(main(sys.argv[1:]))"
    )

    def gradiag(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", script, "check", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=files)

    remote = gradiag(*ARGS, "--url", live_server)
    assert remote.returncode == 0, remote.stderr
    assert "onnx: 5-layer neural network" in remote.stdout
    local = gradiag(*ARGS)
    assert local.returncode == 2 and "gradiag[server]" in local.stderr
