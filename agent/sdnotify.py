"""The systemd notify protocol (sd_notify(3)): READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Rules of this room:

1. No dependency: the protocol is one datagram of newline-separated
   `KEY=value` lines to the unix socket named by `$NOTIFY_SOCKET` (a path, or
   an abstract name written with a leading '@').
2. The socket is created once, by whoever builds the `Notifier`, in that
   thread's network namespace. An abstract unix address is looked up in the
   namespace of the *sending socket*, and the writer thread lives in
   `[agent] netns`, so a socket opened there could not reach systemd.
3. The environment is read once and then removed (like sd_notify's
   `unset_environment`), so iptables-restore, ipset and conntrack children
   never inherit a socket they must not talk to.
4. Never block or raise: a lost status line must not stall the writer. Sends
   time out after a second and failures are logged at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

LOG = logging.getLogger(__name__)
SEND_TIMEOUT = 1.0  # seconds; systemd reads its socket at once, so this never bites


class Notifier:
    """Sends notifications to systemd, or does nothing when not run by it."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """`address` as in $NOTIFY_SOCKET; `watchdog_usec` as in $WATCHDOG_USEC."""
        self.address = _socket_address(address)
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(SEND_TIMEOUT)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, taking the variables out of `environ`.

        WATCHDOG_USEC counts only when WATCHDOG_PID is unset or names this
        process (systemd sets it so that a child does not feed the parent's
        watchdog by mistake).
        """
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None)
        usec = env.pop("WATCHDOG_USEC", None)
        pid = env.pop("WATCHDOG_PID", None)
        watchdog = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_period(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WatchdogSec, as systemd advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one message; True if it left, False when off or it failed."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            LOG.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(address: str | None) -> str | None:
    """$NOTIFY_SOCKET as a socket address: '@name' is abstract; others must be absolute."""
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    LOG.warning("ignoring NOTIFY_SOCKET %r: neither a path nor an abstract '@' name", address)
    return None


def status_line(text: str) -> str:
    """A STATUS= line; newlines would start a new assignment, so they are flattened."""
    return "STATUS=" + " ".join(text.split())
