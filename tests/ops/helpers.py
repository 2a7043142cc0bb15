"""What the operations tests share: a fake systemd notify socket, a private
xtables lock to stall the agent's writer, a scraper, and a small policy.

Stalling the writer for real: the tests give the agent its own
`XTABLES_LOCKFILE` (iptables honours it) and hold that lock, so the agent's
`iptables-restore --wait` blocks inside a genuine kernel write. The host's own
/run/xtables.lock is never touched.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.topology import VM


class NotifyListener:
    """A unix datagram socket standing in for systemd's; records (time, lines).

    `address` is written as in $NOTIFY_SOCKET: a path, or '@name' (abstract).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def lines(self, prefix: str = "", since: float = 0.0) -> list[tuple[float, str]]:
        """Every line starting with `prefix`, received after `since` (monotonic)."""
        with self._lock:
            return [(at, line) for at, lines in self.messages if at >= since
                    for line in lines if line.startswith(prefix)]

    def wait_for(self, line: str, timeout: float = 15.0, since: float = 0.0) -> float:
        """The time the first line starting with `line` arrived after `since`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, _ in self.lines(line, since=since):
                return at
            time.sleep(0.02)
        raise TimeoutError(f"no {line!r} from the agent; got {self.lines()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


class HeldLock:
    """Holds an xtables lock file (flock), as another iptables writer would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def free_port() -> int:
    """A loopback TCP port free right now (the agent binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    code, text = http_get(base + "/metrics")
    assert code == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def policy(*vms: VM, open_port: int = 22) -> dict[str, Any]:
    """Every VM in one group that lets `open_port` in and everything out."""
    return {
        "security_groups": {"sg-ops": [
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
             "port_range_min": open_port, "port_range_max": open_port},
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp",
             "remote_group_id": "sg-ops"},
            {"direction": "egress", "ethertype": "IPv4"},
        ]},
        "ports": [{"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
                   "fixed_ips": [vm.ipv4], "security_groups": ["sg-ops"]} for vm in vms],
    }
