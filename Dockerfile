# gradiag: gradient diagnostics over HTTP. Build: `docker build -t gradiag .`
# Run: `docker run -p 8000:8000 gradiag` (PORT, GRADIAG_WORKERS, ...: docs/configuration.md).
# Keep the base image's Python equal to CI's (3.11), or the image runs other wheels (numpy).

# --- build: the project as a wheel, plus the wheels of its dependencies -------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN python3 -m pip wheel --wheel-dir /wheels '.[server]'

# --- install: the wheels into a venv, in a clean stage (no sources, no build tools) --------
FROM python:3.11-slim AS install
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/gradiag \
    && /opt/gradiag/bin/python -m pip install --no-index --find-links=/wheels 'gradiag[server]'

# --- runtime: the venv alone on the same base; no compilers, no wheels --------------------
FROM python:3.11-slim
# One BLAS thread per gunicorn worker (the workers already fill every CPU); the metrics of
# all workers are merged from PROMETHEUS_MULTIPROC_DIR (created and emptied when gunicorn
# starts; under /tmp, so a read-only container needs only a writable /tmp); the
# service listens on every interface of the container, on $PORT (default 8000).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/gradiag/bin:$PATH \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/gradiag-metrics \
    GRADIAG_HOST=0.0.0.0

RUN groupadd --system --gid 10001 gradiag \
    && useradd --system --uid 10001 --gid gradiag --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gradiag
COPY --from=install /opt/gradiag /opt/gradiag

WORKDIR /srv
USER 10001:10001
EXPOSE 8000
# slim has no curl: probe with the standard library
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('GRADIAG_PORT') or os.environ.get('PORT') or '8000'), timeout=3)"]

# gunicorn is PID 1 (SIGTERM drains in-flight requests); its settings come from the
# environment through gradiag/service/gunicorn_conf.py, given explicitly with -c.
ENTRYPOINT ["python3", "-m", "gunicorn", "-c", "python:gradiag.service.gunicorn_conf"]
CMD ["gradiag.service:create_app()"]
