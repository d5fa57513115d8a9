"""POST /v1/graph.svg: the picture twin of /v1/graph (service/svg.py, docs/page.md)."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from system_packages import require

from gradiag.service import svg

SVG = "{http://www.w3.org/2000/svg}"
CS231N_1 = {"expression": "(x + y) * z", "values": {"x": -2, "y": 5, "z": -4}}


@pytest.fixture(scope="session")
def dot_installed() -> str:
    """Graphviz's dot; absent: the test skips (fails under CI, whose .ci/run installs it)."""
    return require("graphviz", lambda: shutil.which("dot"))


@pytest.fixture
def without_dot(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_which = shutil.which
    monkeypatch.setattr(
        svg.shutil, "which", lambda name, *a, **k: None if name == "dot" else real_which(name)
    )
    yield


def post_svg(client: FlaskClient, body: Any) -> tuple[Any, ET.Element]:
    response = client.post("/v1/graph.svg", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/svg+xml"
    return response, ET.fromstring(response.get_data())


def grad_labels(root: ET.Element) -> dict[str, str]:
    return {
        text.get("data-grad-for", ""): "".join(text.itertext())
        for text in root.iter(f"{SVG}text")
        if text.get("data-grad-for")
    }


def value_labels(root: ET.Element) -> dict[str, str]:
    return {
        text.get("data-value-for", ""): "".join(text.itertext())
        for text in root.iter(f"{SVG}text")
        if text.get("data-value-for")
    }


def drawn_nodes(root: ET.Element) -> dict[str, ET.Element]:
    return {
        g.get("data-node", ""): g
        for g in root.iter(f"{SVG}g")
        if "node" in (g.get("class") or "").split()
    }


def chain(n: int) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "x", "op": "input", "value": 0.5}]
    for i in range(1, n):
        nodes.append({"id": f"t{i}", "op": "tanh", "inputs": [nodes[-1]["id"]]})
    return {"nodes": nodes, "output": nodes[-1]["id"]}


# --- the picture -------------------------------------------------------------------------


def test_graph_svg_laid_out_by_dot_shows_cs231n_values_and_gradients(
    client: FlaskClient, dot_installed: str
) -> None:
    _, root = post_svg(client, CS231N_1)
    assert root.tag == f"{SVG}svg"
    assert root.get("data-layout") == "dot"
    grads = grad_labels(root)
    assert (grads["x"], grads["y"], grads["z"]) == ("-4", "-4", "3")
    assert grads["x + y"] == "-4" and grads["(x + y) * z"] == "1"
    values = value_labels(root)
    assert (values["x"], values["y"], values["z"], values["(x + y) * z"]) == (
        "-2",
        "5",
        "-4",
        "-12",
    )


def test_graph_svg_falls_back_to_grandalf_when_dot_is_absent(
    client: FlaskClient, without_dot: None
) -> None:
    _, root = post_svg(client, CS231N_1)
    assert root.get("data-layout") == "grandalf"
    grads = grad_labels(root)
    assert (grads["x"], grads["y"], grads["z"]) == ("-4", "-4", "3")
    assert set(drawn_nodes(root)) == {"x", "y", "z", "x + y", "(x + y) * z"}


def test_graph_svg_falls_back_when_dot_fails(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = shutil.which("false")  # a "dot" that exits 1 without output
    monkeypatch.setattr(svg.shutil, "which", lambda name, *a, **k: failing)
    _, root = post_svg(client, CS231N_1)
    assert root.get("data-layout") == "grandalf"


def test_gradient_labels_sit_below_their_wire_and_values_above(
    client: FlaskClient, without_dot: None
) -> None:
    _, root = post_svg(client, CS231N_1)
    for edge in root.iter(f"{SVG}g"):
        if edge.get("class") != "edge":
            continue
        texts = {t.get("class"): float(t.get("y", "0")) for t in edge.iter(f"{SVG}text")}
        assert texts["value"] < texts["grad"]


def test_dead_relu_and_nonfinite_nodes_are_highlighted(client: FlaskClient) -> None:
    body = {  # a batch of one example of two relu units, both dead, then 0 / 0
        "nodes": [
            {"id": "a", "op": "input", "value": [[-1.0, -2.0]]},
            {"id": "r", "op": "relu", "inputs": ["a"]},
            {"id": "W", "op": "param", "value": [[1.0], [1.0]]},
            {"id": "h", "op": "matmul", "inputs": ["r", "W"]},
            {"id": "z", "op": "const", "value": 0.0},
            {"id": "q", "op": "div", "inputs": ["h", "z"]},
        ],
        "output": "q",
    }
    _, root = post_svg(client, body)
    nodes = drawn_nodes(root)
    assert "sev-fail" in (nodes["r"].get("class") or "")
    findings = [t for t in root.iter(f"{SVG}text") if t.get("data-severity")]
    assert any("dead_relu" in "".join(t.itertext()) for t in findings)
    if "q" in nodes:
        assert "nonfinite" in (nodes["q"].get("class") or "")


def test_tensor_labels_list_short_vectors_and_summarise_others() -> None:
    assert svg.fmt_tensor([-1.0, 2.0, 3.0], [3]) == "[-1, 2, 3]"
    assert svg.fmt_tensor([[3.0, 0.0], [4.0, 0.0]], [2, 2]) == "[2×2] ‖·‖=5"
    assert svg.fmt_tensor("NaN", []) == "NaN"
    assert svg.fmt_tensor(-0.0, []) == "0"
    assert svg.fmt_tensor(0.19661193, []) == "0.1966"


# --- large graphs ------------------------------------------------------------------------


def test_large_graph_keeps_the_nodes_nearest_the_output(
    client: FlaskClient, without_dot: None
) -> None:
    body = chain(svg.MAX_DRAWN_NODES + 100)
    _, root = post_svg(client, body)
    nodes = drawn_nodes(root)
    assert len(nodes) == svg.MAX_DRAWN_NODES + 1  # the kept nodes and the summary box
    assert body["output"] in nodes and "x" not in nodes
    summary = "".join(nodes[svg.HIDDEN_KEY].itertext())
    assert "100 more nodes" in summary and "tanh×99" in summary


def test_visible_ids_walk_breadth_first_from_the_output() -> None:
    nodes = {"a": {}, "b": {"inputs": ["a"]}, "c": {"inputs": ["b", "a"]}}
    assert svg.visible_ids(nodes, "c") == ["a", "b", "c"]  # small: everything


# --- DOT text ----------------------------------------------------------------------------


def test_dot_strings_escape_quotes_backslashes_and_newlines() -> None:
    assert svg.dot_string('a "b" \\N\nc') == '"a \\"b\\" \\\\N\\nc"'


def test_hostile_labels_reach_dot_only_escaped_on_stdin(dot_installed: str) -> None:
    box = svg.Box("n0", ['"; n9 [label="pwn"]; \\G', "}{<>&"], ["node"], node_id="evil")
    drawing = svg.Drawing("t", [box, svg.Box("n0_out", [], point=True)], [svg.Wire("n0", "n0_out")])
    placed = svg.dot_layout(drawing, dot_installed)
    assert set(placed.centres) == {"n0", "n0_out"}  # no injected node
    root = ET.fromstring(svg.render(drawing, placed))
    assert '"; n9 [label="pwn"]; \\G' in "".join(root.itertext())


# --- errors and the contract -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b'{"nodes": [', "application/json", 400),
        (
            b'{"nodes": [{"id": "x", "op": "nope", "value": 1}], "output": "x"}',
            "application/json",
            422,
        ),
        (
            b'{"nodes": [{"id": "x", "op": "input", "value": 1}], "output": "y"}',
            "application/json",
            422,
        ),
        (b"{}", "text/plain", 415),
    ],
)
def test_graph_svg_errors_are_the_same_problem_json_as_the_json_twin(
    client: FlaskClient, data: bytes, content_type: str, status: int
) -> None:
    picture = client.post("/v1/graph.svg", data=data, content_type=content_type)
    twin = client.post("/v1/graph", data=data, content_type=content_type)
    assert picture.status_code == twin.status_code == status
    assert picture.mimetype == "application/problem+json"
    body, twin_body = picture.get_json(), twin.get_json()
    assert body["status"] == status
    assert body.get("errors") == twin_body.get("errors")


def test_openapi_lists_the_svg_endpoint(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    content = paths["/v1/graph.svg"]["post"]["responses"]["200"]["content"]
    assert "image/svg+xml" in content


# --- networks ----------------------------------------------------------------------------

NETWORK_REPORT = {
    "name": "2-layer neural network",
    "loss": 0.25,
    "parameters": {"neurons": 5, "weights": 16, "biases": 5, "total": 21},
    "layers": [
        {"index": 1, "units": 4, "activation": "relu", "parameters": {"weights": 12, "biases": 4},
         "dead_units": 1, "dead_fraction": 0.25, "saturated_units": 0, "saturated_fraction": 0.0,
         "grad_norm": {"W": 0.1, "b": 0.02}, "weight_norm": 1.3},
        {"index": 2, "units": 1, "activation": "linear", "parameters": {"weights": 4, "biases": 1},
         "dead_units": 0, "dead_fraction": 0.0, "saturated_units": 0, "saturated_fraction": 0.0,
         "grad_norm": {"W": 0.5, "b": 0.3}, "weight_norm": 0.7},
    ],
    "health": {"status": "warn", "findings": [
        {"code": "dead_relu", "severity": "warn", "location": "layer1",
         "message": "1 of 4 units (25%) are dead"}]},
}  # fmt: skip


@pytest.mark.parametrize("dot", [True, False], ids=["dot", "grandalf"])
def test_network_picture_draws_the_layer_chain_with_health(
    dot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not dot:
        monkeypatch.setattr(svg.shutil, "which", lambda name, *a, **k: None)
    else:
        require("graphviz", lambda: shutil.which("dot"))  # fails under CI, else skips
    root = ET.fromstring(svg.network_svg(NETWORK_REPORT, input_dim=3))
    nodes = drawn_nodes(root)
    assert list(nodes) == ["input", "layer1", "layer2", "loss"]
    assert "sev-warn" in (nodes["layer1"].get("class") or "")
    assert "dead 25%" in "".join(nodes["layer1"].itertext())
    assert "parameters: 21" in "".join(root.itertext())


def test_network_svg_endpoint_answers_svg_or_problem(client: FlaskClient) -> None:
    body = {
        "input_dim": 3,
        "layers": [{"units": 4, "activation": "relu"}, {"units": 1, "activation": "linear"}],
        "loss": "mse",
        "init": {"scheme": "he", "seed": 0},
        "batch": {"random": {"size": 8, "seed": 0}},
    }
    response = client.post("/v1/network.svg", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/svg+xml"
    nodes = drawn_nodes(ET.fromstring(response.get_data()))
    assert {"layer1", "layer2"} <= set(nodes)
    bad = client.post("/v1/network.svg", json={"input_dim": 3})
    assert bad.status_code == 422 and bad.mimetype == "application/problem+json"


def test_a_conv_net_picture_shows_each_layer_kind_and_its_image_shape(
    client: FlaskClient,
) -> None:
    body = {
        "input_shape": [1, 12, 12],
        "layers": [
            {"type": "conv2d", "filters": 4, "kernel": 3, "padding": 1, "activation": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"type": "flatten"},
            {"units": 3, "activation": "linear"},
        ],
        "loss": "softmax_cross_entropy",
        "init": {"scheme": "he", "seed": 0},
        "batch": {"random": {"size": 8, "seed": 0}},
    }
    response = client.post("/v1/network.svg", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    nodes = drawn_nodes(ET.fromstring(response.get_data()))
    text = {key: " ".join("".join(node.itertext()).split()) for key, node in nodes.items()}
    assert list(nodes) == ["input", "layer1", "layer2", "layer3", "layer4", "loss"]
    assert "1×12×12" in text["input"]
    assert "layer1 conv2d" in text["layer1"] and "4×12×12 relu" in text["layer1"]
    assert "filters" in text["layer1"] and "‖dW‖" in text["layer1"]
    assert "layer2 maxpool2d" in text["layer2"] and "4×6×6" in text["layer2"]
    assert "dead" not in text["layer2"] and "‖dW‖" not in text["layer2"]  # no units, no weights
    assert "144 units" in text["layer3"]
    assert "3 units linear" in text["layer4"]


# --- well-formed XML whatever the ids (docs/hardening.md) ---------------------------------


@pytest.mark.parametrize("bad", ["x\x01y", "tab\there", "new\nline", "del\x7f", "c1\x85", "\ufffe"])
def test_an_id_with_a_control_character_is_refused_at_validation(
    client: FlaskClient, bad: str
) -> None:
    body = {"nodes": [{"id": bad, "op": "input", "value": 1}], "output": bad}
    for path in ("/v1/graph", "/v1/graph.svg"):
        r = client.post(path, json=body)
        assert r.status_code == 422
        first = r.get_json()["errors"][0]
        assert first["loc"] == ["nodes", 0, "id"]
        assert first["msg"].startswith("must not contain control characters")


def test_ids_of_any_printable_text_make_well_formed_xml(client: FlaskClient) -> None:
    ids = ["<a&b>", "q\"u'o", "]]>", "ünïcødé ✓", "𝑥", "a" * 200]
    nodes = [{"id": i, "op": "input", "value": 1.0} for i in ids]
    nodes.append({"id": "s", "op": "add", "inputs": ids[:2]})
    _, root = post_svg(client, {"nodes": nodes, "output": "s"})
    assert {g.get("data-node") for g in root.iter(f"{SVG}g")} >= set(ids[:2])


def test_the_picture_writes_characters_xml_cannot_hold_as_visible_escapes() -> None:
    text = svg.xml_safe("a\x00b\x08c\x1fd\ufffe")
    assert text == "a\\u0000b\\u0008c\\u001fd\\ufffe"
    drawing = svg.Drawing(title="t\x01", boxes=[], wires=[], notes=["n\x02"])
    out = svg.render(drawing, svg.Layout(10, 10, {}, [], [], "test"))
    ET.fromstring(out)  # parses: well-formed


def test_a_summarised_tensor_is_labelled_by_its_shape_and_norm() -> None:
    summary = {"shape": [3, 4], "min": -1.0, "max": 2.0, "mean": 0.5, "norm": 5.0}
    assert svg.fmt_tensor(summary, [3, 4]) == "[3×4] ‖·‖=5"
    assert svg.fmt_tensor({"shape": [], "mean": 2.5, "norm": 2.5}, []) == "2.5"
