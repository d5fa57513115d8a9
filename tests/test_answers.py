"""The full answers of small /v1/graph requests, pinned byte for byte: the CS231n examples
(shared/examples) and a graph with every kind of finding. A faster path through the report
must give these exact bytes (key order, float digits, non-finite strings, messages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

# The examples ship with the shared contract, in shared/ beside the repository.
EXAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "examples"

FINDINGS_BODY = {
    "expression": "relu(x) + sigmoid(100 * y) + 5000 * v + log(z) * w",
    "values": {"x": -1, "y": 2, "v": 1, "z": 0, "w": 3},
    "explain": True,
}

SIGMOID_ANSWER: dict[str, Any] = {
    "output": {"id": "sigmoid(w0 * x0 + w1 * x1 + w2)", "value": 0.7310585786300049, "shape": []},
    "nodes": {
        "w0": {
            "op": "input",
            "shape": [],
            "value": 2.0,
            "grad": -0.19661193324148185,
            "role": "leaf",
        },
        "w1": {
            "op": "input",
            "shape": [],
            "value": -3.0,
            "grad": -0.3932238664829637,
            "role": "leaf",
        },
        "w2": {
            "op": "input",
            "shape": [],
            "value": -3.0,
            "grad": 0.19661193324148185,
            "role": "leaf",
        },
        "x0": {
            "op": "input",
            "shape": [],
            "value": -1.0,
            "grad": 0.3932238664829637,
            "role": "leaf",
        },
        "x1": {
            "op": "input",
            "shape": [],
            "value": -2.0,
            "grad": -0.5898357997244456,
            "role": "leaf",
        },
        "w0 * x0": {
            "op": "mul",
            "shape": [],
            "value": -2.0,
            "grad": 0.19661193324148185,
            "role": "mul gate: scales each input's gradient by the other input (swap)",
            "inputs": ["w0", "x0"],
            "local_grad": {"w0": -1.0, "x0": 2.0},
        },
        "w1 * x1": {
            "op": "mul",
            "shape": [],
            "value": 6.0,
            "grad": 0.19661193324148185,
            "role": "mul gate: scales each input's gradient by the other input (swap)",
            "inputs": ["w1", "x1"],
            "local_grad": {"w1": -2.0, "x1": -3.0},
        },
        "w0 * x0 + w1 * x1": {
            "op": "add",
            "shape": [],
            "value": 4.0,
            "grad": 0.19661193324148185,
            "role": "add gate: distributes the gradient unchanged to every input",
            "inputs": ["w0 * x0", "w1 * x1"],
            "local_grad": {"w0 * x0": 1.0, "w1 * x1": 1.0},
        },
        "w0 * x0 + w1 * x1 + w2": {
            "op": "add",
            "shape": [],
            "value": 1.0,
            "grad": 0.19661193324148185,
            "role": "add gate: distributes the gradient unchanged to every input",
            "inputs": ["w0 * x0 + w1 * x1", "w2"],
            "local_grad": {"w0 * x0 + w1 * x1": 1.0, "w2": 1.0},
        },
        "sigmoid(w0 * x0 + w1 * x1 + w2)": {
            "op": "sigmoid",
            "shape": [],
            "value": 0.7310585786300049,
            "grad": 1.0,
            "role": "sigmoid gate: scales the gradient by s * (1 - s)",
            "inputs": ["w0 * x0 + w1 * x1 + w2"],
            "local_grad": {"w0 * x0 + w1 * x1 + w2": 0.19661193324148185},
        },
    },
    "parameters": {"tensors": 0, "total": 0},
    "diagnostics": {
        "relu": {"nodes": 0, "elements": 0, "dead_elements": 0, "dead_fraction": 0.0},
        "sigmoid": {"nodes": 1, "elements": 1, "saturated_elements": 0, "saturated_fraction": 0.0},
        "tanh": {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0},
        "nonfinite_nodes": [],
    },
    "health": {"status": "ok", "findings": []},
}

EXAMPLE1_ANSWER: dict[str, Any] = {
    "output": {"id": "f", "value": -12.0, "shape": []},
    "nodes": {
        "x": {"op": "input", "shape": [], "value": -2.0, "grad": -4.0, "role": "leaf"},
        "y": {"op": "input", "shape": [], "value": 5.0, "grad": -4.0, "role": "leaf"},
        "z": {"op": "input", "shape": [], "value": -4.0, "grad": 3.0, "role": "leaf"},
        "q": {
            "op": "add",
            "shape": [],
            "value": 3.0,
            "grad": -4.0,
            "role": "add gate: distributes the gradient unchanged to every input",
            "inputs": ["x", "y"],
            "local_grad": {"x": 1.0, "y": 1.0},
        },
        "f": {
            "op": "mul",
            "shape": [],
            "value": -12.0,
            "grad": 1.0,
            "role": "mul gate: scales each input's gradient by the other input (swap)",
            "inputs": ["q", "z"],
            "local_grad": {"q": -4.0, "z": 3.0},
        },
    },
    "parameters": {"tensors": 0, "total": 0},
    "diagnostics": {
        "relu": {"nodes": 0, "elements": 0, "dead_elements": 0, "dead_fraction": 0.0},
        "sigmoid": {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0},
        "tanh": {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0},
        "nonfinite_nodes": [],
    },
    "health": {"status": "ok", "findings": []},
}

FINDINGS_ANSWER: dict[str, Any] = {
    "output": {
        "id": "relu(x) + sigmoid(100 * y) + 5000 * v + log(z) * w",
        "value": "-Infinity",
        "shape": [],
    },
    "nodes": {
        "v": {"op": "input", "shape": [], "value": 1.0, "grad": 5000.0, "role": "leaf"},
        "w": {"op": "input", "shape": [], "value": 3.0, "grad": "-Infinity", "role": "leaf"},
        "x": {"op": "input", "shape": [], "value": -1.0, "grad": 0.0, "role": "leaf"},
        "y": {"op": "input", "shape": [], "value": 2.0, "grad": 0.0, "role": "leaf"},
        "z": {"op": "input", "shape": [], "value": 0.0, "grad": "Infinity", "role": "leaf"},
        "relu(x)": {
            "op": "relu",
            "shape": [],
            "value": 0.0,
            "grad": 1.0,
            "role": "relu gate: passes the gradient where x > 0 and blocks it elsewhere",
            "inputs": ["x"],
            "local_grad": {"x": 0.0},
        },
        "100": {"op": "const", "shape": [], "value": 100.0, "role": "leaf"},
        "100 * y": {
            "op": "mul",
            "shape": [],
            "value": 200.0,
            "grad": 0.0,
            "role": "mul gate: scales each input's gradient by the other input (swap)",
            "inputs": ["100", "y"],
            "local_grad": {"100": 2.0, "y": 100.0},
        },
        "sigmoid(100 * y)": {
            "op": "sigmoid",
            "shape": [],
            "value": 1.0,
            "grad": 1.0,
            "role": "sigmoid gate: scales the gradient by s * (1 - s)",
            "inputs": ["100 * y"],
            "local_grad": {"100 * y": 0.0},
        },
        "relu(x) + sigmoid(100 * y)": {
            "op": "add",
            "shape": [],
            "value": 1.0,
            "grad": 1.0,
            "role": "add gate: distributes the gradient unchanged to every input",
            "inputs": ["relu(x)", "sigmoid(100 * y)"],
            "local_grad": {"relu(x)": 1.0, "sigmoid(100 * y)": 1.0},
        },
        "5000": {"op": "const", "shape": [], "value": 5000.0, "role": "leaf"},
        "5000 * v": {
            "op": "mul",
            "shape": [],
            "value": 5000.0,
            "grad": 1.0,
            "role": "mul gate: scales each input's gradient by the other input (swap)",
            "inputs": ["5000", "v"],
            "local_grad": {"5000": 1.0, "v": 5000.0},
        },
        "relu(x) + sigmoid(100 * y) + 5000 * v": {
            "op": "add",
            "shape": [],
            "value": 5001.0,
            "grad": 1.0,
            "role": "add gate: distributes the gradient unchanged to every input",
            "inputs": ["relu(x) + sigmoid(100 * y)", "5000 * v"],
            "local_grad": {"relu(x) + sigmoid(100 * y)": 1.0, "5000 * v": 1.0},
        },
        "log(z)": {
            "op": "log",
            "shape": [],
            "value": "-Infinity",
            "grad": 3.0,
            "role": "scales the gradient by its local derivative",
            "inputs": ["z"],
            "local_grad": {"z": "Infinity"},
        },
        "log(z) * w": {
            "op": "mul",
            "shape": [],
            "value": "-Infinity",
            "grad": 1.0,
            "role": "mul gate: scales each input's gradient by the other input (swap)",
            "inputs": ["log(z)", "w"],
            "local_grad": {"log(z)": 3.0, "w": "-Infinity"},
        },
        "relu(x) + sigmoid(100 * y) + 5000 * v + log(z) * w": {
            "op": "add",
            "shape": [],
            "value": "-Infinity",
            "grad": 1.0,
            "role": "add gate: distributes the gradient unchanged to every input",
            "inputs": ["relu(x) + sigmoid(100 * y) + 5000 * v", "log(z) * w"],
            "local_grad": {"relu(x) + sigmoid(100 * y) + 5000 * v": 1.0, "log(z) * w": 1.0},
        },
    },
    "parameters": {"tensors": 0, "total": 0},
    "diagnostics": {
        "relu": {"nodes": 1, "elements": 1, "dead_elements": 1, "dead_fraction": 1.0},
        "sigmoid": {"nodes": 1, "elements": 1, "saturated_elements": 1, "saturated_fraction": 1.0},
        "tanh": {"nodes": 0, "elements": 0, "saturated_elements": 0, "saturated_fraction": 0.0},
        "nonfinite_nodes": [
            "w",
            "z",
            "log(z)",
            "log(z) * w",
            "relu(x) + sigmoid(100 * y) + 5000 * v + log(z) * w",
        ],
    },
    "health": {
        "status": "fail",
        "findings": [
            {
                "code": "dead_relu",
                "severity": "fail",
                "location": "relu(x)",
                "message": "relu node 'relu(x)': 1 of 1 elements (100%) are dead "
                "(input <= 0); no gradient flows through dead units; "
                "lower the learning rate, use leaky_relu, or initialise "
                "biases slightly positive.",
            },
            {
                "code": "saturated_sigmoid",
                "severity": "fail",
                "location": "sigmoid(100 * y)",
                "message": "sigmoid node 'sigmoid(100 * y)': 1 of 1 elements (100%) "
                "are saturated (within 0.01 of a bound); saturated "
                "sigmoids pass almost no gradient; prefer tanh or relu, "
                "or scale the inputs and weights down (Xavier init).",
            },
            {
                "code": "nonfinite",
                "severity": "fail",
                "location": "w",
                "message": "a non-finite gradient first appears at node 'w' "
                "(input); 5 node(s) hold NaN or Infinity. Look for "
                "overflow (exp, pow), log or sqrt of values <= 0, or "
                "division by zero there.",
            },
            {
                "code": "exploding_gradient",
                "severity": "warn",
                "location": "v",
                "message": "the gradient of 'v' has norm 5e+03, above 1000; lower "
                "the learning rate, clip gradients, or scale the inputs "
                "down.",
            },
        ],
    },
    "explanation": {
        "leaves": [
            {
                "id": "w",
                "shape": [],
                "grad": "-Infinity",
                "magnitude": "Infinity",
                "element": [],
                "sentence": "w: -inf — the gradient is not finite, so w's effect "
                "on the output cannot be read off",
            },
            {
                "id": "z",
                "shape": [],
                "grad": "Infinity",
                "magnitude": "Infinity",
                "element": [],
                "sentence": "z: inf — the gradient is not finite, so z's effect "
                "on the output cannot be read off",
            },
            {
                "id": "v",
                "shape": [],
                "grad": 5000.0,
                "magnitude": 5000.0,
                "element": [],
                "sentence": "v: 5000.0 — increasing v by a small h changes the "
                "output by about 5000.0h",
            },
            {
                "id": "x",
                "shape": [],
                "grad": 0.0,
                "magnitude": 0.0,
                "element": [],
                "sentence": "x: 0.0 — a small change in x does not change the "
                "output (to first order)",
            },
            {
                "id": "y",
                "shape": [],
                "grad": 0.0,
                "magnitude": 0.0,
                "element": [],
                "sentence": "y: 0.0 — a small change in y does not change the "
                "output (to first order)",
            },
        ]
    },
}


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text())


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (example("cs231n-sigmoid.expression.json"), SIGMOID_ANSWER),
        (example("cs231n-example1.graph.json"), EXAMPLE1_ANSWER),
        (FINDINGS_BODY, FINDINGS_ANSWER),
    ],
    ids=["cs231n-sigmoid", "cs231n-example1", "every-finding"],
)
def test_the_answer_is_pinned_byte_for_byte(
    client: FlaskClient, body: Any, answer: dict[str, Any]
) -> None:
    response = client.post("/v1/graph", json=body)
    assert response.status_code == 200
    assert response.data == orjson.dumps(answer)
