"""The admin socket: one JSON object per line in, one per line out (CONTRACT 6).

Rules of this room: handlers only read the agent's state or enqueue a request
(`resync`); kernel reads (`show`, `diff`) run on the writer thread through
`call_on_writer`, since only that thread lives in the managed namespace. The
socket is created with mode 0600: whoever can talk to it can make the agent
resync and can read the whole policy.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from typing import Any, Protocol

from agent.admin import diff, views

LOG = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024


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
            timeout = float(request.get("timeout", 60))
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


class AdminServer:
    """Serves the admin socket from a thread in the agent's own namespace."""

    def __init__(self, path: str, agent: AgentLike) -> None:
        self.path = path
        self.agent = agent
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        agent = self.agent

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    if len(line) > MAX_REQUEST:
                        reply: dict[str, Any] = {"ok": False, "error": "request too long"}
                    else:
                        try:
                            reply = handle_request(agent, json.loads(line))
                        except ValueError as exc:
                            reply = {"ok": False, "error": f"not JSON: {exc}"}
                    self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")
                    self.wfile.flush()

        old_umask = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._server.daemon_threads = True
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
