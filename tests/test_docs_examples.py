"""The request bodies in docs/ are pasted by users: every one must be answered, and the figures
the pages quote next to them must be what the service says."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```json\n(.*?)```", re.S)


def request_bodies() -> list[Any]:
    """Every ```json block of docs/ that parses and is a request body (not an answer)."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for k, text in enumerate(BLOCK.findall(page.read_text())):
            try:
                body = json.loads(text)
            except ValueError:
                continue  # an answer abridged with "..."
            if isinstance(body, dict) and is_request(body):
                found.append(pytest.param(body, id=f"{page.stem}-{k}"))
    return found


def is_request(body: dict[str, Any]) -> bool:
    """A graph (nodes or columns, with an output), an expression, or a network."""
    graph = ("nodes" in body or "columns" in body) and "output" in body
    return graph or "expression" in body or ("layers" in body and "loss" in body)


def endpoint(body: dict[str, Any]) -> str:
    return "/v1/network" if "layers" in body else "/v1/graph"


@pytest.mark.parametrize("body", request_bodies())
def test_every_request_in_the_docs_is_answered(client: FlaskClient, body: dict[str, Any]) -> None:
    response = client.post(endpoint(body), json=body)
    assert response.status_code == 200, response.get_data(as_text=True)


def doc_body(page: str, key: str) -> dict[str, Any]:
    """The first request body of a page that has `key`."""
    for text in BLOCK.findall((DOCS / page).read_text()):
        try:
            body = json.loads(text)
        except ValueError:
            continue
        if key in body:
            return dict(body)
    raise AssertionError(f"no body with {key!r} in {page}")


def conv_graph(page_text: str) -> dict[str, Any]:
    for text in BLOCK.findall(page_text):
        if '"conv2d"' in text and '"nodes"' in text:
            return dict(json.loads(text))
    raise AssertionError("no conv graph")


def test_the_conv_graph_of_api_md_says_what_the_page_says(client: FlaskClient) -> None:
    body = conv_graph((DOCS / "api.md").read_text())
    dead = client.post("/v1/graph", json=body).get_json()
    assert dead["health"]["status"] == "fail"
    assert [(f["code"], f["location"]) for f in dead["health"]["findings"]] == [("dead_relu", "a")]
    assert dead["nodes"]["z"]["value"] == [[[[-3.5, -3.5], [-3.5, -3.5]]]]
    body["nodes"][2]["value"] = [5.0]
    alive = client.post("/v1/graph", json=body).get_json()
    assert alive["health"]["status"] == "ok"
    assert alive["nodes"]["W"]["grad"] == [[[[2.0, 4.0], [8.0, 10.0]]]]


def test_the_conv_network_of_network_md_says_what_the_page_says(client: FlaskClient) -> None:
    body = doc_body("network.md", "input_shape")
    report = client.post("/v1/network", json=body).get_json()
    assert report["name"] == "3-layer neural network"
    quoted = '{"neurons": 15, "weights": 540, "biases": 15, "batchnorm": 16, "total": 571}'
    assert quoted in (DOCS / "network.md").read_text()
    assert report["parameters"] == json.loads(quoted)
    shapes = [(layer["type"], layer["shape"]) for layer in report["layers"]]
    assert shapes == [
        ("conv2d", [4, 12, 12]),
        ("maxpool2d", [4, 6, 6]),
        ("conv2d", [8, 6, 6]),
        ("batchnorm", [8, 6, 6]),
        ("avgpool2d", [8, 3, 3]),
        ("flatten", [72]),
        ("dense", [3]),
    ]
