"""A cap on the threads of a threading socketserver: the metrics and admin endpoints.

Rules of this room: no knowledge of what is served. `socketserver`'s
threading servers start one thread per connection with no limit, so idle
clients can take every thread and file descriptor of the agent (and then
each iptables-restore or ipset run fails). `BoundedThreads` serves at most
`max_connections` at a time; a connection over the cap gets `refusal`,
written without blocking, and is closed at once.
"""

from __future__ import annotations

import socketserver
import threading
from typing import Any


class BoundedThreads(socketserver.ThreadingMixIn):
    """Mix in before the server class; call `limit()` in `__init__`."""

    daemon_threads = True
    refusal = b""

    def limit(self, max_connections: int) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(self.refusal)
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
