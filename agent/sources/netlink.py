"""Watch managed devices (taps) appear and vanish, through rtnetlink (pyroute2).

Rules of this room:

1. Subscribe first, then dump, then read events on the same socket: a device
   created between the dump and the first read is still seen (the dump and
   the broadcasts queue separately), so nothing is missed.
2. The thread only observes: it keeps the index -> (name, master) map and
   reports every managed device with the bridge it is plugged into, after
   every datagram that changed something. The daemon coalesces
   those reports, so a burst of 500 taps costs one apply, not 500.
3. ENOBUFS means the kernel dropped events and the socket is dead for good:
   close it, open a new one, dump again and report with `full=True` so the
   daemon does a full resync.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from agent import netns
from agent.model import DEVICE_RE

LOG = logging.getLogger(__name__)
RCVBUF = 8 << 20


class DeviceWatcher(threading.Thread):
    """Reports `on_change(devices, full)`: managed device -> its bridge ("" if none)."""

    def __init__(self, namespace: str, prefix: str,
                 on_change: Callable[[dict[str, str], bool], None],
                 on_error: Callable[[str], None]) -> None:
        super().__init__(name="netlink", daemon=True)
        self.namespace = namespace
        self.prefix = prefix
        self.on_change = on_change
        self.on_error = on_error
        self._stop_event = threading.Event()
        self.reopens = 0

    def stop(self) -> None:
        """Stop after the next event; the thread is a daemon, so exit never waits for it."""
        self._stop_event.set()

    def run(self) -> None:
        try:
            netns.enter(self.namespace)
        except OSError as exc:
            self.on_error(f"netlink watcher cannot enter netns {self.namespace!r}: {exc}")
            return
        while not self._stop_event.is_set():
            try:
                self._watch()
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    LOG.warning("netlink: the kernel dropped link events (ENOBUFS); "
                                "reopening and resyncing")
                else:
                    LOG.error("netlink: %s; reopening in 1 s", exc)
                    self._stop_event.wait(1.0)
                self.reopens += 1

    def _watch(self) -> None:
        ipr = IPRoute(rcvbuf=RCVBUF)
        try:
            ipr.bind(groups=RTMGRP_LINK)
            links = {link["index"]: _entry(link) for link in ipr.get_links()}
            self.on_change(self._managed(links), True)
            # A blocking get(): pyroute2 buffers datagrams it has read in user
            # space, so select() on the socket can sleep while events wait.
            while not self._stop_event.is_set():
                changed = False
                for msg in ipr.get():
                    event = msg.get("event")
                    if event == "RTM_NEWLINK":
                        entry = _entry(msg)
                        changed |= links.get(msg["index"]) != entry
                        links[msg["index"]] = entry
                    elif event == "RTM_DELLINK":
                        changed |= links.pop(msg["index"], None) is not None
                if changed:
                    self.on_change(self._managed(links), False)
        finally:
            ipr.close()

    def _managed(self, links: dict[int, tuple[str, int]]) -> dict[str, str]:
        out = {}
        for name, master in links.values():
            if name and name.startswith(self.prefix):
                bridge = links.get(master, ("", 0))[0] if master else ""
                # The bridge name reaches iptables text (`-i <bridge>`), where a
                # trailing `+` is a wildcard: only a whole valid name passes.
                out[name] = bridge if bridge and DEVICE_RE.fullmatch(bridge) else ""
        return out


def _entry(msg: Any) -> tuple[str, int]:
    """(name, master ifindex) of a link message; 0 when it has no master."""
    return msg.get_attr("IFLA_IFNAME") or "", msg.get_attr("IFLA_MASTER") or 0
