"""A Python client for gradiag's HTTP API (see client.api.Client).

from gradiag.client import Client, GradiagError

with Client("http://127.0.0.1:8000", token=None) as c:
    report = c.network(spec)          # schemas.network.NetworkResponse
    graph = c.expression("(x + y) * z", {"x": -2, "y": 5, "z": -4})

diagnose_onnx("model.onnx", x, y, "softmax_cross_entropy", url=...)  # POST /v1/onnx
"""

from gradiag.client.api import Answer, Client, decode, encode
from gradiag.client.errors import GradiagError, GradiagUnavailable
from gradiag.client.onnx import diagnose_onnx
from gradiag.client.packed import pack, unpack

__all__ = [
    "Answer",
    "Client",
    "GradiagError",
    "GradiagUnavailable",
    "decode",
    "diagnose_onnx",
    "encode",
    "pack",
    "unpack",
]
