"""Prometheus metrics: what the service saw (requests) and what it found (diagnostics).

Views record nothing themselves. A view that produced a report puts a `ReportSummary` on
`flask.g.report_summary`; the one `after_request` hook in service/observability.py reads it
and calls `observe_request` and `observe_report`.

Under gunicorn the metrics live in PROMETHEUS_MULTIPROC_DIR (one file per worker, set up by
service/gunicorn_conf.py before any worker starts) and every scrape merges them, so the
numbers do not depend on which worker answered. Without that variable (tests, `flask run`)
the default single-process registry is used.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from operator import attrgetter
from typing import Any, NamedTuple

from flask import Blueprint, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from gradiag.engine import GraphDiagnostics

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_FRACTION_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9, 1.0)

REQUESTS = Counter(
    "gradiag_http_requests",
    "HTTP requests answered, by route template and status.",
    ["method", "endpoint", "status"],
)
LATENCY = Histogram(
    "gradiag_http_request_duration_seconds",
    "Time from the request reaching the app to its answer.",
    ["method", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BODY_BYTES = Histogram(
    "gradiag_http_request_body_bytes",
    "Size of request bodies.",
    ["endpoint"],
    buckets=(256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20),
)
GRAPH_NODES = Histogram(
    "gradiag_graph_nodes",
    "Nodes in each diagnosed graph (a network counts its lowered nodes).",
    ["kind"],
    buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000, 100_000, 250_000),
)
DEAD_FRACTION = Histogram(
    "gradiag_dead_relu_fraction",
    "Fraction of dead ReLU elements (graph) or units (network), per report that has ReLUs.",
    ["kind"],
    buckets=_FRACTION_BUCKETS,
)
SATURATED_FRACTION = Histogram(
    "gradiag_saturated_fraction",
    "Fraction of saturated sigmoid/tanh elements or units, per report that has them.",
    ["kind"],
    buckets=_FRACTION_BUCKETS,
)
HEALTH = Counter(
    "gradiag_health_status",
    "Reports by health status (ok, warn, fail).",
    ["kind", "status"],
)
FINDINGS = Counter(
    "gradiag_findings",
    "Health findings by code (dead_relu, saturated_sigmoid, nonfinite, ...).",
    ["kind", "code"],
)


class ReportSummary(NamedTuple):
    """What a view found, for the metrics hook. `kind` is "graph" or "network"; a fraction
    is None when the report has no gate of that sort (so no zeros flood the histogram).
    A named tuple: made on every graph request, and a frozen dataclass's __init__ costs
    several times as much."""

    kind: str
    nodes: int
    dead_fraction: float | None
    saturated_fraction: float | None
    status: str
    finding_codes: Sequence[str] = ()

    @classmethod
    def of_graph(cls, nodes: int, diagnostics: GraphDiagnostics) -> ReportSummary:
        relu, sigmoid, tanh = (diagnostics.kinds[kind] for kind in ("relu", "sigmoid", "tanh"))
        gate_elements = sigmoid.elements + tanh.elements
        dead = relu.unit_fraction if relu.units else (relu.fraction if relu.elements else None)
        return cls(
            kind="graph",
            nodes=nodes,
            dead_fraction=dead,
            saturated_fraction=(
                (sigmoid.flagged + tanh.flagged) / gate_elements if gate_elements else None
            ),
            status=diagnostics.status,
            finding_codes=list(map(attrgetter("code"), diagnostics.findings)),
        )


def labelled(metric: Counter | Histogram, *values: str) -> Any:
    """`metric.labels(*values)`, kept once made: prometheus_client checks the values and
    takes a lock on every call (~2 us, several per request), and a service sees a handful
    of label sets. The child still finds its worker's file after a fork (it checks the pid
    on every write)."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


_children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}


def observe_request(
    method: str, endpoint: str, status: int, seconds: float, body_bytes: int | None
) -> None:
    status_text = str(status)
    labelled(REQUESTS, method, endpoint, status_text).inc()
    labelled(LATENCY, method, endpoint, status_text).observe(seconds)
    if body_bytes is not None:
        labelled(BODY_BYTES, endpoint).observe(body_bytes)


def observe_report(
    kind: str,
    nodes: int,
    dead_fraction: float | None,
    saturated_fraction: float | None,
    status: str,
    finding_codes: Sequence[str],
) -> None:
    labelled(GRAPH_NODES, kind).observe(nodes)
    if dead_fraction is not None:
        labelled(DEAD_FRACTION, kind).observe(dead_fraction)
    if saturated_fraction is not None:
        labelled(SATURATED_FRACTION, kind).observe(saturated_fraction)
    labelled(HEALTH, kind, status).inc()
    if finding_codes:  # a scalar graph may have thousands: one increment per code
        for code, count in collections.Counter(finding_codes).items():
            labelled(FINDINGS, kind, code).inc(count)


def exposition() -> bytes:
    """The current metrics in Prometheus text format, merged over workers when multiprocess."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()  # fresh per scrape: the files are read anew
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


metrics_blueprint = Blueprint("metrics", __name__)


@metrics_blueprint.get("/metrics")
def metrics() -> Response:
    return Response(exposition(), mimetype=None, content_type=CONTENT_TYPE_LATEST)
