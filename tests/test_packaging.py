"""An installed gradiag adds one import name, `gradiag`, and its client runs without the
server's dependencies (Flask, gunicorn, prometheus-client, orjson, onnx)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER_ONLY = (
    "flask", "werkzeug", "gunicorn", "prometheus_client", "orjson", "grandalf", "onnx",
    "google.protobuf",
)  # fmt: skip
PACKAGES = ("engine", "schemas", "service", "client", "onnx_import")


def test_the_wheel_installs_only_the_gradiag_package(tmp_path: Path) -> None:
    """Built offline (no build isolation: nothing is downloaded) from a copy of what the
    Dockerfile copies, so the build's own files stay out of the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "__init__.py"):
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("gradiag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"gradiag", wheel.name.split("-py")[0] + ".dist-info"}
    for package in PACKAGES:
        assert f"gradiag/{package}/__init__.py" in names
    assert "gradiag/__init__.py" in names
    assert "gradiag/service/static/app.js" in names
    assert not any(name.startswith("gradiag/tests/") for name in names)


def test_the_client_runs_without_the_server_dependencies(live_server: str) -> None:
    """A process in which importing any server-only package fails still imports the client
    and gets a typed report from a running service."""
    script = f"""
import sys
for name in {SERVER_ONLY!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
from gradiag.client import Client
with Client({live_server!r}) as client:
    report = client.expression("(x + y) * z", {{"x": -2, "y": 5, "z": -4}})
print(report.output.value, report.nodes["x"].grad)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["-12.0", "-4.0"]


def test_the_client_diagnoses_an_onnx_model_without_onnx(live_server: str) -> None:
    """diagnose_onnx posts the file, the request and an .npz; the client imports no onnx."""
    model = REPO / "tests" / "fixtures" / "oracle" / "onnx_models" / "reshape.legacy.onnx"
    script = f"""
import sys
for name in {SERVER_ONLY!r}:
    sys.modules[name] = None
sys.path.insert(0, {str(REPO / "tests")!r})
import oracle_models as om
from gradiag.client import diagnose_onnx
m = om.reshape_net()
report = diagnose_onnx({str(model)!r}, m.x, m.y, "softmax_cross_entropy", url={live_server!r})
print(report.loss, report.layers[0].name, report.parameters.total)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((model.parent / "reshape.json").read_text())["exports"]["legacy"]
    loss, first, total = done.stdout.split()
    assert float(loss) == pytest.approx(summary["loss"], rel=1e-12)
    assert (first, int(total)) == ("/0/Conv", summary["float_initializer_elements"])


@pytest.mark.parametrize("module", ["gradiag.engine", "gradiag.schemas", "gradiag.client"])
def test_the_engine_schemas_and_client_import_no_server_package(module: str) -> None:
    script = f"import sys, {module}; print(sorted(set(sys.modules) & set({SERVER_ONLY!r})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_gradiag_check_url_runs_without_the_server_dependencies(live_server: str) -> None:
    """The `gradiag` command of a client-only install: `check --url` works; in process and
    `serve` say which extra they need (exit 2)."""
    block = f"import sys\nfor name in {SERVER_ONLY!r}:\n    sys.modules[name] = None\n"
    main = "from gradiag.service.cli import main\nsys.exit(main(sys.argv[1:]))"
    example = str(REPO / "examples" / "cs231n.graph.json")

    def gradiag(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", block + main, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    remote = gradiag("check", example, "--url", live_server)
    assert remote.returncode == 0, remote.stderr
    assert "ok" in remote.stdout
    local = gradiag("check", example)
    assert local.returncode == 2
    assert "gradiag[server]" in local.stderr
    serve = gradiag("serve")
    assert serve.returncode == 2
    assert "gradiag[server]" in serve.stderr


def test_the_pre_commit_hook_installs_the_server_extra() -> None:
    import tomllib

    import yaml

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    server = [dep.split("#")[0].strip() for dep in extra["optional-dependencies"]["server"]]
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["additional_dependencies"] == server
