"""The OpenAPI 3.1 document, assembled from the Pydantic wire models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gradiag.schemas.common import Problem
from gradiag.schemas.graph import GraphBody, GraphResponse
from gradiag.schemas.network import NetworkRequest, NetworkResponse
from gradiag.schemas.onnx import OnnxRequest, OnnxResponse
from gradiag.schemas.service import OpsResponse, ProbeResponse

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (GraphBody, "validation"),
    (GraphResponse, "serialization"),
    (NetworkRequest, "validation"),
    (NetworkResponse, "serialization"),
    (OnnxRequest, "validation"),
    (OnnxResponse, "serialization"),
    (OpsResponse, "serialization"),
    (ProbeResponse, "serialization"),
    (Problem, "serialization"),
]

_ERRORS = {
    "400": "Malformed JSON",
    "401": "Missing or wrong bearer token (only when GRADIAG_API_TOKEN is set; docs/hardening.md)",
    "408": "The body did not arrive within GRADIAG_BODY_TIMEOUT",
    "413": "Body over the size limit",
    "415": "Not application/json",
    "422": "Valid JSON but not a valid graph (the errors point at the field or node), or over "
    "a limit (`limit`, `limit_value`: the size limits, the answer and memory limits, the time "
    "budget)",
    "503": "The worker's memory is held by answers still being sent; retry after `Retry-After`",
}
_API_ERRORS = ["400", "401", "408", "413", "415", "422", "503"]
# The token is optional: `{}` is the alternative "no security" (GRADIAG_API_TOKEN unset).
_API_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _problems(codes: list[str]) -> dict[str, Any]:
    return {
        code: {
            "description": _ERRORS[code],
            "content": {"application/problem+json": {"schema": _ref(Problem)}},
        }
        for code in codes
    }


def _post(summary: str, request: type[BaseModel], response: type[BaseModel]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": {
                    "description": "The report",
                    "content": {"application/json": {"schema": _ref(response)}},
                },
                **_problems(_API_ERRORS),
            },
            "security": _API_SECURITY,
        }
    }


def _post_svg(summary: str, request: type[BaseModel]) -> dict[str, Any]:
    """A picture twin of a JSON endpoint: the same body and problems, an SVG answer."""
    return {
        "post": {
            "summary": summary,
            "description": "The same body and the same problem+json errors as the JSON "
            "endpoint; the answer is an SVG picture (docs/page.md).",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": {
                    "description": "The picture",
                    "content": {"image/svg+xml": {"schema": {"type": "string"}}},
                },
                **_problems(_API_ERRORS),
            },
            "security": _API_SECURITY,
        }
    }


# POST /v1/onnx: the same problems, but a 400 is also a body that does not split into parts or
# a model that is not an ONNX file, and a 415 anything but multipart/form-data (docs/onnx.md)
_ONNX_ERRORS = {
    **_ERRORS,
    "400": "A body that does not split into parts, a `request` part that is not JSON, or a "
    "`model` part that does not decode as an ONNX model",
    "415": "Not multipart/form-data",
    "422": "A part missing or unknown, an invalid request, a model gradiag cannot take (an "
    "opset below 13, external data; unsupported op types are listed all at once in "
    "`errors` and `unsupported`), a batch that does not fit the model's input, or over a "
    "limit (`limit`, `limit_value`)",
}


def _post_onnx() -> dict[str, Any]:
    """The multipart body: the model's bytes, the JSON request, an optional .npz batch."""
    binary = {"type": "string", "contentMediaType": "application/octet-stream"}
    body = {
        "type": "object",
        "required": ["model", "request"],
        "properties": {
            "model": {**binary, "description": "the .onnx file's bytes"},
            "request": _ref(OnnxRequest),
            "batch": {**binary, "description": "a NumPy .npz with arrays x and y (optional)"},
        },
    }
    encoding = {
        "model": {"contentType": "application/octet-stream"},
        "request": {"contentType": "application/json"},
        "batch": {"contentType": "application/octet-stream"},
    }
    operation = _post(
        "A model exported to ONNX, lowered to a graph: per-node health", OnnxRequest, OnnxResponse
    )["post"]
    operation["requestBody"]["content"] = {
        "multipart/form-data": {"schema": body, "encoding": encoding}
    }
    operation["responses"].update(
        {code: {**answer, "description": _ONNX_ERRORS[code]}
         for code, answer in operation["responses"].items() if code in _ONNX_ERRORS}
    )  # fmt: skip
    return {"post": operation}


def _get(summary: str, response: type[BaseModel], *, api: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": _ref(response)}},
            }
        },
    }
    if api:
        operation["responses"].update(_problems(["401"]))
        operation["security"] = _API_SECURITY
    return {"get": operation}


def _get_text(summary: str, media_type: str) -> dict[str, Any]:
    """An open GET whose answer is not JSON described by a model (metrics, the page)."""
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {media_type: {"schema": {"type": "string"}}},
                }
            },
        }
    }


@cache
def openapi_document() -> dict[str, Any]:
    _, schema = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gradiag",
            "version": "1",
            "description": "Gradient diagnostics: forward and backprop through JSON graphs "
            "and networks, with dead-ReLU, saturation and health findings.",
        },
        "paths": {
            "/v1/graph": _post(
                "Forward and backward through a graph or an expression", GraphBody, GraphResponse
            ),
            "/v1/graph.svg": _post_svg(
                "The graph laid out left to right: values and gradients on the wires",
                GraphBody,
            ),
            "/v1/network": _post(
                "A fully-connected network, lowered to a graph: per-layer health",
                NetworkRequest,
                NetworkResponse,
            ),
            "/v1/network.svg": _post_svg(
                "The network as its layer chain, each layer with its health", NetworkRequest
            ),
            "/v1/onnx": _post_onnx(),
            "/v1/ops": _get("The op catalogue", OpsResponse, api=True),
            "/healthz": _get("Liveness", ProbeResponse),
            "/readyz": _get("Readiness", ProbeResponse),
            "/metrics": _get_text("Prometheus metrics (text format)", "text/plain"),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/": _get_text("The page that draws graphs and network health", "text/html"),
        },
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Only when GRADIAG_API_TOKEN is set; /v1/* only",
                }
            },
        },
    }
