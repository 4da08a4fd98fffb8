"""A deadline over a whole HTTP exchange (connect, send, every read), for http.client.

Socket timeouts bound each call, not their sum: a peer trickling a byte just inside the timeout
holds a thread forever. `cut_at` shuts the connection's socket down when the deadline passes,
which unblocks whatever call is under way; the caller then tells a timeout from a failure by
the event it returns. Webhook deliveries and source fetches use it.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cut_at(conn: http.client.HTTPConnection, seconds: float) -> Iterator[threading.Event]:
    """Within the block, `conn` is shut down `seconds` from now; the event is set if it was."""
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


__all__ = ["cut_at"]
