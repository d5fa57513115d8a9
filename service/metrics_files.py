"""The metrics directory of gunicorn's workers (PROMETHEUS_MULTIPROC_DIR), kept bounded and
harmless when full.

prometheus_client keeps each worker's metrics in memory-mapped files that grow by doubling
into sparse space. On a full tmpfs (the Kubernetes emptyDir and the compose /tmp are 64 MiB)
the first write into a page the file system cannot back kills the worker with SIGBUS, and
every new worker dies the same way on its first request. Here:

- `reserve_metric_files` makes prometheus_client reserve a file's blocks (posix_fallocate)
  before it maps or grows them: a full file system is then an OSError, which
  service/metrics.py catches (the request goes on; /metrics says it is degraded);
- `archive_dead_worker` (the master's child_exit) folds a gone worker's counters and
  histograms into one archive file per type and removes its files, so the directory holds
  the live workers' files and two archives, however often workers are recycled;
- `scrape_lock` keeps a scrape from reading between the fold and the removal (which would
  count the gone worker twice).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import mmap_dict, values
from prometheus_client.mmap_dict import MmapedDict

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ARCHIVED_TYPES = ("counter", "histogram")  # summed over workers, so they can be folded
LOCK_NAME = ".scrape.lock"
LOW_SPACE_BYTES = 1024 * 1024  # less free space than this: the next file may not fit


class ReservedMmapedDict(MmapedDict):
    """prometheus_client's mapped file, with its blocks reserved before they are mapped."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                size = max(os.fstat(fd).st_size, mmap_dict._INITIAL_MMAP_SIZE)
                _reserve(fd, size)
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _init_value(self, key: str) -> None:
        """Reserve the doubled file first when this entry will not fit (as the base grows)."""
        encoded = key.encode("utf-8")
        entry = 4 + len(encoded) + (8 - (len(encoded) + 4) % 8) + 16
        capacity = self._capacity
        while self._used + entry > capacity:
            capacity *= 2
        if capacity > self._capacity:
            _reserve(self._f.fileno(), capacity)
        super()._init_value(key)  # type: ignore[no-untyped-call]


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks up to `size`; a file system that cannot reserve (no
    fallocate) is left as it was."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def reserve_metric_files() -> None:
    """Every metric file prometheus_client opens from now on reserves its blocks."""
    vars(values)["MmapedDict"] = ReservedMmapedDict  # the name MmapedValue looks up


def degraded_reason(path: str) -> str | None:
    """Why the directory may lose metrics (unwritable, nearly full), or None."""
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    try:
        free = shutil.disk_usage(path).free
    except OSError as err:
        return f"cannot stat {path}: {type(err).__name__}"
    if free < LOW_SPACE_BYTES:
        return f"{path} has {free} bytes free"
    return None


@contextmanager
def scrape_lock(path: str, *, exclusive: bool = False) -> Iterator[None]:
    """Shared by scrapes, exclusive while a gone worker's files are folded. Without a
    writable lock file (a read-only directory) no lock is taken."""
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def archive_dead_worker(path: str, pid: int) -> None:
    """Fold the gone worker `pid`'s counters and histograms into `<type>_archive.db` and
    remove its files (the master calls this from child_exit)."""
    with scrape_lock(path, exclusive=True):
        for typ in ARCHIVED_TYPES:
            dead = os.path.join(path, f"{typ}_{pid}.db")
            if not os.path.exists(dead):
                continue
            _fold(dead, os.path.join(path, f"{typ}_archive.db"))
            os.remove(dead)


def _fold(dead: str, archive: str) -> None:
    entries: list[Any] = list(MmapedDict.read_all_values_from_file(dead))
    target: Any = ReservedMmapedDict(archive)  # prometheus_client's methods are untyped
    try:
        for key, value, timestamp, _ in entries:
            total, _ = target.read_value(key)
            target.write_value(key, total + value, timestamp)
    finally:
        target.close()


def clear(path: str) -> None:
    """Empty the directory at start: counts of an earlier run must not leak into this one."""
    for name in glob.glob(os.path.join(path, "*.db")):
        os.remove(name)
