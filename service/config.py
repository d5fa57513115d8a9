"""Settings from the environment, validated once at start-up.

Every setting is `GRADIAG_<NAME>`; docs/configuration.md has the table.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A setting in the environment that cannot be used; the message names it."""


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
WORKER_CLASSES = ("gevent", "sync")
_ORIGIN = re.compile(r"https?://[^/\s:]+(:[0-9]{1,5})?")
MIB = 1024 * 1024
# What a request's deadline does not cover and shutdown must still wait for: the op that
# crosses the deadline, shaping and sending a bounded answer (docs/hardening.md).
SHUTDOWN_MARGIN_SECONDS = 5
# Memory that is not any request's: the gunicorn master, and each worker at rest (measured
# at ~55 MB and ~50 MB; deploy/README.md).
MASTER_MEMORY = 64 * MIB
IDLE_WORKER_MEMORY = 64 * MIB
SMALLEST_REQUEST_MEMORY = 64 * MIB


def available_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    return len(os.sched_getaffinity(0)) or 1


def memory_limit() -> int:
    """Bytes this process may use: its cgroup's limit (v2, then v1) inside a container, else
    the machine's RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) is no limit; v1 writes a huge number instead
            return min(int(text), ram)
    return ram


def request_memory(limit: int, workers: int) -> int:
    """The peak one request may reach: what is left of `limit` after the master and the
    idle workers, split between the workers (each runs one request at a time)."""
    share = (limit - MASTER_MEMORY) // workers - IDLE_WORKER_MEMORY
    return max(share, SMALLEST_REQUEST_MEMORY)


def origin_problem(origin: str) -> str | None:
    if origin == "*" or _ORIGIN.fullmatch(origin):
        return None
    return "is not an origin like https://example.org[:port] or *"


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = 16 * 1024 * 1024
    max_nodes: int = 250_000
    max_tensor_elements: int = 4_000_000
    max_total_elements: int = 16_000_000
    max_flops: int = 20_000_000_000
    max_scratch_elements: int = 16_000_000  # one op's temporary buffer (conv2d's im2col)
    max_expression_chars: int = 10_000  # the expression body (docs/expressions.md)
    # POST /v1/network, checked from the definition before anything is drawn (docs/network.md)
    max_layers: int = 64
    max_units: int = 16_384
    max_batch: int = 65_536
    # POST /v1/network with `train`: runs x steps x estimated FLOPs per step (docs/training.md)
    max_training_flops: int = 100_000_000_000
    # wall-clock seconds one request may take once its headers are in: body, parse, engine,
    # report, picture, all against one deadline; over it a 422 naming time_budget_seconds.
    # Start-up refuses a graceful_timeout or timeout that would not cover it (`check`).
    time_budget_seconds: int = 20
    # answers and memory, estimated from the shapes before any compute (service/budget.py)
    max_response_bytes: int = 64 * MIB
    # 0: found at start (`resolve_memory`): the container's limit, else the machine's RAM
    memory_limit_bytes: int = 0
    # 0: found at start: (memory_limit_bytes - master) / workers - an idle worker
    max_request_memory_bytes: int = 0
    # the HTTP server (read by service/gunicorn_conf.py)
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata={"max": 65_535, "fallback": ("PORT",)})
    workers: int = field(default_factory=available_cpus)
    # gevent: a worker reads requests and writes answers without being held by the client
    # (slow clients, docs/hardening.md); sync only behind a proxy that buffers both
    worker_class: str = field(default="gevent", metadata={"choices": WORKER_CLASSES})
    worker_connections: int = 1000  # open connections per gevent worker
    header_timeout: int = 5  # request line and headers (and an idle keep-alive connection)
    body_timeout: int = 15  # the whole request body; over it a 408
    send_timeout: int = 30  # the client takes the whole answer within this, or is dropped
    timeout: int = 120
    graceful_timeout: int = 30
    log_level: str = field(default="info", metadata={"choices": LOG_LEVELS})
    # read and checked here for the features that use them (auth, CORS)
    api_token: str | None = field(default=None, repr=False, metadata={"secret": True})
    cors_origins: tuple[str, ...] = field(default=(), metadata={"check": origin_problem})

    def __post_init__(self) -> None:
        """Fill in the memory limits left at 0 (auto); the fields stay plain ints."""
        if not self.memory_limit_bytes:
            object.__setattr__(self, "memory_limit_bytes", memory_limit())
        if not self.max_request_memory_bytes:
            share = request_memory(self.memory_limit_bytes, self.workers)
            object.__setattr__(self, "max_request_memory_bytes", share)

    def deadline(self) -> float:
        """The `time.monotonic()` value a request started now must be answered by."""
        return time.monotonic() + self.time_budget_seconds

    def check(self) -> None:
        """Settings that only make sense together: shutdown, and gunicorn's worker-kill
        backstop, must outlast the longest request the time budget allows."""
        longest = self.time_budget_seconds + SHUTDOWN_MARGIN_SECONDS
        for name in ("graceful_timeout", "timeout"):
            if getattr(self, name) < longest:
                raise ConfigError(
                    f"GRADIAG_{name.upper()}={getattr(self, name)} must be at least "
                    f"GRADIAG_TIME_BUDGET_SECONDS + {SHUTDOWN_MARGIN_SECONDS} = {longest}, so "
                    "that the longest request can finish"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Each field from `GRADIAG_<NAME>`, parsed by its type; unset or empty: the default."""
        environ = os.environ if environ is None else environ
        types = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            names = (f"GRADIAG_{f.name.upper()}", *f.metadata.get("fallback", ()))
            name = next((n for n in names if environ.get(n)), None)
            if name is None:
                continue
            raw = environ[name]
            try:
                values[f.name] = PARSERS[types[f.name]](raw, f)
            except ValueError as err:
                shown = "(hidden)" if f.metadata.get("secret") else repr(raw)
                raise ConfigError(f"{name}={shown} {err}") from None
        settings = cls(**values)
        settings.check()
        return settings


def _int(raw: str, f: Field[Any]) -> int:
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ValueError("is not a whole number") from None
    if value <= 0:
        raise ValueError("must be positive")
    if value > f.metadata.get("max", value):
        raise ValueError(f"must be at most {f.metadata['max']}")
    return value


def _str(raw: str, f: Field[Any]) -> str:
    value = raw.strip()
    choices = f.metadata.get("choices")
    if choices is not None:
        value = value.lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("must be printable text without spaces")
    return value


def _str_list(raw: str, f: Field[Any]) -> tuple[str, ...]:
    """A comma-separated list; each item goes through the field's `check` when it has one."""
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    check: Callable[[str], str | None] | None = f.metadata.get("check")
    for item in items:
        problem = check(item) if check else None
        if problem:
            raise ValueError(f"has {item!r}, which {problem}")
    return items


# How a setting's text becomes a value, by the field's declared type.
PARSERS: dict[Any, Callable[[str, Field[Any]], Any]] = {
    int: _int,
    str: _str,
    str | None: _str,
    tuple[str, ...]: _str_list,
}
