"""POST /v1/onnx over HTTP (Flask's test client): the parts, the request, the batch, and every
kind of bad input a client can send, each a 4xx problem+json located at its part, field or
node; never a 500. The model here is a small MLP built with onnx.helper as torch's legacy
exporter writes one (Gemm with transB=1, Relu)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import oracle_models as om
import pytest
from flask.testing import FlaskClient
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import multipart, npz, post_onnx
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from gradiag.schemas.onnx import OnnxResponse
from gradiag.service import create_app
from gradiag.service.config import Settings

Array = np.ndarray[Any, np.dtype[Any]]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oracle" / "onnx_models"
RNG = np.random.default_rng(7)
W1, B1 = RNG.standard_normal((8, 4)), RNG.standard_normal(8)
W2, B2 = RNG.standard_normal((3, 8)), RNG.standard_normal(3)
X, Y = RNG.standard_normal((5, 4)), np.array([0, 2, 1, 1, 0])
LOSS = {"loss": "softmax_cross_entropy"}


def mlp_proto(batch: int | str = 5, opset: int = 17) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="/0/Gemm", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="/1/Relu"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["scores"], name="/2/Gemm", transB=1),
    ]
    inits = {"W1": W1, "b1": B1, "W2": W2, "b2": B2}
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [batch, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.DOUBLE, [batch, 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def mlp(**options: Any) -> bytes:
    return bytes(mlp_proto(**options).SerializeToString())


def reference(x: Array = X) -> tuple[Array, Array]:
    h = x @ W1.T + B1
    return h, np.maximum(h, 0) @ W2.T + B2


def problem(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = response.get_json()
    assert body["status"] == status
    return body


def locs(body: dict[str, Any]) -> list[list[Any]]:
    return [error["loc"] for error in body["errors"]]


# --- the answer --------------------------------------------------------------------------


def test_an_mlp_is_diagnosed_with_its_nodes_as_layers(client: FlaskClient) -> None:
    response = post_onnx(client, mlp(), {**LOSS, "include": ["gradients"]}, npz(x=X, y=Y))
    assert response.status_code == 200, response.get_data(as_text=True)
    report = OnnxResponse.model_validate_json(response.get_data())
    h, scores = reference()
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert report.loss == pytest.approx(-log_p[np.arange(5), Y].mean(), rel=1e-13)
    assert [(layer.name, layer.op_type) for layer in report.layers] == [
        ("/0/Gemm", "Gemm"), ("/1/Relu", "Relu"), ("/2/Gemm", "Gemm"),
    ]  # fmt: skip
    first, relu, _ = report.layers
    assert first.initializers == {"W": "W1", "b": "b1"}
    assert first.parameters.weights == 32 and first.parameters.biases == 8
    assert first.fan_in == 4 and first.units == 8
    assert relu.activation == "relu"
    assert relu.dead_unit_indices == np.flatnonzero((h <= 0).all(axis=0)).tolist()
    assert report.parameters.total == 32 + 8 + 24 + 3 and report.parameters.neurons == 11
    assert report.name == "2-layer neural network" and report.batch_size == 5
    assert report.model.input == "x" and report.model.output == "scores"
    assert report.model.opset == 17 and report.model.nodes == 3
    nodes = report.nodes
    assert nodes is not None
    assert set(nodes) >= {"x", "W1", "b1", "W2", "b2", "h", "a", "scores", "loss"}
    assert np.array(nodes["W1"].grad).shape == (8, 4)  # the initializer's own layout
    np.testing.assert_allclose(np.array(nodes["scores"].value), scores, rtol=1e-13)


def test_the_batch_may_be_json_in_the_request(client: FlaskClient) -> None:
    as_json = post_onnx(client, mlp(), {**LOSS, "batch": {"x": X.tolist(), "y": Y.tolist()}})
    as_npz = post_onnx(client, mlp(), LOSS, npz(x=X, y=Y))
    assert as_json.status_code == as_npz.status_code == 200
    assert as_json.get_json()["loss"] == as_npz.get_json()["loss"]


def test_without_a_batch_a_random_one_of_the_inputs_batch_size(client: FlaskClient) -> None:
    first = post_onnx(client, mlp(), LOSS).get_json()
    again = post_onnx(client, mlp(), {**LOSS, "batch": {"random": {"size": 5}}}).get_json()
    assert first["batch_size"] == 5 and first["loss"] == again["loss"]  # seed 0 both times
    other = post_onnx(client, mlp(), {**LOSS, "batch": {"random": {"size": 5, "seed": 1}}})
    assert other.get_json()["loss"] != first["loss"]
    symbolic = post_onnx(client, mlp(batch="N"), {**LOSS, "batch": {"random": {"size": 9}}})
    assert symbolic.get_json()["batch_size"] == 9
    body = problem(post_onnx(client, mlp(batch="N"), LOSS), 422)
    assert locs(body) == [["batch", "random", "size"]]


def test_a_symbolic_batch_axis_takes_any_batch(client: FlaskClient) -> None:
    x = RNG.standard_normal((11, 4))
    response = post_onnx(client, mlp(batch="N"), LOSS, npz(x=x, y=np.zeros(11)))
    assert response.status_code == 200 and response.get_json()["batch_size"] == 11


def test_thresholds_and_the_other_losses(client: FlaskClient) -> None:
    strict = {**LOSS, "thresholds": {"dead_warn": 0.0, "dead_fail": 0.01}}
    h, _ = reference()
    report = post_onnx(client, mlp(), strict, npz(x=X, y=Y)).get_json()
    dead = int((h <= 0).all(axis=0).sum())
    assert report["health"]["status"] == ("fail" if dead else "warn")
    mse = post_onnx(client, mlp(), {"loss": "mse"}, npz(x=X, y=np.zeros((5, 3))))
    _, scores = reference()
    assert mse.get_json()["loss"] == pytest.approx(np.mean(scores**2), rel=1e-13)
    total = post_onnx(client, mlp(), {"loss": "sum"}, npz(x=X))
    assert total.get_json()["loss"] == pytest.approx(scores.sum(), rel=1e-13)
    f32 = post_onnx(client, mlp(), {**LOSS, "dtype": "float32"}, npz(x=X, y=Y)).get_json()
    assert f32["dtype"] == "float32" and f32["loss"] == pytest.approx(report["loss"], rel=1e-5)


# --- bad input: each a 4xx problem+json --------------------------------------------------

NOT_ONNX = [b"", b"hello, world", b'{"nodes": []}', b"\x89PNG\r\n\x1a\n" + bytes(64)]


@pytest.mark.parametrize("data", NOT_ONNX, ids=["empty", "text", "json", "png"])
def test_bytes_that_are_not_an_onnx_model_are_400(client: FlaskClient, data: bytes) -> None:
    """400, as malformed JSON is: the part does not decode as an ONNX model at all."""
    body = problem(post_onnx(client, data, LOSS, npz(x=X, y=Y)), 400)
    assert body["title"] == "Not an ONNX model" and locs(body) == [["model"]]
    assert body["type"] == "urn:gradiag:problem:not-onnx"  # not malformed JSON's


def test_a_request_part_with_a_key_twice_is_a_400_at_the_key(client: FlaskClient) -> None:
    part = '{"loss": "softmax_cross_entropy", "loss": "mse"}'
    body = problem(post_onnx(client, mlp(), part, npz(x=X, y=Y)), 400)
    assert body["type"] == "urn:gradiag:problem:malformed-json"
    assert locs(body) == [["request", "loss"]]


def test_an_answer_over_the_limit_is_refused_before_the_model_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer's size from the compiled shapes, as /v1/network's: `nodes` of every
    gradient does not fit in 60 kB (their summaries would); without `include` the answer does."""
    from gradiag.onnx_import import frontend

    client = create_app(Settings(max_response_bytes=60_000), TESTING=True).test_client()
    batch = npz(x=np.zeros((64, 4)), y=np.zeros(64, dtype=np.int64))
    assert post_onnx(client, mlp(batch=64), LOSS, batch).status_code == 200
    monkeypatch.setattr(frontend, "run", lambda *a, **k: pytest.fail("the model ran"))
    wide = {**LOSS, "include": ["gradients"]}
    body = problem(post_onnx(client, mlp(batch=64), wide, batch), 422)
    assert body["limit"] == "max_response_bytes" and locs(body) == [["include"]]
    assert "summary" in body["detail"]


def test_tensors_summary_writes_each_node_as_five_numbers(client: FlaskClient) -> None:
    asked = {**LOSS, "include": ["gradients"], "tensors": "summary"}
    response = post_onnx(client, mlp(), asked, npz(x=X, y=Y))
    assert response.status_code == 200, response.get_data(as_text=True)
    w1 = response.get_json()["nodes"]["W1"]
    assert w1["value"]["shape"] == [8, 4]
    assert w1["value"]["max"] == pytest.approx(W1.max(), rel=1e-15)
    assert w1["value"]["norm"] == pytest.approx(np.linalg.norm(W1), rel=1e-12)


def test_every_truncation_of_a_model_is_a_4xx_never_a_500(client: FlaskClient) -> None:
    """A cut-short file is 400 (protobuf cannot decode it, or it decodes to no graph); a
    cut that happens to leave a well-formed but incomplete model would be a 422 at what is
    missing. Never a 500."""
    data = mlp()
    statuses = set()
    for n in range(0, len(data), 7):
        response = post_onnx(client, data[:n], LOSS, npz(x=X, y=Y))
        statuses.add(response.status_code)
        assert response.status_code in (400, 422), n
    assert 400 in statuses


def test_an_opset_below_13_is_refused(client: FlaskClient) -> None:
    body = problem(post_onnx(client, mlp(opset=12), LOSS, npz(x=X, y=Y)), 422)
    assert "opset 12" in body["detail"] and locs(body) == [["model", "opset_import", 0]]


def test_external_data_is_refused_before_anything_is_read(client: FlaskClient) -> None:
    proto = mlp_proto()
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    body = problem(post_onnx(client, proto.SerializeToString(), LOSS, npz(x=X, y=Y)), 422)
    assert "external" in body["detail"]
    assert body["errors"][0]["node"] == "W1"
    assert locs(body) == [["model", "graph", "initializer", 0]]


def test_a_batch_that_does_not_fit_the_input_names_both_shapes(client: FlaskClient) -> None:
    x = RNG.standard_normal((5, 6))
    body = problem(post_onnx(client, mlp(), LOSS, npz(x=x, y=Y)), 422)
    assert body["errors"][0]["node"] == "x"
    assert "[5, 6]" in body["detail"] and "'x' takes [5, 4]" in body["detail"]
    assert locs(body) == [["batch", "x"]]
    other_size = post_onnx(client, mlp(), LOSS, npz(x=X[:3], y=Y[:3]))
    assert "[5, 4]" in problem(other_size, 422)["detail"]


@pytest.mark.parametrize(
    ("y", "loc"),
    [(np.array([0, 1, 2, 3, 0]), ["batch", "y", 3]), (np.zeros(4), ["batch", "y"])],
    ids=["label out of range", "too few labels"],
)
def test_bad_targets_are_located(client: FlaskClient, y: Array, loc: list[Any]) -> None:
    assert locs(problem(post_onnx(client, mlp(), LOSS, npz(x=X, y=y)), 422)) == [loc]


def test_a_class_loss_needs_y(client: FlaskClient) -> None:
    assert locs(problem(post_onnx(client, mlp(), LOSS, npz(x=X)), 422)) == [["batch", "y"]]


def test_missing_and_unknown_parts(client: FlaskClient) -> None:
    body = problem(post_onnx(client, mlp(), None, npz(x=X, y=Y)), 422)
    assert locs(body) == [["request"]]
    data, kind = multipart({"request": json.dumps(LOSS)})
    assert locs(problem(client.post("/v1/onnx", data=data, content_type=kind), 422)) == [["model"]]
    extra = post_onnx(client, mlp(), LOSS, npz(x=X, y=Y), weights=b"1")
    assert locs(problem(extra, 422)) == [["weights"]]


def test_bad_json_in_the_request_is_400_and_a_bad_field_422(client: FlaskClient) -> None:
    body = problem(post_onnx(client, mlp(), '{"loss": ', npz(x=X, y=Y)), 400)
    assert body["title"] == "Malformed JSON"
    wrong = problem(post_onnx(client, mlp(), {"loss": "hinge"}, npz(x=X, y=Y)), 422)
    assert locs(wrong) == [["request", "loss"]] and wrong["detail"].startswith("request: loss")
    typo = problem(post_onnx(client, mlp(), {**LOSS, "inclde": []}, npz(x=X, y=Y)), 422)
    assert locs(typo) == [["request", "inclde"]]


def test_the_batch_given_twice_is_refused(client: FlaskClient) -> None:
    request = {**LOSS, "batch": {"x": X.tolist(), "y": Y.tolist()}}
    assert locs(problem(post_onnx(client, mlp(), request, npz(x=X, y=Y)), 422)) == [
        ["request", "batch"]
    ]


def test_an_npz_with_pickles_is_refused_unread(client: FlaskClient) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}, None], dtype=object))  # a pickled object array
    body = problem(post_onnx(client, mlp(), LOSS, buffer.getvalue()), 422)
    assert "dtype object" in body["detail"] and locs(body) == [["batch", "x"]]


@pytest.mark.parametrize(
    ("batch", "loc"),
    [
        (npz(y=Y), ["batch", "x"]),
        (npz(x=X, y=Y, z=Y), ["batch", "z"]),
        (b"not a zip", ["batch"]),
        (npz(x=np.array(["a", "b"])), ["batch", "x"]),
    ],
    ids=["no x", "unknown array", "not a zip", "strings"],
)
def test_a_bad_npz_is_422_at_the_batch(client: FlaskClient, batch: bytes, loc: list[Any]) -> None:
    body = problem(post_onnx(client, mlp(), LOSS, batch), 422)
    assert body["title"] == "Invalid batch" and locs(body) == [loc]


def test_a_compressed_npz_is_read_within_its_header_size(client: FlaskClient) -> None:
    """A compressed member cannot inflate past the elements its header declares, and the
    header's count is checked against max_tensor_elements before reading."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=X, y=Y)
    assert post_onnx(client, mlp(), LOSS, buffer.getvalue()).status_code == 200
    small = create_app(Settings(max_tensor_elements=10)).test_client()
    body = problem(post_onnx(small, mlp(), LOSS, buffer.getvalue()), 422)
    assert body["limit"] == "max_tensor_elements"


def test_not_multipart_is_415_and_a_broken_multipart_body_400(client: FlaskClient) -> None:
    problem(client.post("/v1/onnx", json=LOSS), 415)
    problem(client.post("/v1/onnx", data=b"x", content_type="multipart/form-data"), 415)
    broken = client.post(
        "/v1/onnx", data=b"--b\r\nno headers here", content_type="multipart/form-data; boundary=b"
    )
    assert problem(broken, 400)["title"] == "Malformed multipart body"


def test_a_model_over_the_body_limit_is_413_declared_or_chunked() -> None:
    small = create_app(Settings(max_body_bytes=1000)).test_client()
    data, kind = multipart({"model": mlp(), "request": json.dumps(LOSS)})
    assert len(data) > 1000
    body = problem(small.post("/v1/onnx", data=data, content_type=kind), 413)
    assert body["limit"] == "max_body_bytes" and body["limit_value"] == 1000
    environ = EnvironBuilder(path="/v1/onnx", method="POST", content_type=kind).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = io.BytesIO(data)
    environ["wsgi.input_terminated"] = True
    problem(small.open(Request(environ)), 413)


@pytest.mark.parametrize(
    ("settings", "limit"),
    [
        (Settings(max_tensor_elements=20), "max_tensor_elements"),
        (Settings(max_total_elements=50), "max_total_elements"),
        (Settings(max_flops=100), "max_flops"),
        (Settings(max_nodes=2), "max_nodes"),
        (Settings(max_batch=4), "max_batch"),
    ],
)
def test_the_limits_refuse_before_compute(settings: Settings, limit: str) -> None:
    limited = create_app(settings).test_client()
    body = problem(post_onnx(limited, mlp(), LOSS, npz(x=X, y=Y)), 422)
    assert body["limit"] == limit and body["title"] == "Over a limit"


def test_an_initializer_over_the_limit_is_refused_from_its_dims(client: FlaskClient) -> None:
    """The dims say 10^12 elements; the data is 8 bytes. Refused from the dims, unconverted."""
    proto = mlp_proto()
    tensor = proto.graph.initializer[0]
    del tensor.dims[:]
    tensor.dims.extend([10**6, 10**6])
    body = problem(post_onnx(client, proto.SerializeToString(), LOSS, npz(x=X, y=Y)), 422)
    assert body["limit"] == "max_tensor_elements" and body["errors"][0]["node"] == "W1"


def test_an_initializer_whose_bytes_do_not_fit_its_dims(client: FlaskClient) -> None:
    proto = mlp_proto()
    proto.graph.initializer[1].raw_data = b"\x00" * 12
    body = problem(post_onnx(client, proto.SerializeToString(), LOSS, npz(x=X, y=Y)), 422)
    assert "12 bytes" in body["detail"] and locs(body) == [["model", "graph", "initializer", 1]]


def test_an_unsupported_op_lists_every_type_and_node_before_compute(client: FlaskClient) -> None:
    proto = mlp_proto()
    for k, op in enumerate(["Erf", "Gelu", "Erf"]):
        proto.graph.node.append(helper.make_node(op, ["scores"], [f"u{k}"], name=f"bad{k}"))
    body = problem(post_onnx(client, proto.SerializeToString(), LOSS, npz(x=X, y=Y)), 422)
    assert body["unsupported"] == {"Erf": ["bad0", "bad2"], "Gelu": ["bad1"]}
    assert locs(body) == [["model", "graph", "node", 3], ["model", "graph", "node", 4]]


def test_several_inputs_or_outputs_need_a_name(client: FlaskClient) -> None:
    proto = mlp_proto()
    proto.graph.output.append(helper.make_tensor_value_info("h", TensorProto.DOUBLE, [5, 8]))
    data = proto.SerializeToString()
    body = problem(post_onnx(client, data, LOSS, npz(x=X, y=Y)), 422)
    assert locs(body) == [["request", "output"]]
    named = post_onnx(client, data, {**LOSS, "output": "scores"}, npz(x=X, y=Y))
    assert named.status_code == 200
    wrong = post_onnx(client, data, {**LOSS, "output": "nope"}, npz(x=X, y=Y))
    assert "'scores'" in problem(wrong, 422)["detail"]


def test_a_model_naming_a_tensor_loss_is_refused(client: FlaskClient) -> None:
    proto = mlp_proto()
    proto.graph.node[1].output[0] = "loss"
    proto.graph.node[2].input[0] = "loss"
    body = problem(post_onnx(client, proto.SerializeToString(), LOSS, npz(x=X, y=Y)), 422)
    assert "'loss'" in body["detail"] and body["errors"][0]["node"] == "/1/Relu"


def test_the_openapi_document_describes_the_multipart_body(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    operation = document["paths"]["/v1/onnx"]["post"]
    body = operation["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["model", "request"]
    assert body["encoding"]["request"]["contentType"] == "application/json"
    assert set(operation["responses"]) >= {"200", "400", "413", "415", "422"}
    assert {"OnnxRequest", "OnnxResponse", "OnnxLayerReport"} <= set(
        document["components"]["schemas"]
    )


def test_metrics_count_onnx_reports(client: FlaskClient) -> None:
    assert post_onnx(client, mlp(), LOSS, npz(x=X, y=Y)).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert 'kind="onnx"' in text and 'endpoint="/v1/onnx"' in text


def test_a_conv_over_max_scratch_elements_is_refused_before_compute() -> None:
    """im2col's columns, estimated by the compiler on shapes alone (LeNet's first conv)."""
    model = om.lenet()
    data = (FIXTURES / "lenet.legacy.onnx").read_bytes()
    limited = create_app(Settings(max_scratch_elements=1000)).test_client()
    body = problem(post_onnx(limited, data, LOSS, npz(x=model.x, y=model.y)), 422)
    assert body["limit"] == "max_scratch_elements"
    assert body["errors"][0]["node"] == "/0/Conv_output_0"  # the conv's output tensor


def test_explain_adds_each_nodes_role(client: FlaskClient) -> None:
    request = {**LOSS, "include": ["gradients"], "explain": True}
    nodes = post_onnx(client, mlp(), request, npz(x=X, y=Y)).get_json()["nodes"]
    assert nodes["h"]["op"] == "affine" and nodes["h"]["inputs"] == ["x", "h::0.transpose", "b1"]
    assert nodes["a"]["role"].startswith("relu gate")
