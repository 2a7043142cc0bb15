"""Private namespaces for the benchmarks: in-process engine threads, bulk taps.

Rules of this room:

1. The engine benchmarks call hostfw's engine in this process, from a worker
   thread that first moved itself into a private namespace with
   `agent.netns.enter` (exactly what the daemon's writer thread does), so the
   subprocesses it starts (iptables-restore, ipset) land there too. The
   worker is a one-thread executor whose initializer is that `enter`: if it
   fails the executor is broken and nothing runs, in the root namespace or
   anywhere else.
2. Namespace names use the test sandbox's prefix (`hfwt-<pid>-...`), so a
   killed run is cleaned up by `make clean-netns`; every namespace made here
   is deleted on the way out, also on errors.
3. A thousand taps are made with one `ip -batch` (three lines each), not a
   thousand `ip` processes.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from agent import netns
from tests.support.topology import NS_PREFIX, run, run_in

T = TypeVar("T")


@contextmanager
def private_netns(role: str) -> Iterator[str]:
    """A fresh, empty network namespace (lo up), deleted on exit."""
    name = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-{role}"
    run(["ip", "netns", "add", name])
    try:
        run_in(name, ["ip", "link", "set", "lo", "up"])
        yield name
    finally:
        delete_netns(name)


def delete_netns(name: str) -> None:
    """Kill what runs in `name` (it would pin the namespace), then delete it."""
    for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "delete", name], check=False)


class NetnsWorker:
    """One thread living in namespace `ns`; `call(fn)` runs fn there and returns its result.

    One thread, so an Engine made by `call` keeps being used from the thread
    (and namespace) that made it, as the daemon's writer does.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._root_inode = netns.current_inode()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{ns}",
                                        initializer=self._enter)

    def _enter(self) -> None:
        netns.enter(self.ns)
        if netns.current_inode() == self._root_inode:
            raise OSError(f"worker for {self.ns} is still in the caller's namespace")

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NetnsWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_taps(ns: str, names: Iterable[str], bridge: str | None = "br0") -> None:
    """Create tun/tap devices in `ns` in one `ip -batch`, enslaved to `bridge` and up."""
    lines = []
    for name in names:
        lines.append(f"tuntap add dev {name} mode tap")
        if bridge:
            lines.append(f"link set dev {name} master {bridge}")
        lines.append(f"link set dev {name} up")
    if lines:
        run_in(ns, ["ip", "-batch", "-"], input="\n".join(lines) + "\n")


def delete_links(ns: str, names: Iterable[str]) -> None:
    """Delete devices in `ns` in one `ip -batch`."""
    lines = [f"link del dev {name}" for name in names]
    if lines:
        run_in(ns, ["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n", check=False)


MONITOR_RE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\] (Deleted )?\d+: ([^:@]+)")


class LinkMonitor:
    """`ip -ts monitor link` in a namespace: when did the kernel announce each new link.

    The agent and this monitor receive the same rtnetlink broadcast, so the
    time printed here is the "netlink event" end of netlink-event-to-commit.
    """

    def __init__(self, ns: str) -> None:
        self.first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(["ip", "-n", ns, "-ts", "monitor", "link"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, name="link-monitor", daemon=True)
        self._thread.start()
        time.sleep(0.2)  # let it subscribe before the caller makes links

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = MONITOR_RE.match(line)
            if not match or match.group(2):
                continue
            stamp = datetime.fromisoformat(match.group(1)).timestamp()  # local time, as printed
            with self._lock:
                self.first_seen.setdefault(match.group(3).strip(), stamp)

    def wait_for(self, name: str, timeout: float = 5.0) -> float:
        """Wall-clock time of the first RTM_NEWLINK for `name`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if name in self.first_seen:
                    return self.first_seen[name]
            time.sleep(0.005)
        raise TimeoutError(f"no netlink event for {name} within {timeout} s")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
