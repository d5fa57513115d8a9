"""The full answers of small /v1/graph requests, pinned byte for byte: the CS231n examples
(examples/) and a graph with every kind of finding. A faster path through the report
must give these exact bytes (key order, float digits, non-finite strings, messages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

# The contract's example requests, copied into the repository's examples/.
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ANSWERS = Path(__file__).resolve().parent / "answers"

# A batch of two examples: relu units that die (one of two, hidden: a matmul follows),
# sigmoid units that saturate (one of two), a steep input and a log of 0: every graded
# finding of a graph (dead_relu, saturated_sigmoid, saturated_activations,
# exploding_gradient, nonfinite).
FINDINGS_BODY = {
    "expression": "sum(relu(X @ W) @ V) + sum(sigmoid(100 * (X @ U)) @ V) + 5000 * v + log(z) * w",
    "values": {
        "X": [[1.0, -1.0], [2.0, -2.0]],
        "W": [[-1.0, 1.0], [0.0, 0.0]],
        "U": [[1.0, 0.0], [0.0, 0.0]],
        "V": [[1.0], [1.0]],
        "v": 1,
        "z": 0,
        "w": 3,
    },
    "explain": True,
}


def pinned(name: str) -> dict[str, Any]:
    """A pinned answer, tests/answers/<name>.json (JSON keeps the key order and every float
    exactly, so orjson writes it back byte for byte as the service does). The default node
    entry is lean (op, shape, value, grad); the `.explain` answers add each node's role,
    inputs and local_grad, and the explanation."""
    answer: dict[str, Any] = json.loads((ANSWERS / f"{name}.json").read_text())
    return answer


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text())


def explained(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "explain": True}


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (example("cs231n-sigmoid.expression.json"), pinned("cs231n-sigmoid")),
        (explained(example("cs231n-sigmoid.expression.json")), pinned("cs231n-sigmoid.explain")),
        (example("cs231n.graph.json"), pinned("cs231n-example1")),
        (explained(example("cs231n.graph.json")), pinned("cs231n-example1.explain")),
        (FINDINGS_BODY, pinned("every-finding")),
    ],
    ids=[
        "cs231n-sigmoid",
        "cs231n-sigmoid-explain",
        "cs231n-example1",
        "cs231n-example1-explain",
        "every-finding",
    ],
)
def test_the_answer_is_pinned_byte_for_byte(
    client: FlaskClient, body: Any, answer: dict[str, Any]
) -> None:
    response = client.post("/v1/graph", json=body)
    assert response.status_code == 200
    assert response.data == orjson.dumps(answer)
