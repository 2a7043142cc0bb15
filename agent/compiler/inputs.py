"""What the compiler reads: one immutable snapshot of the node.

Rules of this room: the snapshot is complete (the compiler never asks for
more), immutable, and free of handles, so a compile is a pure function of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.compiler.names import Names
from agent.model import Policy


@dataclass(frozen=True)
class Settings:
    """The configuration the compiler needs, copied out of oslo.config."""

    names: Names = field(default_factory=Names)
    unknown_device_policy: str = "drop"
    enable_ipv6: bool = True
    accept_mark: int = 0x1000000   # the packet mark bit a group's allow sets

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.enable_ipv6 else (4,)


@dataclass(frozen=True)
class Snapshot:
    """The policy plus the managed devices present on this node right now."""

    policy: Policy
    devices: frozenset[str]
    settings: Settings = field(default_factory=Settings)
