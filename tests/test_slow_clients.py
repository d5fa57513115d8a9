"""Slow clients against a real gunicorn with the default worker class (gevent,
service/worker.py): idle connections, headers a byte at a time and bodies shorter than their
Content-Length hold no worker, and each meets its time limit. How many such connections the
service bears under load is measured by `make attacks` (bench/attacks.py, docs/hardening.md)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.live

HANG = 30.0  # seconds: a bound against a hang, never a speed
TIMEOUTS = {"GRADIAG_HEADER_TIMEOUT": "1", "GRADIAG_BODY_TIMEOUT": "1", "GRADIAG_SEND_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def one_worker(
    server_factory: Callable[..., AbstractContextManager[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """One gevent worker (the hardest case: a sync one would be held by a single socket)."""
    with server_factory(tmp_path_factory.mktemp("slow"), workers=1, env=TIMEOUTS) as url:
        yield url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(url)), timeout=HANG)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (an empty read or a reset) in time."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        pass
    return True


def test_idle_connections_hold_no_worker(one_worker: str) -> None:
    idle = [_connect(one_worker) for _ in range(50)]
    try:
        assert requests.get(f"{one_worker}/healthz", timeout=HANG).status_code == 200
        body = {"expression": "(x + y) * z", "values": {"x": -2, "y": 5, "z": -4}}
        r = requests.post(f"{one_worker}/v1/graph", json=body, timeout=HANG)
        assert r.json()["output"]["value"] == -12.0
        # and the server lets them go after GRADIAG_HEADER_TIMEOUT (1 s)
        assert all(_closed_within(s, HANG) for s in idle)
    finally:
        for s in idle:
            s.close()


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_header_timeout(one_worker: str) -> None:
    slow = _connect(one_worker)
    started = time.monotonic()
    try:
        with pytest.raises(OSError):  # the server closes: a send fails (or a reset)
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                slow.send(bytes([byte]))
                assert requests.get(f"{one_worker}/healthz", timeout=HANG).status_code == 200
                time.sleep(0.1)
                assert time.monotonic() - started < HANG
    finally:
        slow.close()


def test_a_body_shorter_than_its_length_gets_a_408(one_worker: str) -> None:
    short = _connect(one_worker)
    try:
        short.sendall(
            b"POST /v1/graph HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 5000\r\n\r\n{"nodes": ['
        )
        assert requests.get(f"{one_worker}/healthz", timeout=HANG).status_code == 200
        short.settimeout(HANG)
        answer = b""
        while chunk := short.recv(65536):
            answer += chunk
    finally:
        short.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"application/problem+json" in head
    assert b"GRADIAG_BODY_TIMEOUT" in body


def test_a_client_that_never_reads_its_answer_is_dropped(
    server_factory: Callable[..., AbstractContextManager[str]], tmp_path: Path
) -> None:
    with server_factory(tmp_path, workers=1, env=TIMEOUTS) as url:
        taker = _connect(url)
        taker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            value = b",".join([b"0.1"] * 200_000)  # a ~10 MB answer
            body = b'{"nodes":[{"id":"x","op":"input","value":[' + value
            body += b']},{"id":"y","op":"exp","inputs":["x"]}],"output":"y"}'
            taker.sendall(
                b"POST /v1/graph HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )
            log = tmp_path / "server.log"
            started = time.monotonic()
            while "did not take its answer within 2 s" not in log.read_text():
                assert requests.get(f"{url}/healthz", timeout=HANG).status_code == 200
                assert time.monotonic() - started < HANG, "the server still holds the client"
                time.sleep(0.2)
        finally:
            taker.close()


def test_the_sync_worker_class_can_still_be_chosen(
    server_factory: Callable[..., AbstractContextManager[str]], tmp_path: Path
) -> None:
    with server_factory(tmp_path, workers=1, env={"GRADIAG_WORKER_CLASS": "sync"}) as url:
        assert requests.get(f"{url}/healthz", timeout=HANG).status_code == 200
    log = (tmp_path / "server.log").read_text()
    assert "Using worker: sync" in log
