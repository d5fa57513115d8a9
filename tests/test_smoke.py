from flask.testing import FlaskClient


def test_cs231n_example1_over_http(client: FlaskClient) -> None:
    body = {
        "nodes": [
            {"id": "x", "op": "input", "value": -2},
            {"id": "y", "op": "input", "value": 5},
            {"id": "z", "op": "input", "value": -4},
            {"id": "q", "op": "add", "inputs": ["x", "y"]},
            {"id": "f", "op": "mul", "inputs": ["q", "z"]},
        ],
        "output": "f",
    }
    answer = client.post("/v1/graph", json=body).get_json()
    assert answer["output"]["value"] == -12.0
    grads = {k: v["grad"] for k, v in answer["nodes"].items()}
    assert grads == {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0, "f": 1.0}
