"""gunicorn settings for gradiag; `gradiag serve` passes this file explicitly (-c), so a
stray ./gunicorn.conf.py in the working directory is never picked up.

Every value comes from service.config.Settings (GRADIAG_HOST, GRADIAG_PORT or PORT,
GRADIAG_WORKERS, GRADIAG_WORKER_CLASS, GRADIAG_HEADER_TIMEOUT, GRADIAG_TIMEOUT,
GRADIAG_GRACEFUL_TIMEOUT, GRADIAG_LOG_LEVEL, ...; see docs/configuration.md), so a bad value
stops gunicorn at start with a message naming it.
"""

import os
import shutil
import sys
import tempfile
from typing import Any

# This runs in the master before it imports the app, and the workers inherit what the
# master loaded: NumPy's BLAS and prometheus_client read these variables once, at import.
# One BLAS thread per worker (the workers already use every CPU); an explicit value wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Several workers: metrics go to files in this directory and each scrape merges them.
_own_metrics_dir = None  # made here when unset, and removed again on exit
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = tempfile.mkdtemp(prefix="gradiag-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir

from gradiag.service.config import ConfigError, Settings  # noqa: E402  (after the variables above)
from gradiag.service.memory import retain_freed_memory  # noqa: E402
from gradiag.service.metrics_files import archive_dead_worker, clear  # noqa: E402

# Set in the master, inherited by every forked worker: a request reuses the pages the one
# before it freed instead of page-faulting them in again (service/memory.py).
retain_freed_memory()

try:
    settings = Settings.from_env()
except ConfigError as _err:
    print(f"gradiag: {_err}", file=sys.stderr)
    if _own_metrics_dir:
        os.rmdir(_own_metrics_dir)
    sys.exit(2)

bind = [f"{settings.host}:{settings.port}"]
# The work is CPU-bound NumPy: one worker per available CPU by default. gevent workers read
# requests and write answers in greenlets, so idle or slow clients hold no worker; one
# request computes at a time per worker as before (service/worker.py, docs/hardening.md).
workers = settings.workers
worker_class = (
    "gradiag.service.worker.GeventWorker" if settings.worker_class == "gevent" else "sync"
)
worker_connections = settings.worker_connections
# gevent: the request line and headers must arrive within this (also the idle keep-alive)
keepalive = settings.header_timeout
# A backstop only: the service bounds work itself; a timeout kill answers a bare 500.
timeout = settings.timeout
# SIGTERM lets in-flight requests finish for this long: at least the time budget + 5 s
# (Settings.check), and keep preStop + this below the pod's terminationGracePeriodSeconds.
graceful_timeout = settings.graceful_timeout
# Recycle workers now and then, not all at once, so a slow leak cannot grow forever. Not
# often: a new worker imports the app (~0.9 s of CPU), and at 2000 requests a small-request
# load recycled each worker every ~2 s, costing 20-30% of the throughput and p99s of up to
# 200 ms (docs/performance.md); worker RSS stays flat over 76k requests (docs/hardening.md).
max_requests = 50_000
max_requests_jitter = 5_000
# The app writes one JSON access line per request to stdout (service/observability.py);
# gunicorn's own plain-text access line would only duplicate it.
accesslog = None
errorlog = "-"
loglevel = settings.log_level
control_socket_disable = True
# gunicorn's own lines stay plain text on stderr, but a traceback never shows an exception's
# message (it may quote a request's values): service/observability.py's SafeTextFormatter.
logconfig_dict = {
    "root": {"level": "WARNING", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {
            "level": settings.log_level.upper(),
            "handlers": ["error_console"],
            "propagate": False,
            "qualname": "gunicorn.error",
        },
        "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
    },
    "formatters": {
        "generic": {
            "()": "gradiag.service.observability.SafeTextFormatter",
            "format": "%(asctime)s [%(process)d] [%(levelname)s] %(message)s",
            "datefmt": "[%Y-%m-%d %H:%M:%S %z]",
        }
    },
}


def on_starting(server: Any) -> None:
    """Empty the metrics directory, so counts of an earlier run do not leak into this one.
    One that cannot be used degrades /metrics (said in the log), never the service."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        os.makedirs(path, exist_ok=True)
        clear(path)
    except OSError as err:
        server.log.warning("metrics degraded: PROMETHEUS_MULTIPROC_DIR=%r: %s", path, err)


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone (recycled, crashed, stopped): drop its live gauge files and fold
    its counters into the archive, so recycling never grows the directory."""
    from prometheus_client import multiprocess

    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        multiprocess.mark_process_dead(worker.pid)
        archive_dead_worker(path, worker.pid)
    except OSError as err:  # a full directory: the gone worker's files stay as they are
        server.log.warning("metrics degraded: cannot fold worker %s's metrics: %s", worker.pid, err)


def on_exit(server: Any) -> None:
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
