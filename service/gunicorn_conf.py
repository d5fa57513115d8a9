"""gunicorn settings for gradiag; `gradiag serve` passes this file explicitly (-c), so a
stray ./gunicorn.conf.py in the working directory is never picked up.

Environment: GRADIAG_HOST, GRADIAG_PORT (or PORT), GRADIAG_WORKERS, GRADIAG_TIMEOUT.
"""

import os

host = os.environ.get("GRADIAG_HOST", "127.0.0.1")
port = os.environ.get("GRADIAG_PORT") or os.environ.get("PORT") or "8000"
bind = [f"{host}:{port}"]
# The work is CPU-bound NumPy: one sync worker per CPU, each with one BLAS thread.
workers = int(os.environ.get("GRADIAG_WORKERS") or os.cpu_count() or 1)
worker_class = "sync"
raw_env = ["OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"]
# A backstop only: the service bounds work itself; a timeout kill answers a bare 500.
timeout = int(os.environ.get("GRADIAG_TIMEOUT", "120"))
graceful_timeout = 20
max_requests = 2000
max_requests_jitter = 200
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GRADIAG_LOG_LEVEL", "info")
control_socket_disable = True
