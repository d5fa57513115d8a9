"""`gradiag check FILE...`: diagnose graph, expression and network files, for people and CI.

Each file is sent, as it is (plus any threshold overrides), to POST /v1/graph or
POST /v1/network; a model exported to ONNX (`FILE.onnx`, with `--batch BATCH.npz` and
`--loss LOSS`) goes to POST /v1/onnx as multipart/form-data. In process by default (the
app from `create_app`, through its test client), or to a running service with `--url`
(through `client.Client`). Both paths decode the answer with the same `client.decode`, so the
verdicts and the JSON report are the same.

Exit codes (the contract's "Command line"): 0 healthy; 1 when a file's health is `fail`
(or `warn` with `--strict`); 2 on an unreadable or invalid file (a 4xx answer) or a usage
error; 3 when the service cannot be reached or answers 5xx. With several files the largest
code wins (3 > 2 > 1 > 0). docs/ci.md has the details and CI recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import requests
from pydantic import ValidationError

from gradiag.client import Answer, Client, GradiagError, GradiagUnavailable, decode
from gradiag.client.api import Part
from gradiag.client.onnx import onnx_parts
from gradiag.schemas.common import Finding, Thresholds
from gradiag.schemas.graph import GraphResponse
from gradiag.schemas.network import NetworkResponse
from gradiag.schemas.onnx import OnnxLayerReport, OnnxResponse
from gradiag.service.packed import column_length

Kind = Literal["graph", "expression", "network", "onnx"]
Status = Literal["ok", "warn", "fail", "error", "skipped"]

ENDPOINTS: dict[Kind, str] = {
    "graph": "/v1/graph",
    "expression": "/v1/graph",
    "network": "/v1/network",
    "onnx": "/v1/onnx",
}
# the key that tells a body's kind (exactly one of them must be present)
KIND_KEYS: dict[str, Kind] = {
    "nodes": "graph",
    "columns": "graph",
    "expression": "expression",
    "layers": "network",
}

RESPONSES: dict[str, type[GraphResponse | NetworkResponse]] = {
    "network": NetworkResponse,
    "onnx": OnnxResponse,
}
EXIT_OK, EXIT_UNHEALTHY, EXIT_INPUT, EXIT_SERVICE = 0, 1, 2, 3
FORMATS = ("text", "json", "junit", "github")
THRESHOLD_FIELDS = tuple(Thresholds.model_fields)
CONFIG_KEYS = (*THRESHOLD_FIELDS, "strict")
TOKEN_ENV = "GRADIAG_TOKEN"


class UsageError(Exception):
    """A bad flag, config file or option combination: exit 2 before any file runs."""


class InputError(Exception):
    """A file that cannot be read or is not a gradiag body: that file exits 2."""


# --- arguments ---------------------------------------------------------------------------


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="graph, expression or network JSON ('-': stdin), or a model FILE.onnx",
    )
    parser.add_argument("--url", help="a running gradiag service (default: run in process)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request with --url (60)"
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="retries on connection errors and 502/503/504 (3)"
    )
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a `warn` health fails the check too (exit 1)",
    )
    parser.add_argument("--format", choices=FORMATS, default="text", help="report format")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="write the --format report to PATH; the text report still goes to stdout",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="a TOML file with thresholds and `strict` (default: ./gradiag.toml, else "
        "[tool.gradiag] in ./pyproject.toml)",
    )
    parser.add_argument("--no-config", action="store_true", help="read no config file")
    onnx = parser.add_argument_group("ONNX models", "for FILE.onnx (POST /v1/onnx)")
    onnx.add_argument("--batch", metavar="NPZ", help="a NumPy .npz with arrays x and y "
                      "(default: a random batch of the model's input shape)")  # fmt: skip
    onnx.add_argument("--loss", help="the loss on the model's output, e.g. softmax_cross_entropy")
    onnx.add_argument("--input", metavar="NAME", help="the graph input the batch feeds")
    limits = parser.add_argument_group(
        "thresholds", "override the body's `thresholds` (flags > file > config > defaults)"
    )
    limits.add_argument("--dead-warn", type=float, help="dead ReLU fraction that warns (0.10)")
    limits.add_argument("--dead-fail", type=float, help="dead ReLU fraction that fails (0.50)")
    limits.add_argument("--saturated-warn", type=float, help="saturated fraction that warns")
    limits.add_argument("--saturated-fail", type=float, help="saturated fraction that fails")
    limits.add_argument(
        "--eps",
        "--saturation-eps",
        dest="saturation_eps",
        type=float,
        help="a sigmoid/tanh output within eps of a bound is saturated (0.01)",
    )
    limits.add_argument(
        "--vanishing-ratio", type=float, help="||dW layer1|| / ||dW last|| below this warns"
    )
    limits.add_argument(
        "--exploding-norm", type=float, help="a gradient norm above this warns (1000)"
    )


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    strict: bool
    config_thresholds: dict[str, float]
    flag_thresholds: dict[str, float]
    config_path: Path | None
    onnx: dict[str, str] = field(default_factory=dict)  # --batch, --loss, --input as given


def find_config(args: argparse.Namespace, cwd: Path) -> tuple[Path | None, dict[str, Any]]:
    """The config table: --config PATH, else ./gradiag.toml, else ./pyproject.toml's
    [tool.gradiag]. A pyproject.toml (given or found) is read at [tool.gradiag]; any other
    file at its top level."""
    if args.no_config:
        if args.config:
            raise UsageError("--config and --no-config exclude each other")
        return None, {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist")
        return path, _config_table(path)
    for name in ("gradiag.toml", "pyproject.toml"):
        path = cwd / name
        if path.is_file():
            table = _config_table(path)
            if table or name == "gradiag.toml":
                return path, table
    return None, {}


def _config_table(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read config {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config {path} is not valid TOML: {err}") from None
    if path.name != "pyproject.toml":
        return doc
    table = doc.get("tool", {}).get("gradiag", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.gradiag] must be a table")
    return table


def options_of(args: argparse.Namespace, cwd: Path) -> Options:
    config_path, table = find_config(args, cwd)
    where = f"config {config_path}"
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}"
        )
    strict = table.get("strict", False)
    if not isinstance(strict, bool):
        raise UsageError(f"{where}: strict must be true or false")
    if args.strict is not None:
        strict = args.strict
    config_thresholds = {k: v for k, v in table.items() if k in THRESHOLD_FIELDS}
    flag_thresholds = {
        k: getattr(args, k) for k in THRESHOLD_FIELDS if getattr(args, k, None) is not None
    }
    _check_thresholds(config_thresholds, where)
    _check_thresholds(flag_thresholds, "flags")
    if args.timeout <= 0:
        raise UsageError("--timeout must be above 0")
    if args.retries < 0:
        raise UsageError("--retries must be 0 or more")
    if args.url is not None and not args.url.startswith(("http://", "https://")):
        raise UsageError(f"--url {args.url!r} is not an http:// or https:// URL")
    onnx = {k: getattr(args, k) for k in ("batch", "loss", "input") if getattr(args, k, None)}
    return Options(strict, config_thresholds, flag_thresholds, config_path, onnx)


def _check_thresholds(values: Mapping[str, Any], where: str) -> None:
    """The wire model's own rules (types, ranges), so a bad value is a usage error here
    rather than a 422 on every file."""
    try:
        Thresholds.model_validate(values)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        name = ".".join(str(p) for p in first["loc"])
        flag = f"--{name.replace('_', '-')}" if where == "flags" else name
        raise UsageError(f"{where}: {flag}: {first['msg']}") from None


# --- loading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    kind: Kind
    body: bytes
    parts: dict[str, Part] | None = None  # a multipart body (an ONNX model)


def load(path: str, options: Options, stdin: Callable[[], bytes]) -> Loaded:
    """Read a file, tell its kind, merge the thresholds (defaults < config < the file's own
    `thresholds` < flags, field by field). Raises InputError."""
    if path.endswith(".onnx"):
        return load_onnx(path, options)
    try:
        raw = stdin() if path == "-" else Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    keys = [key for key in KIND_KEYS if key in doc]
    if len(keys) != 1:
        found = " and ".join(f'"{k}"' for k in keys) or "none of them"
        raise InputError(
            f'{path}: cannot tell the kind: expected exactly one of "nodes" or "columns" '
            f'(graph), "expression" or "layers" (network); found {found}'
        )
    own = doc.get("thresholds", {})
    if not (options.config_thresholds or options.flag_thresholds) or not isinstance(own, dict):
        # sent untouched (a `thresholds` that is not an object is the service's 422)
        return Loaded(KIND_KEYS[keys[0]], raw)
    doc["thresholds"] = {**options.config_thresholds, **own, **options.flag_thresholds}
    return Loaded(KIND_KEYS[keys[0]], json.dumps(doc).encode())


def load_onnx(path: str, options: Options) -> Loaded:
    """A model file, its batch (--batch) and the request part: --loss, --input, thresholds
    (config < flags)."""
    if "loss" not in options.onnx:
        raise InputError(f"{path}: an ONNX model needs --loss (e.g. softmax_cross_entropy)")
    request: dict[str, Any] = {"loss": options.onnx["loss"]}
    if "input" in options.onnx:
        request["input"] = options.onnx["input"]
    thresholds = {**options.config_thresholds, **options.flag_thresholds}
    if thresholds:
        request["thresholds"] = thresholds
    batch_path = options.onnx.get("batch")
    try:
        model = Path(path).read_bytes()
        batch = None if batch_path is None else Path(batch_path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {err.filename}: {err.strerror or err}") from None
    body = json.dumps(request).encode()
    return Loaded("onnx", body, onnx_parts(model, body, batch))


# --- running -----------------------------------------------------------------------------


class Runner(Protocol):
    def post(self, path: str, body: bytes) -> Answer: ...

    def post_parts(self, path: str, parts: Mapping[str, Part]) -> Answer: ...


class InProcess:
    """The service's own app and views, through Flask's test client."""

    def __init__(self) -> None:
        try:
            import flask  # noqa: F401
        except ImportError:
            raise UsageError(
                "checking in process needs the server extra (pip install 'gradiag[server]'); "
                "or check through a running service with --url"
            ) from None
        from gradiag.service import create_app
        from gradiag.service.config import ConfigError, Settings

        try:
            settings = Settings.from_env()
        except ConfigError as err:
            raise UsageError(str(err)) from None
        # no access log on stdout (it would mix with the report); no token needed in process
        settings = dataclasses.replace(settings, log_level="critical", api_token=None)
        self._client = create_app(settings).test_client()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> Answer:
        response = self._client.post(path, data=body, content_type=content_type)
        return Answer(response.status_code, response.content_type or "", response.get_data())

    def post_parts(self, path: str, parts: Mapping[str, Part]) -> Answer:
        """The multipart body encoded as the client encodes it (requests), in memory."""
        prepared = requests.Request("POST", f"http://in-process{path}", files=parts).prepare()
        body = prepared.body if isinstance(prepared.body, bytes) else b""
        return self.post(path, body, content_type=str(prepared.headers["Content-Type"]))


class Remote:
    """A running service, through client.Client (timeouts, retries, bearer token)."""

    def __init__(self, url: str, timeout: float, retries: int, token: str | None) -> None:
        self.client = Client(url, token=token, timeout=timeout, retries=retries)

    def post(self, path: str, body: bytes) -> Answer:
        return self.client.post_raw(path, body)

    def post_parts(self, path: str, parts: Mapping[str, Part]) -> Answer:
        return self.client.post_parts_raw(path, parts)


@dataclass
class FileResult:
    file: str
    kind: Kind | None = None
    status: Status = "error"
    exit_code: int = EXIT_INPUT
    report: dict[str, Any] | None = None
    model: GraphResponse | NetworkResponse | None = None
    error: dict[str, Any] | None = None

    @property
    def findings(self) -> list[Finding]:
        return self.model.health.findings if self.model is not None else []


def check_file(
    path: str, runner: Runner, options: Options, stdin: Callable[[], bytes]
) -> FileResult:
    result = FileResult(path)
    try:
        loaded = load(path, options, stdin)
    except InputError as err:
        result.error = {"title": "Unreadable input", "detail": str(err)}
        return result
    result.kind = loaded.kind
    model = RESPONSES.get(loaded.kind, GraphResponse)
    try:
        endpoint = ENDPOINTS[loaded.kind]
        if loaded.parts is not None:
            answer = runner.post_parts(endpoint, loaded.parts)
        else:
            answer = runner.post(endpoint, loaded.body)
        report = decode(answer, model)
    except GradiagError as err:
        result.exit_code = EXIT_INPUT if err.is_client_error else EXIT_SERVICE
        result.error = {
            "status": err.status,
            "title": err.title,
            "detail": err.detail,
            "errors": err.errors,
        }
        if isinstance(err, GradiagUnavailable):
            raise Unreachable(result) from None
        return result
    result.model = report
    result.report = json.loads(answer.content)
    result.status = report.health.status
    unhealthy = report.health.status == "fail" or (options.strict and result.status == "warn")
    result.exit_code = EXIT_UNHEALTHY if unhealthy else EXIT_OK
    return result


class Unreachable(Exception):
    def __init__(self, result: FileResult) -> None:
        super().__init__(result.file)
        self.result = result


def check_files(
    files: Sequence[str], runner: Runner, options: Options, stdin: Callable[[], bytes]
) -> list[FileResult]:
    """Every file in order; once the service cannot be reached the rest are skipped."""
    results: list[FileResult] = []
    for k, path in enumerate(files):
        try:
            results.append(check_file(path, runner, options, stdin))
        except Unreachable as err:
            results.append(err.result)
            for rest in files[k + 1 :]:
                detail = "not run: the service could not be reached"
                results.append(
                    FileResult(
                        rest, status="skipped", exit_code=EXIT_SERVICE, error={"detail": detail}
                    )
                )
            break
    return results


def exit_code_of(results: Sequence[FileResult]) -> int:
    return max((r.exit_code for r in results), default=EXIT_OK)


# --- rendering ---------------------------------------------------------------------------

LABELS = {"ok": "OK", "warn": "WARN", "fail": "FAIL", "error": "ERROR", "skipped": "SKIP"}


def num(value: Any) -> str:
    """A report number ("Infinity" and friends stay words)."""
    return f"{value:.3g}" if isinstance(value, float | int) else str(value)


def percent(count: int, fraction: float) -> str:
    return f"{count} ({fraction:.0%})"


def summary_counts(results: Sequence[FileResult]) -> dict[str, int]:
    counts = {"files": len(results), "ok": 0, "warn": 0, "fail": 0, "error": 0, "skipped": 0}
    for r in results:
        counts[r.status] += 1
    return counts


def summary_line(results: Sequence[FileResult]) -> str:
    c = summary_counts(results)
    parts = [f"{c[s]} {s}" for s in ("ok", "warn", "fail", "error", "skipped") if c[s]]
    noun = "file" if c["files"] == 1 else "files"
    return f"gradiag check: {c['files']} {noun}: {', '.join(parts)}; exit {exit_code_of(results)}"


def node_count(g: GraphResponse) -> int:
    if g.columns is not None:  # lists, or packed (`encoding: "packed"`)
        return column_length(g.columns.value)
    return len(g.nodes or {})


def headline(r: FileResult) -> str:
    label = LABELS[r.status].ljust(5)
    if isinstance(r.model, NetworkResponse):
        n = r.model
        what = (
            f"{r.kind}: {n.name}, loss {num(n.loss)}, {n.parameters.total} parameters, "
            f"batch {n.batch_size}"
        )
    elif isinstance(r.model, GraphResponse):
        g = r.model
        what = (
            f"{r.kind}: output {short(g.output.id)!r} = "
            f"{num_or_shape(g.output.value, g.output.shape)}, "
            f"{node_count(g)} nodes, {g.parameters.total} parameters"
        )
    else:
        err = r.error or {}
        status = f"{err['status']} " if err.get("status") else ""
        what = f"{status}{err.get('title', '')}: {err.get('detail', '')}".lstrip(": ")
    return f"{label} {r.file}  {what}"


def short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def num_or_shape(value: Any, shape: list[int]) -> str:
    return num(value) if not shape else "tensor " + "x".join(str(d) for d in shape)


def layer_table(n: NetworkResponse) -> list[str]:
    header = ("layer", "units", "activation", "dead", "saturated", "grad norm W", "status")
    rows = [header]
    for layer in n.layers:
        dead = layer.activation in ("relu", "leaky_relu")
        saturating = layer.activation in ("sigmoid", "tanh")
        rows.append(
            (
                layer_label(layer),
                "-" if layer.units is None else str(layer.units),
                layer.activation or "-",
                percent(layer.dead_units, layer.dead_fraction) if dead else "-",
                percent(layer.saturated_units, layer.saturated_fraction) if saturating else "-",
                num(layer.grad_norm.W),
                layer.status,
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def layer_label(layer: Any) -> str:
    """A layer's first column: its index, and its type (an ONNX node: its name)."""
    if isinstance(layer, OnnxLayerReport):
        return f"{layer.index} {layer.name}"
    return str(layer.index) if layer.type == "dense" else f"{layer.index} {layer.type}"


def render_text(results: Sequence[FileResult]) -> str:
    lines: list[str] = []
    for r in results:
        lines.append(headline(r))
        if isinstance(r.model, NetworkResponse):
            lines.extend(layer_table(r.model))
        for f in r.findings:
            lines.append(f"  {f.severity:<4}  {f.code} at {f.location}: {f.message}")
        for e in (r.error or {}).get("errors") or []:
            loc = ".".join(str(p) for p in e.get("loc", [])) or "body"
            node = f" (node {e['node']!r})" if e.get("node") else ""
            lines.append(f"  - {loc}{node}: {e.get('msg', '')}")
    lines.append(summary_line(results))
    return "\n".join(lines) + "\n"


def render_json(results: Sequence[FileResult], strict: bool) -> str:
    files: list[dict[str, Any]] = []
    for r in results:
        entry: dict[str, Any] = {
            "file": r.file,
            "kind": r.kind,
            "status": r.status,
            "exit_code": r.exit_code,
        }
        if r.report is not None:
            entry["report"] = r.report
        if r.error is not None:
            entry["error"] = r.error
        files.append(entry)
    doc = {
        "status": worst_status(results),
        "exit_code": exit_code_of(results),
        "strict": strict,
        "summary": summary_counts(results),
        "files": files,
    }
    return json.dumps(doc, indent=2) + "\n"


def worst_status(results: Sequence[FileResult]) -> str:
    order = ("ok", "warn", "fail", "error")
    statuses = ["error" if r.status == "skipped" else r.status for r in results]
    return max(statuses, key=order.index, default="ok")


def _fails(severity: str, strict: bool) -> bool:
    return severity == "fail" or (strict and severity == "warn")


def render_junit(results: Sequence[FileResult], strict: bool) -> str:
    """One <testsuite> per run; per file a `health` test case and one per finding. A fail
    (and a warn with --strict) is a <failure>, an unreadable/invalid file or a service
    error an <error>, a file not run after the service went away <skipped>."""
    suites = ET.Element("testsuites", name="gradiag check")
    suite = ET.SubElement(suites, "testsuite", name="gradiag check")
    for r in results:
        case = ET.SubElement(suite, "testcase", name="health", classname=r.file, file=r.file)
        if r.status == "skipped":
            ET.SubElement(case, "skipped", message=(r.error or {}).get("detail", "not run"))
        elif r.model is None:
            err = r.error or {}
            status = err.get("status")
            kind = f"http {status}" if status else "input" if r.exit_code == 2 else "unavailable"
            element = ET.SubElement(
                case, "error", type=kind, message=f"{err.get('title')}: {err.get('detail')}"
            )
            element.text = (
                "\n".join(
                    f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}"
                    for e in err.get("errors") or []
                )
                or None
            )
        elif _fails(r.status, strict):
            failure = ET.SubElement(
                case,
                "failure",
                type=r.status,
                message=f"health {r.status}: {len(r.findings)} finding(s)",
            )
            failure.text = "\n".join(
                f"{f.severity} {f.code} at {f.location}: {f.message}" for f in r.findings
            )
        else:
            ET.SubElement(case, "system-out").text = f"health {r.status}"
        for f in r.findings:
            name = f"{f.code} at {f.location}"
            finding = ET.SubElement(suite, "testcase", name=name, classname=r.file, file=r.file)
            if _fails(f.severity, strict):
                failure = ET.SubElement(
                    finding, "failure", type=f.severity, message=f"{f.severity}: {f.message}"
                )
                failure.text = f.message
            else:
                ET.SubElement(finding, "system-out").text = f"{f.severity}: {f.message}"
    cases = suite.findall("testcase")
    counts = {
        "tests": len(cases),
        "failures": sum(1 for c in cases if c.find("failure") is not None),
        "errors": sum(1 for c in cases if c.find("error") is not None),
        "skipped": sum(1 for c in cases if c.find("skipped") is not None),
    }
    for element in (suites, suite):
        for key, value in counts.items():
            element.set(key, str(value))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def escape_data(text: str) -> str:
    """A workflow command's message (GitHub's toolkit: %, \\r, \\n)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value: also `:` and `,`."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_command(level: str, file: str, title: str, message: str) -> str:
    props = f"file={escape_property(file)},title={escape_property(title)}"
    return f"::{level} {props}::{escape_data(message)}"


def render_github(results: Sequence[FileResult], strict: bool) -> str:
    """GitHub Actions workflow commands: `::error` for a fail (and a warn with --strict) and
    for a file that could not be checked, `::warning` for a warn; then a summary line."""
    lines: list[str] = []
    for r in results:
        if r.model is None:
            err = r.error or {}
            detail = str(err.get("detail", ""))
            for e in err.get("errors") or []:
                detail += f"\n{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}"
            title = f"gradiag: {err.get('title', 'not run')}"
            lines.append(github_command("error", r.file, title, detail))
        for f in r.findings:
            level = "error" if _fails(f.severity, strict) else "warning"
            title = f"gradiag {f.severity}: {f.code} at {f.location}"
            lines.append(github_command(level, r.file, title, f.message))
    lines.append(summary_line(results))
    return "\n".join(lines) + "\n"


def render(fmt: str, results: Sequence[FileResult], strict: bool) -> str:
    if fmt == "json":
        return render_json(results, strict)
    if fmt == "junit":
        return render_junit(results, strict)
    if fmt == "github":
        return render_github(results, strict)
    return render_text(results)


# --- the command -------------------------------------------------------------------------


@dataclass
class Streams:
    stdout: Any = field(default_factory=lambda: sys.stdout)
    stderr: Any = field(default_factory=lambda: sys.stderr)
    stdin: Callable[[], bytes] = field(default_factory=lambda: sys.stdin.buffer.read)


def run_check(args: argparse.Namespace, streams: Streams | None = None) -> int:
    streams = streams or Streams()
    try:
        options = options_of(args, Path.cwd())
        runner: Runner
        if args.url:
            runner = Remote(args.url, args.timeout, args.retries, os.environ.get(TOKEN_ENV))
        else:
            runner = InProcess()
    except UsageError as err:
        print(f"gradiag check: error: {err}", file=streams.stderr)
        return EXIT_INPUT
    try:
        results = check_files(args.files, runner, options, streams.stdin)
    finally:
        if isinstance(runner, Remote):
            runner.client.close()
    report = render(args.format, results, options.strict)
    if args.output:
        try:
            Path(args.output).write_text(report, encoding="utf-8")
        except OSError as err:
            print(f"gradiag check: error: cannot write {args.output}: {err}", file=streams.stderr)
            return EXIT_INPUT
        streams.stdout.write(render_text(results))
    else:
        streams.stdout.write(report)
    return exit_code_of(results)
