"""The metrics HTTP server and the admin socket under hostile clients (issue 14.7).

Idle connections must not pile up threads or file descriptors (every
iptables-restore and ipset run of the agent needs some), a connection that
says nothing is closed, a huge line is refused without being buffered, and
an absurd `timeout` gets a clear error instead of an OverflowError.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import metrics
from agent.admin import server as admin
from agent.metrics import Observer

IDLE = 1000


class Notifier:
    watchdog_period = None

    def notify(self, *lines: str) -> None:
        pass

    def close(self) -> None:
        pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def serve_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], int]]:
    """Start the metrics server with this connection timeout; returns its port."""
    observers: list[Observer] = []

    def start(io_timeout: float) -> int:
        monkeypatch.setattr(metrics, "IO_TIMEOUT", io_timeout, raising=False)
        obs = Observer(30.0, dict, Notifier())  # type: ignore[arg-type]
        observers.append(obs)
        return obs.serve("127.0.0.1:0")[1]

    yield start
    for obs in observers:
        obs.stop()


def scrape(port: int, tries: int = 20) -> int:
    """The status of a /metrics GET; a 503 (no free slot yet) is tried again."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                        timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
            threading.Event().wait(0.1)  # a slot is released just after its close
    return 503


def test_a_thousand_idle_connections_hold_neither_threads_nor_fds(
        serve_metrics: Callable[[float], int]) -> None:
    """Before: one thread and one descriptor per idle connection, for good."""
    port = serve_metrics(60.0)
    fds, threads = open_fds(), threading.active_count()
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(IDLE)]
    try:
        # The last ones are over the cap: answered 503 and closed at once.
        for client in clients[-10:]:
            assert client.recv(64).startswith(b"HTTP/1.0 503")
        server_fds = open_fds() - fds - IDLE
        assert server_fds <= metrics.MAX_CONNECTIONS + 5, server_fds
        assert threading.active_count() - threads <= metrics.MAX_CONNECTIONS
    finally:
        for client in clients:
            client.close()
    assert scrape(port) == 200  # the slots come back when the clients go


def test_a_connection_that_sends_nothing_is_closed(
        serve_metrics: Callable[[float], int]) -> None:
    """Before: an idle connection held its thread and descriptor forever."""
    port = serve_metrics(0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        assert client.recv(64) == b""
    assert scrape(port) == 200


# ---------------------------------------------------------------- admin socket

class Agent:
    """Enough of the daemon for the admin server: resync records its timeout."""

    state: Any = None
    source: Any = None

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def request_resync(self, wait: bool = False, timeout: float = 60.0) -> dict[str, Any]:
        threading.Lock().acquire(timeout=timeout)  # checks it as the daemon's wait does
        self.timeouts.append(timeout)
        return {"ok": True}

    def call_on_writer(self, fn: Any, timeout: float = 30.0) -> Any:
        raise AssertionError("not used")


@pytest.fixture
def admin_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Agent]]:
    monkeypatch.setattr(admin, "IDLE_TIMEOUT", 2.0, raising=False)
    agent = Agent()
    path = str(tmp_path / "agent.sock")
    server = admin.AdminServer(path, agent)
    server.start()
    yield path, agent
    server.stop()


def talk(path: str, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(payload)
        return json.loads(sock.makefile("rb").readline())


@pytest.mark.parametrize("timeout", [1e300, "1e400", float("inf"), float("nan"), -1, 0, True,
                                     "soon", [5]])
def test_an_absurd_timeout_is_refused_by_name(admin_socket: tuple[str, Agent],
                                              timeout: Any) -> None:
    """Before: 1e300 raised OverflowError in the wait and the connection died."""
    path, agent = admin_socket
    request = json.dumps({"command": "resync", "wait": True, "timeout": timeout})
    reply = talk(path, request.encode() + b"\n")
    assert reply["ok"] is False and "'timeout'" in reply["error"], reply
    assert agent.timeouts == []
    assert talk(path, b'{"command": "resync", "wait": true, "timeout": 30}\n') == {"ok": True}
    assert agent.timeouts == [30.0]


def test_a_huge_line_is_refused_without_reading_it_whole(
        admin_socket: tuple[str, Agent]) -> None:
    """Before: the whole line was buffered (readline without a limit), then refused."""
    path, _ = admin_socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sent = 0
        chunk = b"x" * 65536
        with pytest.raises(OSError):  # the server closes after MAX_REQUEST bytes
            while sent < 64 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        assert sent < 16 * 1024 * 1024, sent
    assert talk(path, b'{"command": "ping"}\n')["error"] == "unknown command 'ping'"


def test_idle_admin_connections_are_capped_and_closed(admin_socket: tuple[str, Agent]) -> None:
    path, _ = admin_socket
    threads = threading.active_count()
    clients = []
    for _ in range(admin.MAX_CONNECTIONS + 20):
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(5)
        client.connect(path)
        clients.append(client)
    try:
        refused = json.loads(clients[-1].makefile("rb").readline())
        assert "too many admin connections" in refused["error"]
        assert threading.active_count() - threads <= admin.MAX_CONNECTIONS
        assert clients[0].recv(64) == b""  # closed after IDLE_TIMEOUT
    finally:
        for client in clients:
            client.close()
