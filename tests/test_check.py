"""`gradiag check`: exit codes, thresholds and their precedence, the four report formats,
and the same verdicts in process and through --url."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from gradiag.service.check import escape_data, escape_property
from gradiag.service.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
HEALTHY = str(EXAMPLES / "healthy.network.json")
DEAD = str(EXAMPLES / "dead-relu.network.json")  # 3 of 4 relu units dead: 75%
SATURATED = str(EXAMPLES / "saturated-sigmoid.network.json")
EXPLODING = str(EXAMPLES / "exploding.graph.json")
GRAPH = str(EXAMPLES / "cs231n.graph.json")
EXPRESSION = str(EXAMPLES / "cs231n-neuron.expression.json")
ALL_EXAMPLES = [HEALTHY, DEAD, SATURATED, EXPLODING, GRAPH, EXPRESSION]


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run from an empty directory, so the repo's own pyproject.toml is not read."""
    monkeypatch.chdir(tmp_path)


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, doc: Any) -> str:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(path)


# --- exit codes --------------------------------------------------------------------------


def test_healthy_network_graph_and_expression_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, HEALTHY, GRAPH, EXPRESSION)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"OK    {HEALTHY}  network: 3-layer neural network")
    assert lines[1].split() == ["layer", "units", "activation", "dead", "saturated", "grad",
                                "norm", "W", "status"]  # fmt: skip
    assert lines[2].split()[:5] == ["1", "16", "tanh", "-", "0"]
    assert f"OK    {GRAPH}  graph: output 'f' = -12" in out
    assert f"OK    {EXPRESSION}  expression: output" in out
    assert lines[-1] == "gradiag check: 3 files: 3 ok; exit 0"


@pytest.mark.parametrize(
    ("path", "finding"),
    [
        (DEAD, "fail  dead_relu at layer1"),
        (SATURATED, "fail  saturated_sigmoid at layer1"),
        (EXPLODING, "fail  nonfinite at"),
    ],
)
def test_unhealthy_examples_exit_1(
    capsys: pytest.CaptureFixture[str], path: str, finding: str
) -> None:
    code, out, _ = check(capsys, path)
    assert code == 1
    assert out.startswith(f"FAIL  {path}")
    assert finding in out


def test_dead_relu_table_row_counts_dead_units(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = check(capsys, DEAD)
    assert out.splitlines()[2].split() == ["1", "4", "relu", "3", "(75%)", "-", "0.0886", "fail"]


def test_warn_passes_unless_strict(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, DEAD, "--dead-fail", "0.9")
    assert (code, out.split()[0]) == (0, "WARN")
    code, out, _ = check(capsys, DEAD, "--dead-fail", "0.9", "--strict")
    assert (code, out.split()[0]) == (1, "WARN")


def test_unreadable_file_exits_2_and_the_others_still_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.json")
    code, out, _ = check(capsys, missing, GRAPH)
    assert code == 2
    assert f"ERROR {missing}  Unreadable input: cannot read {missing}" in out
    assert f"OK    {GRAPH}" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"output": "f"}', "cannot tell the kind"),
        ('{"nodes": [], "layers": []}', 'found "nodes" and "layers"'),
    ],
)
def test_files_that_are_not_gradiag_bodies_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, message: str
) -> None:
    code, out, _ = check(capsys, write(tmp_path / "bad.json", content))
    assert code == 2
    assert message in out


def test_invalid_graph_exits_2_with_the_problem_detail(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = write(tmp_path / "bad.graph.json", {
        "nodes": [{"id": "x", "op": "input", "value": 1.0},
                  {"id": "y", "op": "relu", "inputs": ["nope"]}],
        "output": "y",
    })  # fmt: skip
    code, out, _ = check(capsys, bad)
    assert code == 2
    assert out.startswith(f"ERROR {bad}  422 Invalid graph:")
    assert "nope" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dead-warn", "1.5", GRAPH], "flags: --dead-warn: Input should be less than or equal"),
        (["--config", "nowhere.toml", GRAPH], "config file nowhere.toml does not exist"),
        (["--config", "x.toml", "--no-config", GRAPH], "exclude each other"),
        (["--url", "127.0.0.1:8000", GRAPH], "is not an http:// or https:// URL"),
        (["--timeout", "0", GRAPH], "--timeout must be above 0"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = check(capsys, *argv)
    assert code == 2
    assert out == ""
    assert message in err


@pytest.mark.parametrize(
    "argv", [[], ["--format", "yaml", GRAPH], ["--dead-warn", "lots", GRAPH], ["--bogus", GRAPH]]
)
def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["check", *argv])
    assert caught.value.code == 2
    assert "usage: gradiag" in capsys.readouterr().err


def test_unreachable_url_exits_3_and_skips_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://127.0.0.1:9"
    code, out, _ = check(capsys, "--url", url, "--retries", "0", "--timeout", "2", GRAPH, HEALTHY)
    assert code == 3
    assert f"ERROR {GRAPH}  Service unavailable: cannot reach {url}/v1/graph" in out
    assert f"SKIP  {HEALTHY}" in out


def test_a_5xx_answer_exits_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr("gradiag.service.routes.network_report_of_request", broken)
    code, out, _ = check(capsys, HEALTHY, GRAPH)
    assert code == 3
    assert f"ERROR {HEALTHY}  500 Internal Server Error" in out
    assert f"OK    {GRAPH}" in out  # a 5xx is one file's answer: the others still run


def test_the_largest_exit_code_wins(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.json", "[]")
    assert check(capsys, DEAD, bad)[0] == 2
    assert check(capsys, HEALTHY, DEAD)[0] == 1


def test_stdin_is_read_for_a_dash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Stdin:
        buffer = Path(GRAPH).open("rb")  # noqa: SIM115

    monkeypatch.setattr(sys, "stdin", Stdin)
    code, out, _ = check(capsys, "-")
    Stdin.buffer.close()
    assert code == 0
    assert out.startswith("OK    -  graph:")


# --- thresholds: flags > the file's own > config > defaults ------------------------------------


def test_config_file_thresholds_apply(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "gradiag.toml").write_text("dead_fail = 0.9\n")
    assert check(capsys, DEAD)[0] == 0  # found in the working directory: 75% dead is a warn
    assert check(capsys, "--no-config", DEAD)[0] == 1
    config = tmp_path / "strict.toml"
    config.write_text("dead_fail = 0.9\nstrict = true\n")
    assert check(capsys, "--config", str(config), DEAD)[0] == 1
    assert check(capsys, "--config", str(config), "--no-strict", DEAD)[0] == 0


def test_pyproject_tool_gradiag_table_is_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.gradiag]\n'
                                             "dead_fail = 0.9\n")  # fmt: skip
    code, out, _ = check(capsys, DEAD)
    assert (code, out.split()[0]) == (0, "WARN")


def test_precedence_flags_over_file_over_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "gradiag.toml").write_text("dead_fail = 0.5\ndead_warn = 0.8\n")
    doc = json.loads(Path(DEAD).read_text())
    doc["thresholds"] = {"dead_fail": 0.9}
    own = write(tmp_path / "own.network.json", doc)
    # config dead_fail 0.5 is overridden by the file's 0.9; config dead_warn 0.8 still holds
    assert check(capsys, own)[1].split()[0] == "OK"
    # a flag beats both
    assert check(capsys, own, "--dead-fail", "0.7")[1].split()[0] == "FAIL"
    assert check(capsys, own, "--dead-warn", "0.1")[1].split()[0] == "WARN"


def test_unknown_config_key_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "gradiag.toml").write_text("dead_fial = 0.9\n")
    code, _, err = check(capsys, GRAPH)
    assert code == 2
    assert "unknown key(s) dead_fial" in err


# --- formats -----------------------------------------------------------------------------


def test_junit_report_structure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    missing = str(tmp_path / "missing.json")
    files = [HEALTHY, DEAD, SATURATED, missing]
    code, out, _ = check(capsys, "--format", "junit", "--output", str(report), *files)
    assert code == 2
    assert out.startswith("OK    ")  # the text report still goes to the terminal
    root = ET.parse(report).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    # one per file, plus the dead_relu, saturated_sigmoid, saturated_activations and
    # vanishing_gradient findings
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        (HEALTHY, "health"),
        (DEAD, "health"),
        (DEAD, "dead_relu at layer1"),
        (SATURATED, "health"),
        (SATURATED, "saturated_sigmoid at layer1"),
        (SATURATED, "saturated_activations at layer1"),
        (SATURATED, "vanishing_gradient at layer1"),
        (missing, "health"),
    ]
    failures = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    assert len(failures) == 5  # two files and their three fail findings; the warn passes
    assert [c.get("classname") for c in errors] == [missing]
    for element in (root, suite):
        assert element.get("tests") == str(len(cases))
        assert element.get("failures") == str(len(failures))
        assert element.get("errors") == str(len(errors))
        assert element.get("skipped") == "0"
    dead_failure = cases[2].find("failure")
    assert dead_failure is not None
    assert dead_failure.get("type") == "fail"
    assert "3 of 4 relu units" in (dead_failure.text or "")


def test_junit_strict_makes_warn_findings_failures(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = check(capsys, "--format", "junit", SATURATED)
    lenient = ET.fromstring(out.encode())
    _, out, _ = check(capsys, "--format", "junit", "--strict", SATURATED)
    strict = ET.fromstring(out.encode())
    assert (lenient.get("tests"), lenient.get("failures")) == ("4", "3")
    assert (strict.get("tests"), strict.get("failures")) == ("4", "4")


def test_github_format_emits_workflow_commands(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.json")
    code, out, _ = check(capsys, "--format", "github", HEALTHY, SATURATED, missing)
    assert code == 2
    lines = out.splitlines()
    file_prop = escape_property(SATURATED)
    assert lines[0].startswith(
        f"::error file={file_prop},title=gradiag fail%3A saturated_sigmoid at layer1::3 of 3 "
    )
    assert lines[1].startswith(
        f"::error file={file_prop},title=gradiag fail%3A saturated_activations at layer1::"
    )
    assert lines[2].startswith(
        f"::warning file={file_prop},title=gradiag warn%3A vanishing_gradient at layer1::"
    )
    assert lines[3].startswith(
        f"::error file={escape_property(missing)},title=gradiag%3A Unreadable input::cannot read"
    )
    assert lines[4] == "gradiag check: 3 files: 1 ok, 1 fail, 1 error; exit 2"
    assert len(lines) == 5  # nothing for a healthy file
    _, out, _ = check(capsys, "--format", "github", "--strict", SATURATED)
    assert out.splitlines()[2].startswith("::error ")


def test_github_escaping_follows_the_toolkit() -> None:
    assert escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"


def test_json_format(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.graph.json", {"nodes": [{"id": "x", "op": "bogus"}],
                                              "output": "x"})  # fmt: skip
    code, out, _ = check(capsys, "--format", "json", DEAD, GRAPH, bad)
    doc = json.loads(out)
    assert code == doc["exit_code"] == 2
    assert doc["status"] == "error"
    assert doc["summary"] == {"files": 3, "ok": 1, "warn": 0, "fail": 1, "error": 1,
                              "skipped": 0}  # fmt: skip
    dead, graph, invalid = doc["files"]
    assert (dead["kind"], dead["status"], dead["exit_code"]) == ("network", "fail", 1)
    assert dead["report"]["layers"][0]["dead_units"] == 3
    assert graph["report"]["output"] == {"id": "f", "value": -12.0, "shape": []}
    assert invalid["error"]["status"] == 422
    assert invalid["error"]["errors"][0]["node"] == "x"
    assert "report" not in invalid


def test_text_format_to_output_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    code, out, _ = check(capsys, "--output", str(report), GRAPH)
    assert code == 0
    assert report.read_text() == out


# --- in process and through --url agree --------------------------------------------------------


@pytest.mark.live
@pytest.mark.parametrize("fmt", ["json", "junit", "github"])
def test_url_gives_the_same_report_as_in_process(
    capsys: pytest.CaptureFixture[str], live_server: str, tmp_path: Path, fmt: str
) -> None:
    bad = write(tmp_path / "bad.graph.json", {"nodes": [{"id": "x", "op": "bogus"}],
                                              "output": "x"})  # fmt: skip
    files = [*ALL_EXAMPLES, bad, "--dead-fail", "0.8"]
    local = check(capsys, "--format", fmt, *files)
    remote = check(capsys, "--format", fmt, "--url", live_server, "--retries", "0", *files)
    assert local == remote
    assert local[0] == 2


# --- the console script -------------------------------------------------------------------


def test_console_script_runs_check(tmp_path: Path) -> None:
    script = shutil.which("gradiag", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "gradiag.service.cli"]
    done = subprocess.run(
        [*command, "check", "--format", "json", GRAPH, DEAD],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert [f["status"] for f in doc["files"]] == ["ok", "fail"]
