"""gunicorn's gevent worker with a time limit on every phase a client controls
(GRADIAG_WORKER_CLASS=gevent, the default; docs/hardening.md "Slow clients").

A sync worker reads a request's bytes itself, so a client that connects and sends nothing,
or its headers a byte at a time, or a body shorter than its Content-Length, holds that worker
until gunicorn's timeout: two idle sockets took a two-worker service down. Under gevent each
connection is a greenlet: waiting for a client's bytes, or for a client to take an answer,
lets the worker serve the others. The CPU-bound part is unchanged: NumPy does not yield, so
a worker computes one request at a time, as a sync worker does.

What a client may take, each a limit that ends with the connection closed:

- the request line and headers: GRADIAG_HEADER_TIMEOUT, in total (gunicorn's `keepalive`,
  which its gevent worker applies to every request's head, the first one's too);
- the body: GRADIAG_BODY_TIMEOUT for all of it (a gevent Timeout around each read, against
  one deadline, so a trickle of a byte a second does not renew it); the app answers 408;
- the answer: GRADIAG_SEND_TIMEOUT (the socket's timeout, which gevent's sendall applies to
  the whole answer).
"""

from __future__ import annotations

import time
from typing import Any

import gevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker as GunicornGeventWorker

from gradiag.service.config import Settings


class BodyDeadline:
    """A request body reader (gunicorn's) whose reads must all be done by `deadline`.
    A read past it raises TimeoutError; gunicorn then marks the body failed and closes the
    connection instead of reading on."""

    def __init__(self, reader: Any, deadline: float) -> None:
        self.reader = reader
        self.deadline = deadline

    def read(self, size: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request body did not arrive in time")
        with gevent.Timeout(remaining, TimeoutError):
            data: bytes = self.reader.read(size)
            return data


class GeventWorker(GunicornGeventWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = Settings.from_env()
        self.body_timeout = settings.body_timeout
        self.send_timeout = settings.send_timeout

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        # gunicorn's gevent worker makes the socket blocking (no timeout at all); a timeout
        # bounds every send (gevent's sendall: the whole answer) and every single receive
        client.settimeout(self.send_timeout)
        AsyncWorker.handle(self, listener, client, addr)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        if req.body is not None:
            deadline = time.monotonic() + self.body_timeout
            req.body.reader = BodyDeadline(req.body.reader, deadline)
        try:
            keep_alive = super().handle_request(listener_name, req, sock, addr)
            # The next request of a keep-alive connection may already be in its buffer, and
            # reading it would not yield: without waiting here for the other connections'
            # ready greenlets, one client kept the worker and the others waited (wrk -c8 on
            # /v1/graph: p99 311 ms; with this 12 ms, as the sync worker's 7 ms).
            gevent.idle()
            return keep_alive
        except TimeoutError:  # gunicorn would log a traceback; this is the client's doing
            self.log.info(
                "dropped a client that did not take its answer within %s s (%s %s)",
                self.send_timeout,
                req.method,
                req.path[:80],
            )
            raise StopIteration from None  # gunicorn closes the connection
