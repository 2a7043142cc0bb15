"""The admin socket: one JSON object per line in, one per line out (CONTRACT 6).

Rules of this room: handlers only read the agent's state or enqueue a request
(`resync`); kernel reads (`show`, `diff`) run on the writer thread through
`call_on_writer`, since only that thread lives in the managed namespace. The
socket is created with mode 0600: whoever can talk to it can make the agent
resync and can read the whole policy.

Bounded like the metrics endpoint: at most `MAX_CONNECTIONS` connections (one
thread each; more are told so and closed), a line is read at most
`MAX_REQUEST` bytes at a time (a longer one is refused and the connection
closed, never buffered whole), a connection idle for `IDLE_TIMEOUT` is
closed, and a `timeout` a caller asks for must lie in (0, `MAX_WAIT`].
"""

from __future__ import annotations

import json
import logging
import math
import os
import socketserver
import threading
from typing import Any, Protocol

from agent.admin import diff, views
from agent.bounded import BoundedThreads

LOG = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024      # bytes in one request line
MAX_CONNECTIONS = 16         # concurrent admin connections, one thread each
IDLE_TIMEOUT = 60.0          # seconds a connection may wait between lines or to send
MAX_WAIT = 3600.0            # longest `timeout` a request may ask for, in seconds


class AgentLike(Protocol):
    state: Any
    source: Any

    def request_resync(self, wait: bool = False, timeout: float = 60.0) -> dict[str, Any]: ...

    def call_on_writer(self, fn: Any, timeout: float = 30.0) -> Any: ...


def handle_request(agent: AgentLike, request: Any) -> dict[str, Any]:
    """Answer one decoded request; never raises."""
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return {"ok": False, "error": "a request is a JSON object with a string 'command'"}
    command = request["command"]
    try:
        if command == "status":
            return {"ok": True, **agent.state.status(agent.source.status())}
        if command == "resync":
            timeout = parse_timeout(request.get("timeout", 60))
            return agent.request_resync(wait=bool(request.get("wait")), timeout=timeout)
        if command == "ports":
            return {"ok": True, "ports": agent.state.ports()}
        if command == "show":
            key = request.get("port")
            if not isinstance(key, str) or not key:
                return {"ok": False, "error": "show needs 'port' (a port id or device)"}
            return views.show_port(agent, key)
        if command == "dump":
            return {"ok": True, **views.dump(agent.state)}
        if command == "diff":
            return diff.diff(agent)
        if command == "trace":
            return views.trace_packet(agent, request)
    except (TimeoutError, RuntimeError, ValueError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown command {command!r}"}


def parse_timeout(value: Any) -> float:
    """A request's `timeout`: a number of seconds in (0, MAX_WAIT].

    A huge value (1e300, "inf") would make the wait raise OverflowError, NaN
    never ends, and 0 or less cannot be waited for: all are refused by name.
    """
    error = ValueError(f"'timeout' {value!r:.40} is not a number of seconds in "
                       f"(0, {MAX_WAIT:g}]")
    if isinstance(value, bool):
        raise error
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise error from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_WAIT):
        raise error
    return seconds


def _reply(line: bytes, agent: AgentLike) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError as exc:
        return {"ok": False, "error": f"not JSON: {exc}"}
    return handle_request(agent, request)


class _Server(BoundedThreads, socketserver.UnixStreamServer):
    request_queue_size = 64
    refusal = json.dumps({"ok": False, "error": f"too many admin connections (at most "
                                                f"{MAX_CONNECTIONS})"}).encode() + b"\n"

    def __init__(self, path: str, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.limit(MAX_CONNECTIONS)
        super().__init__(path, handler)


class AdminServer:
    """Serves the admin socket from a thread in the agent's own namespace."""

    def __init__(self, path: str, agent: AgentLike) -> None:
        self.path = path
        self.agent = agent
        self._server: _Server | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        agent = self.agent

        class Handler(socketserver.StreamRequestHandler):
            timeout = IDLE_TIMEOUT  # on every read and write of the connection

            def handle(self) -> None:
                try:
                    self._serve()
                except OSError:  # a timeout or a client gone: just close
                    pass

            def _serve(self) -> None:
                while line := self.rfile.readline(MAX_REQUEST + 1):
                    if len(line) > MAX_REQUEST:
                        self._send({"ok": False, "error": f"request longer than "
                                                          f"{MAX_REQUEST} bytes"})
                        return  # the rest of the line is unread: the stream is lost
                    self._send(_reply(line, agent))

            def _send(self, reply: dict[str, Any]) -> None:
                self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")
                self.wfile.flush()

        old_umask = os.umask(0o177)
        try:
            self._server = _Server(self.path, Handler)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        threading.Thread(target=self._server.serve_forever, name="admin", daemon=True).start()
        LOG.info("admin socket at %s", self.path)

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
