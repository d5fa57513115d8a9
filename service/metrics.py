"""Prometheus metrics: what the service saw (requests) and what it found (diagnostics).

Views record nothing themselves. A view that produced a report puts a `ReportSummary` on
`flask.g.report_summary`; the one `after_request` hook in service/observability.py reads it
and calls `observe_request` and `observe_report`.

Under gunicorn the metrics live in PROMETHEUS_MULTIPROC_DIR (one file per worker, set up by
service/gunicorn_conf.py before any worker starts) and every scrape merges them, so the
numbers do not depend on which worker answered. Without that variable (tests, `flask run`)
the default single-process registry is used. service/metrics_files.py keeps that directory
bounded and a full one harmless.

Labels take only known values, whatever clients send: a method outside METHODS is `other`,
a path without a route `unmatched`, and the status is one the service chose. So the number
of series is bounded by the routes, the methods and the statuses; recording a request never
fails it (a write error degrades /metrics, with a log line).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator, Sequence
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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gradiag.engine import GraphDiagnostics
from gradiag.service.metrics_files import (
    MULTIPROC_ENV,
    degraded_reason,
    reserve_metric_files,
    scrape_lock,
)

log = logging.getLogger("gradiag.metrics")

# Before the first metric value exists: on a full file system a metric file fails to grow
# with an error the hooks below catch, instead of a SIGBUS that kills the worker.
reserve_metric_files()

# The methods a label may name; any other is `other` (a client may send any token).
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))

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


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def observe_request(
    method: str, endpoint: str, status: int, seconds: float, body_bytes: int | None
) -> None:
    """Count an answered request. `endpoint` is a route template or `unmatched`."""
    try:
        _observe_request(method_label(method), endpoint, str(status), seconds, body_bytes)
    except OSError as err:  # the metrics directory is full or gone: the request goes on
        write_failed(err)


def _observe_request(
    method: str, endpoint: str, status: str, seconds: float, body_bytes: int | None
) -> None:
    labelled(REQUESTS, method, endpoint, status).inc()
    labelled(LATENCY, method, endpoint, status).observe(seconds)
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
    try:
        _observe_report(kind, nodes, dead_fraction, saturated_fraction, status, finding_codes)
    except OSError as err:
        write_failed(err)


_write_error: str | None = None  # this worker's first failed write, for /metrics and the log


def write_failed(err: OSError) -> None:
    """Remember a failed metrics write and say so once in the log; requests go on."""
    global _write_error
    if _write_error is None:
        _write_error = f"{type(err).__name__}: {err.strerror or err}"
        where = os.environ.get(MULTIPROC_ENV)
        log.warning("metrics degraded: cannot write %s (%s)", where, _write_error)


def _observe_report(
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


class DegradedCollector(Collector):
    """`gradiag_metrics_degraded`: 1 when the metrics may be incomplete (this worker failed
    to write, or the directory is not writable or nearly full), else 0."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gradiag_metrics_degraded",
            "1 when metrics may be incomplete: the metrics directory is full or unwritable.",
            value=1.0 if self.reason else 0.0,
        )


def exposition() -> bytes:
    """The current metrics in Prometheus text format, merged over workers when multiprocess.
    A directory that cannot be read gives only `gradiag_metrics_degraded 1` (and a log line)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return generate_latest(REGISTRY) + generate_latest(_degraded_registry(_write_error))
    reason = _write_error or degraded_reason(path)
    try:
        with scrape_lock(path):
            registry = CollectorRegistry()  # fresh per scrape: the files are read anew
            multiprocess.MultiProcessCollector(registry)
            merged = generate_latest(registry)
    except (OSError, ValueError, RuntimeError) as err:  # unreadable, or a file cut short
        reason = f"cannot read {path}: {type(err).__name__}"
        merged = b""
    _log_change(reason)
    return merged + generate_latest(_degraded_registry(reason))


_logged_reason: str | None = None


def _log_change(reason: str | None) -> None:
    """One log line when the metrics become degraded (or recover), not one per scrape."""
    global _logged_reason
    if reason != _logged_reason:
        if reason:
            log.warning("metrics degraded: %s", reason)
        else:
            log.info("metrics recovered")
        _logged_reason = reason


def _degraded_registry(reason: str | None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DegradedCollector(reason))
    return registry


metrics_blueprint = Blueprint("metrics", __name__)


@metrics_blueprint.get("/metrics")
def metrics() -> Response:
    return Response(exposition(), mimetype=None, content_type=CONTENT_TYPE_LATEST)
