"""agent/sdnotify.py against real unix datagram sockets (no systemd needed).

The namespace test is the reason the notifier opens its socket up front: an
abstract address is resolved in the network namespace of the sending socket,
and the writer thread that pings the watchdog lives in `[agent] netns`.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import netns
from agent.sdnotify import Notifier, status_line
from tests.support.topology import Topology


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(2)
        yield path, rx


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"hfwt-notify-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        rx.settimeout(2)
        yield "@" + name, rx


def test_one_datagram_per_notify_on_a_path_socket(path_socket) -> None:
    path, rx = path_socket
    notifier = Notifier(path)
    assert notifier.enabled
    assert notifier.notify("READY=1", status_line("generation 1"))
    assert rx.recv(4096) == b"READY=1\nSTATUS=generation 1"
    notifier.close()
    assert not notifier.notify("WATCHDOG=1")


def test_abstract_socket_written_with_an_at_sign(abstract_socket) -> None:
    address, rx = abstract_socket
    assert Notifier(address).notify("WATCHDOG=1")
    assert rx.recv(4096) == b"WATCHDOG=1"


def test_off_without_a_usable_address() -> None:
    for address in (None, "", "relative/notify.sock"):
        notifier = Notifier(address)
        assert not notifier.enabled
        assert not notifier.notify("READY=1")


def test_a_vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "gone.sock")).notify("READY=1")


def test_environment_is_taken_out_so_children_do_not_inherit_it() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = Notifier.from_environment(env)
    assert env == {"PATH": "/bin"}
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_period == 15.0


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(env).watchdog_period is None
    assert Notifier.from_environment({"WATCHDOG_USEC": "0"}).watchdog_period is None
    assert Notifier.from_environment({}).watchdog_period is None


def test_status_line_stays_one_line() -> None:
    assert status_line("apply failed:\niptables-restore  exited 1") == \
        "STATUS=apply failed: iptables-restore exited 1"


def _in_namespace(name: str, fn) -> object:
    """Run `fn` on a thread that entered namespace `name` (as the writer does)."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            netns.enter(name)
            result["value"] = fn()
        except Exception as exc:  # handed to the test thread
            result["value"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    return result["value"]


@pytest.mark.kernel
def test_abstract_socket_reachable_from_a_thread_in_another_netns(abstract_socket) -> None:
    address, rx = abstract_socket
    notifier = Notifier(address)  # created here, in this namespace, like the daemon does
    with Topology() as topo:
        assert _in_namespace(topo.node.ns, lambda: notifier.notify("WATCHDOG=1")) is True
        assert rx.recv(4096) == b"WATCHDOG=1"
        # the reason: a socket opened inside the namespace cannot see the address
        late = _in_namespace(topo.node.ns, lambda: Notifier(address).notify("WATCHDOG=1"))
        assert late is False
