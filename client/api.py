"""`Client`: gradiag's HTTP API over one `requests.Session`.

Every call has a timeout; connection failures and 502/503/504 answers are retried with
exponential backoff (POST included: gradiag's POSTs are pure computations, so a repeat is
harmless); reports come back as the service's own Pydantic models; anything else raises
`GradiagError` carrying the problem+json detail.

    with Client("http://127.0.0.1:8000") as c:
        report = c.network({"input_dim": 3, "layers": [...], "loss": "mse"})
        print(report.health.status)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import requests
from pydantic import BaseModel, ValidationError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gradiag.client.errors import GradiagError, GradiagUnavailable
from gradiag.schemas.graph import ExpressionRequest, GraphRequest, GraphResponse
from gradiag.schemas.network import NetworkRequest, NetworkResponse
from gradiag.schemas.service import OpInfo, OpsResponse, ProbeResponse

Model = TypeVar("Model", bound=BaseModel)
Timeout = float | tuple[float, float]
Part = tuple[str, bytes, str]  # a multipart part: (filename, content, content type)

RETRY_STATUSES = (502, 503, 504)
USER_AGENT = "gradiag-client/0.1"


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, whoever produced it (the network, or the app's test client)."""

    status: int
    content_type: str
    content: bytes


def decode(answer: Answer, model: type[Model]) -> Model:
    """A 2xx answer as `model`; anything else raises `GradiagError` with the problem."""
    if not 200 <= answer.status < 300:
        raise GradiagError.from_answer(answer.status, answer.content_type, answer.content)
    try:
        return model.model_validate_json(answer.content)
    except ValidationError as err:
        raise GradiagError(
            answer.status,
            "Unexpected response",
            f"the answer is not a {model.__name__}: {err.error_count()} error(s), first "
            f"{err.errors(include_url=False)[0]['msg']}",
        ) from None


def encode(body: BaseModel | Mapping[str, Any]) -> bytes:
    """JSON bytes of a request body. Models drop unset fields; in dicts, non-finite floats
    become "NaN"/"Infinity"/"-Infinity" (the wire convention) and NumPy arrays lists."""
    if isinstance(body, BaseModel):
        return body.model_dump_json(exclude_unset=True).encode()
    return json.dumps(_wire(body), allow_nan=False, separators=(",", ":")).encode()


def _wire(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    tolist = getattr(value, "tolist", None)  # NumPy arrays and scalars, without importing it
    if callable(tolist):
        return _wire(tolist())
    return value


class Client:
    """gradiag's API. `url` is the service's base URL (a path prefix is kept).

    - `timeout`: seconds, or (connect, read); applied to every call.
    - `retries`: attempts after the first on a connection failure or a 502/503/504, with
      `backoff_factor * 2**(n-1)` seconds between them (a Retry-After header is honoured).
      Read timeouts are not retried: the service was working and would work again.
    - `token`: sent as `Authorization: Bearer <token>`.
    - `session`: bring your own `requests.Session` (its adapters are left alone).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: Timeout = (5.0, 60.0),
        retries: int = 3,
        backoff_factor: float = 0.5,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._own_session = session is None
        self.session = session or requests.Session()
        if self._own_session:
            retry = Retry(
                total=retries,
                connect=retries,
                read=0,
                status=retries,
                other=0,
                status_forcelist=RETRY_STATUSES,
                allowed_methods=frozenset({"GET", "HEAD", "OPTIONS", "POST"}),
                backoff_factor=backoff_factor,
                raise_on_status=False,  # the last 5xx comes back, problem detail and all
            )
            adapter = HTTPAdapter(max_retries=retry)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept"] = "application/json, application/problem+json"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # --- the API ------------------------------------------------------------------------

    def graph(self, body: GraphRequest | ExpressionRequest | Mapping[str, Any]) -> GraphResponse:
        """POST /v1/graph: a graph (`nodes`, `output`) or an expression body."""
        return decode(self.post_raw("/v1/graph", encode(body)), GraphResponse)

    def expression(
        self, expression: str, values: Mapping[str, Any] | None = None, **options: Any
    ) -> GraphResponse:
        """POST /v1/graph with `{"expression": ..., "values": ...}`; `options` adds the other
        body fields (`gradcheck=True`, `thresholds={...}`, `explain=True`, ...)."""
        body = {"expression": expression, "values": dict(values or {}), **options}
        return self.graph(body)

    def network(self, spec: NetworkRequest | Mapping[str, Any]) -> NetworkResponse:
        """POST /v1/network: a fully-connected network definition."""
        return decode(self.post_raw("/v1/network", encode(spec)), NetworkResponse)

    def ops(self) -> list[OpInfo]:
        """GET /v1/ops: the op catalogue."""
        return decode(self.get_raw("/v1/ops"), OpsResponse).ops

    def health(self) -> ProbeResponse:
        """GET /healthz: `status` is "alive" (raises when the service does not answer)."""
        return decode(self.get_raw("/healthz"), ProbeResponse)

    def ready(self) -> ProbeResponse:
        """GET /readyz: `status` is "ready" (a 503 "not ready" raises GradiagError)."""
        return decode(self.get_raw("/readyz"), ProbeResponse)

    # --- raw answers (the check command decodes them like in-process ones) ---------------

    def post_raw(self, path: str, body: bytes) -> Answer:
        return self._send("POST", path, body)

    def post_parts_raw(self, path: str, parts: Mapping[str, Part]) -> Answer:
        """A multipart/form-data POST (POST /v1/onnx): each part (filename, bytes, type)."""
        return self._send("POST", path, None, files=parts)

    def get_raw(self, path: str) -> Answer:
        return self._send("GET", path, None)

    def _send(
        self, method: str, path: str, body: bytes | None, files: Mapping[str, Part] | None = None
    ) -> Answer:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            response = self.session.request(
                method,
                self.url + path,
                data=body,
                files=files,
                headers=headers,
                timeout=self.timeout,
            )
        except requests.Timeout as err:
            raise GradiagUnavailable(f"{method} {self.url}{path} timed out: {err}") from None
        except requests.ConnectionError as err:
            raise GradiagUnavailable(f"cannot reach {self.url}{path}: {_reason(err)}") from None
        except requests.RequestException as err:
            raise GradiagUnavailable(f"{method} {self.url}{path} failed: {err}") from None
        return Answer(
            response.status_code, response.headers.get("Content-Type", ""), response.content
        )

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _reason(err: requests.ConnectionError) -> str:
    """urllib3's innermost reason ("Connection refused"), not its whole retry story."""
    inner: Any = err.args[0] if err.args else err
    reason = getattr(inner, "reason", None)
    return str(reason or inner)
