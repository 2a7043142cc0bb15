"""The interface between the daemon and a policy source (file or controller).

Rules of this room: a source never touches the kernel and never blocks the
daemon's loop. It delivers whole `Policy` values through the `deliver`
callback, from whatever thread it likes; the daemon queues them. The daemon
tells it which managed devices exist (`set_devices`) and when to re-read
everything (`resync`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from agent.model import Policy

Deliver = Callable[[Policy], None]


class PolicySource(abc.ABC):
    """Where ports, security groups and members come from."""

    name = "source"

    @abc.abstractmethod
    def start(self, deliver: Deliver) -> None:
        """Begin watching; call `deliver` with a complete Policy whenever it changes."""

    @abc.abstractmethod
    def resync(self) -> None:
        """Re-read everything soon and deliver it, even if nothing changed."""

    def reload(self) -> None:
        """SIGHUP: re-read the policy (not the kernel); by default a resync of the source."""
        self.resync()

    def set_devices(self, devices: frozenset[str]) -> None:
        """The managed devices present on the node (a pulling source asks for these)."""

    def stop(self) -> None:
        """Stop watching; must not block for long."""

    def status(self) -> dict[str, Any]:
        """Source-specific state for `agent-ctl status` (connection, errors)."""
        return {}
