"""GET /: the page, end to end in headless Chromium against a live gunicorn (docs/page.md).

Debian's chromium is driven by Playwright (PyPI); `playwright install` is never run (it
downloads a browser). Where /usr/bin/chromium is absent the browser tests skip (and fail
under CI, whose .ci/run installs it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from system_packages import require

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STATIC = Path(__file__).resolve().parent.parent / "service" / "static"
DONE = "#status[data-state=done], #status[data-state=error]"


# --- without a browser -------------------------------------------------------------------


def test_index_is_served_with_a_same_origin_only_policy(client: FlaskClient) -> None:
    with client.get("/") as response:
        assert response.status_code == 200 and response.mimetype == "text/html"
        policy = response.headers["Content-Security-Policy"]
        page = response.get_data(as_text=True)
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert "/static/vendor/dagre.min.js" in assets and "/static/app.js" in assets
    for asset in assets:
        with client.get(asset) as response:
            assert response.status_code == 200, asset


def test_page_assets_name_no_other_host() -> None:
    for path in ["index.html", "app.js", "style.css"]:
        text = (STATIC / path).read_text()
        hosts = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not hosts, f"{path} refers to {hosts}"


def test_vendored_layout_library_comes_with_its_licences() -> None:
    vendor = STATIC / "vendor"
    assert (vendor / "dagre.min.js").stat().st_size > 10_000
    for licence in ["dagre.LICENSE", "graphlib.LICENSE"]:
        assert "Permission is hereby granted" in (vendor / licence).read_text()


# --- in the browser ----------------------------------------------------------------------


def _chromium() -> str:
    return require("chromium", lambda: CHROMIUM if os.path.exists(CHROMIUM) else None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) missing")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, live_server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda err: errors.append(str(err)))
    opened.goto(f"{live_server}/")
    opened.wait_for_selector("body[data-ready=true]")
    yield opened
    context.close()
    assert not errors, errors


def run_example(page: Any, name_start: str) -> str:
    options = page.locator("#example option").all_inner_texts()
    index = next(i for i, text in enumerate(options) if text.startswith(name_start))
    page.select_option("#example", str(index))
    page.click("#run")
    page.wait_for_selector(DONE)
    return str(page.inner_text("#status"))


def label(page: Any, attribute: str, node: str) -> str:
    return str(page.locator(f'#graph text[{attribute}="{node}"]').first.text_content())


def test_page_draws_cs231n_example_1_with_gradients_below_the_wires(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert run_example(page, "CS231n example 1") == "/v1/graph: ok"
    grads = [label(page, "data-grad-for", node) for node in "xyz"]
    assert grads == ["-4", "-4", "3"]
    values = [label(page, "data-value-for", node) for node in "xyz"]
    assert values == ["-2", "5", "-4"]
    assert label(page, "data-grad-for", "(x + y) * z") == "1"
    for node in "xyz":
        value = page.locator(f'#graph text[data-value-for="{node}"]').first.bounding_box()
        grad = page.locator(f'#graph text[data-grad-for="{node}"]').first.bounding_box()
        assert value["y"] < grad["y"], node  # value above the wire, gradient below
    assert page.locator("#graph g.node").count() == 5
    assert "No findings" in page.inner_text("#findings")
    shot = tmp_path_factory.mktemp("page") / "cs231n_example_1.png"
    page.locator("#graph-section").screenshot(path=str(shot))
    assert shot.stat().st_size > 1000


def test_page_highlights_dead_relu_and_lists_findings(page: Any) -> None:
    assert run_example(page, "Dead ReLU and saturated sigmoid") == "/v1/graph: fail"
    assert "sev-fail" in (page.get_attribute('#graph g.node[data-node="h"]', "class") or "")
    assert "sev-warn" in (page.get_attribute('#graph g.node[data-node="s"]', "class") or "")
    codes = page.locator("#findings li").evaluate_all("els => els.map(e => e.dataset.code)")
    assert codes == ["dead_relu", "saturated_sigmoid", "saturated_activations"]
    assert page.inner_text("#findings li .sev >> nth=0") == "fail"


def test_page_collapses_a_large_graph_near_the_output(page: Any) -> None:
    assert run_example(page, "Large graph") == "/v1/graph: ok"
    assert page.locator("#graph g.node").count() == 201  # 200 nearest nodes + the summary box
    assert "100 more nodes" in page.text_content('#graph g.node[data-node="hidden"]')
    assert "showing the 200 nearest the output" in page.inner_text("#graph-note")


def test_page_shows_the_problem_of_a_bad_body(page: Any) -> None:
    page.fill("#body", '{"nodes": [')
    page.click("#run")
    page.wait_for_selector(DONE)
    assert page.get_attribute("#status", "data-state") == "error"
    assert page.inner_text("#status").startswith("400 ")


NETWORK_REPORT = {
    "name": "3-layer neural network",
    "loss": 0.5,
    "parameters": {"neurons": 16, "weights": 80, "biases": 16, "total": 96},
    "layers": [
        {"index": 1, "units": 8, "activation": "relu", "parameters": {"weights": 24, "biases": 8},
         "dead_units": 4, "dead_fraction": 0.5, "saturated_units": 0, "saturated_fraction": 0.0,
         "grad_norm": {"W": 0.003, "b": 0.001}, "weight_norm": 2.0},
        {"index": 2, "units": 6, "activation": "sigmoid",
         "parameters": {"weights": 48, "biases": 6}, "dead_units": 0, "dead_fraction": 0.0,
         "saturated_units": 3, "saturated_fraction": 0.5, "grad_norm": {"W": 0.2, "b": 0.05},
         "weight_norm": 1.0},
        {"index": 3, "units": 2, "activation": "linear", "parameters": {"weights": 12, "biases": 2},
         "dead_units": 0, "dead_fraction": 0.0, "saturated_units": 0, "saturated_fraction": 0.0,
         "grad_norm": {"W": 4.0, "b": 1.0}, "weight_norm": 0.5},
    ],
    "health": {"status": "fail", "findings": [
        {"code": "dead_relu", "severity": "fail", "location": "layer1",
         "message": "4 of 8 relu units (50%) are dead"},
        {"code": "saturated_sigmoid", "severity": "fail", "location": "layer2",
         "message": "3 of 6 sigmoid units (50%) are saturated"}]},
}  # fmt: skip


def test_page_draws_a_network_chart_tables_and_findings(page: Any) -> None:
    """The page's side of a network answer (a contract-shaped report, served to the page in
    place of the live endpoint so this test does not depend on the network engine)."""
    import json

    page.route(
        "**/v1/network",
        lambda route: route.fulfill(
            status=200, content_type="application/json", body=json.dumps(NETWORK_REPORT)
        ),
    )
    assert run_example(page, "Network: 3 -> relu") == "/v1/network: fail"
    rows = page.locator("#layer-chart g.layer-row")
    assert rows.count() == 3
    dead = page.locator('#layer-chart g[data-layer="layer1"] rect.bar.dead')
    assert dead.get_attribute("data-value") == "0.5"
    assert float(dead.get_attribute("width")) > 100
    grads = page.locator("#layer-chart rect.bar.gradW")
    widths = [float(grads.nth(i).get_attribute("width")) for i in range(3)]
    assert widths[0] < widths[1] < widths[2]  # 0.003 < 0.2 < 4 on the log axis
    table = page.inner_text("#param-table")
    assert "96" in table and "neurons" in table
    codes = page.locator("#findings li").evaluate_all("els => els.map(e => e.dataset.code)")
    assert codes == ["dead_relu", "saturated_sigmoid"]


def test_page_runs_a_network_example_against_the_live_service(
    page: Any, live_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    status = run_example(page, "Network: 3 -> relu")
    assert status.startswith("/v1/network: "), status
    assert page.locator("#layer-chart g.layer-row").count() == 3
    assert page.locator("#findings li").count() >= 1
    assert "total" in page.inner_text("#param-table")
    shot = tmp_path_factory.mktemp("page") / "network.png"
    page.screenshot(path=str(shot), full_page=True)


def test_page_runs_a_conv_net_example_against_the_live_service(page: Any) -> None:
    assert run_example(page, "Conv net:").startswith("/v1/network: ")
    assert page.locator("#layer-chart g.layer-row").count() == 4
    label = page.locator('#layer-chart g[data-layer="layer1"] text.axis-label').text_content()
    assert label == "layer1 conv2d relu"
    table = page.inner_text("#layer-table")
    assert "conv2d" in table and "4×12×12" in table and "maxpool2d" in table and "4×6×6" in table


def test_page_draws_the_training_timeline_of_a_sweep(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The training example against the live service: one line per learning rate and relu
    layer, ending where the answer's table ends; the table lists the four rates."""
    status = run_example(page, "Training sweep")
    assert status.startswith("/v1/network: "), status
    lines = page.locator("#timeline polyline.series")
    assert lines.count() == 8  # 4 rates x 2 relu layers
    found = {
        (lines.nth(i).get_attribute("data-lr"), lines.nth(i).get_attribute("data-layer"))
        for i in range(8)
    }
    assert found == {(lr, layer) for lr in ("0.1", "0.5", "1", "2") for layer in ("1", "2")}
    points = lines.first.get_attribute("points") or ""
    assert len(points.split()) == 51  # steps 0, 2, ..., 98 and the last, 99
    table = page.inner_text("#training-table")
    rows = [row for row in table.splitlines() if row.strip()[:1].isdigit()]
    assert len(rows) == 4 and "dead layer1" in table

    def last(lr: str) -> float:
        selector = f'#timeline polyline[data-lr="{lr}"][data-layer="1"]'
        return float(page.get_attribute(selector, "data-last") or "nan")

    assert last("2") > last("0.1")  # the seed's claim, on the page's own small set-up
    shot = tmp_path_factory.mktemp("page") / "training.png"
    page.locator("#training-section").screenshot(path=str(shot))
    assert shot.stat().st_size > 1000


def test_page_hides_the_timeline_without_training(page: Any) -> None:
    assert run_example(page, "Network: 3 -> relu").startswith("/v1/network: ")
    assert page.locator("#training-section").is_hidden()
