"""What the compiler reads: one immutable snapshot of the node.

Rules of this room: the snapshot is complete (the compiler never asks for
more), immutable, and free of handles, so a compile is a pure function of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.model import Policy
from agent.vocab.names import Names


@dataclass(frozen=True)
class NatSettings:
    """nova-network style NAT of this node (IPv4 only), copied out of `[nat]`.

    Present only when NAT is on (`[nat] fixed_range` set); agent/compiler/nat.py
    says what each field becomes. Values are validated by agent/config.py.
    """

    fixed_range: str                      # the VMs' IPv4 network, e.g. 10.0.0.0/24
    routing_source_ip: str = ""           # host SNAT address; empty: no host SNAT
    public_interface: str = ""            # where SNATed traffic leaves; empty: anywhere
    dmz_cidr: tuple[str, ...] = ()        # destinations that see fixed IPs (no SNAT)
    metadata_host: str = "127.0.0.1"
    metadata_port: int = 8775
    dhcp_bridges: tuple[str, ...] = ()    # bridges whose DHCP/DNS the node serves


@dataclass(frozen=True)
class Settings:
    """The configuration the compiler needs, copied out of oslo.config."""

    names: Names = field(default_factory=Names)
    unknown_device_policy: str = "drop"
    enable_ipv6: bool = True
    accept_mark: int = 0x1000000   # the packet mark bit a group's allow sets
    conntrack_zones: bool = True   # one conntrack zone per bridge (raw table CT --zone)
    # Members one remote group's or address group's ipset may hold; a bigger
    # one is refused on its own (agent/compiler/rules.py), as Felix caps its
    # sets (MaxIPSetSize, same default).
    max_set_members: int = 1 << 20
    nat: NatSettings | None = None  # None: no NAT chains at all

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.enable_ipv6 else (4,)


@dataclass(frozen=True)
class Snapshot:
    """The policy plus the managed devices present on this node right now.

    `bridges` maps a device to the bridge it is plugged into (from netlink);
    `zones` maps a bridge to its conntrack zone, allocated by the daemon with
    agent/compiler/zones.py so that numbers survive restarts.
    """

    policy: Policy
    devices: frozenset[str]
    settings: Settings = field(default_factory=Settings)
    bridges: Mapping[str, str] = field(default_factory=dict)
    zones: Mapping[str, int] = field(default_factory=dict)
