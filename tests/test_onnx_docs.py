"""docs/onnx.md works as pasted: its curl line (run with the real curl against a live
gunicorn) and its `gradiag check` line (run as a command), in a folder holding the committed
export of the very model its three PyTorch lines build (tests/fixtures/oracle/onnx_models/
mlp.legacy.onnx: torch.onnx.export, legacy exporter) and a batch.npz of its batch. The op
table lists exactly the converters."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import oracle_models as om
import pytest
from system_packages import require

from gradiag.onnx_import.converters import CONVERTERS

REPO = Path(__file__).resolve().parent.parent
PAGE = (REPO / "docs" / "onnx.md").read_text()
FIXTURES = REPO / "tests" / "fixtures" / "oracle" / "onnx_models"
MLP = json.loads((FIXTURES / "mlp.json").read_text())


def block_lines(language: str) -> list[str]:
    return [
        line
        for block in re.findall(rf"```{language}\n(.*?)```", PAGE, re.S)
        for line in block.splitlines()
    ]


def documented(prefix: str) -> list[str]:
    (line,) = [line for line in block_lines("sh") if line.startswith(prefix)]
    return shlex.split(line)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """model.onnx and batch.npz as the page has the reader make them."""
    shutil.copy(FIXTURES / "mlp.legacy.onnx", tmp_path / "model.onnx")
    model = om.mlp784()
    np.savez(tmp_path / "batch.npz", x=model.x, y=model.y)
    return tmp_path


def test_the_three_pytorch_lines_build_the_committed_model() -> None:
    """The Linear layers the page exports are the committed export's Gemm weights."""
    python = "\n".join(block_lines("python"))
    layers = [(int(a), int(b)) for a, b in re.findall(r"Linear\((\d+), (\d+)\)", python)]
    initializers = MLP["exports"]["legacy"]["initializers"]
    weights = [initializers[f"{k}.weight"]["shape"] for k in (0, 2, 4)]
    assert layers == [(fan_in, out) for out, fan_in in weights]
    assert "torch.randn(16, 784)" in python and MLP["batch_size"] == 16
    assert "dynamo=False" in python  # the legacy exporter, as the fixture was recorded


def test_the_curl_line_works_as_pasted(folder: Path, live_server: str) -> None:
    curl = require("curl", lambda: shutil.which("curl"))
    command = documented("curl ")
    assert command[-1] == "http://127.0.0.1:8000/v1/onnx"
    command = [curl, *command[1:-1], f"{live_server}/v1/onnx"]
    done = subprocess.run(command, cwd=folder, capture_output=True, timeout=120, check=True)
    report = json.loads(done.stdout)
    assert report["loss"] == pytest.approx(MLP["exports"]["legacy"]["loss"], rel=1e-12)
    assert report["name"] == "3-layer neural network" and report["health"]["status"] == "ok"


def test_the_check_line_works_as_pasted(folder: Path) -> None:
    command = documented("gradiag check")
    gradiag = [sys.executable, "-m", "gradiag.service.cli"]
    done = subprocess.run(
        [*gradiag, *command[1:]], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK    model.onnx  onnx: 3-layer neural network" in done.stdout


def test_the_op_table_lists_every_converter() -> None:
    rows = re.findall(r"^\| (`[A-Z].*?) \|", PAGE, re.M)
    listed = {op for row in rows for op in re.findall(r"`([A-Z]\w+)`", row)}
    assert listed == set(CONVERTERS)
