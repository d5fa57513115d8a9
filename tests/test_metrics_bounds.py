"""Metric labels take only known values, so the number of series is bounded whatever clients
send; a full or unwritable metrics directory degrades /metrics (with a log line), never a
request (service/metrics.py, service/metrics_files.py)."""

from __future__ import annotations

import errno
import logging
import os
import random
import string
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from gradiag.service import metrics, metrics_files
from gradiag.service.metrics_files import ReservedMmapedDict, archive_dead_worker


def series(text: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return {
        (s.name, frozenset(s.labels.items()))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _word(n: int) -> str:
    return "".join(random.choices(string.ascii_uppercase, k=n))


def test_unknown_methods_and_paths_fold_into_other_and_unmatched(client: FlaskClient) -> None:
    client.open("/v1/graph", method="BREW")
    client.get("/no/such/route")
    text = client.get("/metrics").get_data(as_text=True)
    labels = [
        dict(labels) for name, labels in series(text) if name == "gradiag_http_requests_total"
    ]
    assert {"method": "other", "endpoint": "unmatched", "status": "405"} in labels
    assert {"method": "GET", "endpoint": "unmatched", "status": "404"} in labels
    assert "BREW" not in text and "/no/such/route" not in text


def test_the_series_stop_growing_whatever_clients_send(client: FlaskClient) -> None:
    def flood(n: int) -> int:
        for _ in range(n):
            client.open(f"/v1/{_word(8).lower()}", method=_word(20))
            client.open("/healthz", method=_word(20))
        return len(series(client.get("/metrics").get_data(as_text=True)))

    first = flood(20)
    assert flood(500) == first  # 1000 more random methods and paths: not one new series


def test_a_failed_metrics_write_never_fails_a_request(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics, "_observe_request", full)
    monkeypatch.setattr(metrics, "_observe_report", full)
    monkeypatch.setattr(metrics, "_write_error", None)
    logger = logging.getLogger("gradiag")
    logger.addHandler(caplog.handler)
    try:
        for _ in range(3):
            r = client.post("/v1/graph", json={"expression": "x * 2", "values": {"x": 3}})
            assert r.status_code == 200
        text = client.get("/metrics").get_data(as_text=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert "gradiag_metrics_degraded 1.0" in text
    warnings = [r.getMessage() for r in caplog.records if "metrics degraded" in r.getMessage()]
    assert len(warnings) == 1  # said once, not once per request
    assert "No space left on device" in warnings[0]


def test_a_metric_file_reserves_its_blocks_so_a_full_disk_is_an_error_not_sigbus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = ReservedMmapedDict(str(tmp_path / "counter_1.db"))
    assert os.stat(tmp_path / "counter_1.db").st_blocks * 512 >= 65536  # allocated, not sparse
    reserved: list[int] = []

    def no_space(fd: int, offset: int, size: int) -> None:
        reserved.append(size)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="No space"):
        for k in range(1000):  # grows past the first 64 KiB: the growth is reserved first
            values.write_value(f"key number {k} " + "x" * 100, 1.0, 0.0)
    assert reserved == [131072]
    values.close()


def test_reserved_files_are_what_prometheus_client_opens() -> None:
    from prometheus_client import values

    assert vars(values)["MmapedDict"] is metrics_files.ReservedMmapedDict


def test_a_gone_workers_counts_are_folded_into_the_archive(tmp_path: Path) -> None:
    for pid, count in ((101, 3.0), (102, 4.0)):
        live = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        live.write_value('["gradiag_http_requests","x",{},"h"]', count, 0.0)
        live.close()
    archive_dead_worker(str(tmp_path), 101)
    archive_dead_worker(str(tmp_path), 102)
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_archive.db"]
    (entry,) = MmapedDict.read_all_values_from_file(str(tmp_path / "counter_archive.db"))
    assert entry[1] == 7.0


# --- a real gunicorn with its metrics on a full tmpfs -------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB tmpfs (the Kubernetes emptyDir and the compose /tmp are 64 MiB ones)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.live
def test_a_full_metrics_tmpfs_never_kills_a_worker(
    server_factory: Callable[..., AbstractContextManager[str]], tmp_path: Path, tiny_tmpfs: Path
) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tiny_tmpfs / "metrics")}
    with server_factory(tmp_path, workers=2, env=env) as url, requests.Session() as session:
        for _ in range(300):
            session.request(_word(12), f"{url}/v1/{_word(6).lower()}", timeout=30)
            r = session.post(f"{url}/v1/graph", json={"expression": "x", "values": {"x": 1}})
            assert r.status_code == 200
        text = session.get(f"{url}/metrics", timeout=30).text
    assert "gradiag_metrics_degraded 1.0" in text
    log = (tmp_path / "server.log").read_text()
    assert "metrics degraded" in log
    assert "Worker (pid" not in log or "signal" not in log  # no worker died of a signal
