"""gunicorn settings for gradiag; `gradiag serve` passes this file explicitly (-c), so a
stray ./gunicorn.conf.py in the working directory is never picked up.

Every value comes from service.config.Settings (GRADIAG_HOST, GRADIAG_PORT or PORT,
GRADIAG_WORKERS, GRADIAG_TIMEOUT, GRADIAG_GRACEFUL_TIMEOUT, GRADIAG_LOG_LEVEL; see
docs/configuration.md), so a bad value stops gunicorn at start with a message naming it.
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
# The work is CPU-bound NumPy: one sync worker per available CPU by default.
workers = settings.workers
worker_class = "sync"
# A backstop only: the service bounds work itself; a timeout kill answers a bare 500.
timeout = settings.timeout
# SIGTERM lets in-flight requests finish for this long (keep preStop + this below the
# pod's terminationGracePeriodSeconds).
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


def on_starting(server: Any) -> None:
    """Empty the metrics directory, so counts of an earlier run do not leak into this one."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise SystemExit(f"gradiag: PROMETHEUS_MULTIPROC_DIR={path!r} is not writable")
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone (recycled, crashed, stopped): drop its live gauge files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
