"""RPC mode's local cache, and which devices a notification needs pulled.

Rules of this room:

1. Pure: no I/O, no clock, no threads. `RpcSource` holds one `PolicyCache`
   under its lock, merges every pull reply into it and delivers its policy.
2. Work in proportion to the change, as Neutron's own agents refresh only
   the devices a notification touches (`devices_to_pull`):

   | notification / event        | pull                                       |
   | --------------------------- | ------------------------------------------ |
   | rules of groups G updated   | the fewest local devices that cover G      |
   | members of groups G updated | the fewest devices whose rules use G       |
   | port_update for a device    | that device (and its old one if it moved)  |
   | port_delete                 | none: the port leaves the cache            |
   | a new tap                   | that device alone                          |
   | a tap gone                  | none: its port leaves the cache            |
   | start, reconnect, resync    | every local device (`full`), which also    |
   |                             | heals a lost or reordered notification     |

   A reply carries each group's whole rule list and each referenced remote
   group's whole member list, so one device per group is enough.
3. Merging keeps identity: a port, rule list or member set equal to the
   cached one stays the cached object, so the compiler's memos see
   unchanged inputs and recompile only what changed.
4. A partial reply replaces exactly what it speaks for: the asked devices
   (a device it leaves out has no port), and the groups and members it
   carries. Errors are kept per device and per group, so a fixed object's
   error goes away with the pull that fixed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.model import Policy, Port, Rule, dedupe_ports, parse_groups, parse_member_map
from agent.sources import rpc_api
from agent.sources.device_details import DeviceDetails
from agent.sources.rpc_messages import (
    MalformedReply,
    Notice,
    parse_reply_ports,
    referenced_remotes,
    reply_section,
)


@dataclass
class PolicyCache:
    """What the controller said about this node's devices, merged pull by pull."""

    ports: dict[str, Port] = field(default_factory=dict)            # device -> port
    groups: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    members: dict[str, Mapping[int, frozenset[str]]] = field(default_factory=dict)
    device_errors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    group_errors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    trusted: set[str] = field(default_factory=set)   # devices of Neutron's network:* ports
    _policy: Policy | None = None

    # ------------------------------------------------------------ merging

    def merge(self, replies: Iterable[tuple[Iterable[str], Any]], full: bool,
              details: DeviceDetails | None = None) -> None:
        """Fold in the replies of one pull; a full pull replaces the whole cache.

        `details` answers for the asked devices the replies left out (trusted
        ports, agent/sources/device_details.py). Raises MalformedReply (and
        changes nothing) when a reply's outer shape is wrong.
        """
        asked: set[str] = set()
        ports: dict[str, Port] = {}
        device_errors: dict[str, list[str]] = {}
        raw_groups: dict[Any, Any] = {}
        raw_members: dict[Any, Any] = {}
        for devices, reply in replies:
            chunk = frozenset(devices)
            asked |= chunk
            for device, port, error in parse_reply_ports(reply, chunk):
                if port is not None:
                    ports[device] = port
                else:
                    device_errors.setdefault(device, []).append(error)
            raw_groups.update(reply_section(reply, "security_groups"))
            raw_members.update(reply_section(reply, "sg_member_ips"))
        groups, group_errors = _per_group(raw_groups, parse_groups)
        members, member_errors = _per_group(raw_members, parse_member_map)

        old_ports, old_groups, old_members = self.ports, self.groups, self.members
        if full:
            self.ports, self.groups, self.members = {}, {}, {}
            self.device_errors, self.group_errors = {}, {}
            self.trusted = set()
        else:
            self.trusted -= asked
            self.ports = {d: p for d, p in self.ports.items() if d not in asked}
            self.device_errors = {d: e for d, e in self.device_errors.items()
                                  if d not in asked}
            self.groups, self.members = dict(self.groups), dict(self.members)
        for device, port in ports.items():
            old = old_ports.get(device)
            self.ports[device] = old if old == port else port
        for gid, rules in groups.items():
            old_rules = old_groups.get(gid)
            self.groups[gid] = old_rules if old_rules == rules else rules
        for gid, by_family in members.items():
            old_set = old_members.get(gid)
            self.members[gid] = old_set if old_set == by_family else by_family
        for gid in set(groups) | set(raw_groups):
            self.group_errors.pop(f"sg {gid}", None)
        for gid in set(members) | set(raw_members):
            self.group_errors.pop(f"members {gid}", None)
        if details is not None:
            self.trusted |= details.trusted - set(ports)
            for error in details.errors:
                device_errors.setdefault("device details", []).append(error)
        self.device_errors.update({d: tuple(e) for d, e in device_errors.items()})
        self.group_errors.update({f"sg {g}": e for g, e in group_errors.items()})
        self.group_errors.update({f"members {g}": e for g, e in member_errors.items()})
        self._policy = None

    def forget_devices(self, devices: Iterable[str]) -> bool:
        """Taps that vanished; True when the cache changed."""
        gone = [d for d in devices
                if d in self.ports or d in self.device_errors or d in self.trusted]
        for device in gone:
            self.ports.pop(device, None)
            self.device_errors.pop(device, None)
            self.trusted.discard(device)
        if gone:
            self._policy = None
        return bool(gone)

    def forget_port(self, port_id: str) -> bool:
        """port_delete: the port leaves the cache; True when it was here."""
        devices = [d for d, p in self.ports.items() if p.id == port_id]
        return self.forget_devices(devices)

    # ------------------------------------------------------------ reading

    def policy(self) -> Policy:
        """The cache as the daemon's Policy (the same object until the cache changes)."""
        if self._policy is None:
            errors: list[str] = [e for d in sorted(self.device_errors)
                                 for e in self.device_errors[d]]
            errors += [e for g in sorted(self.group_errors) for e in self.group_errors[g]]
            ports = dedupe_ports([self.ports[d] for d in sorted(self.ports)], errors)
            used = {g for p in ports for g in p.security_groups}
            rules = [self.groups[g] for g in sorted(used) if g in self.groups]
            remotes = referenced_remotes(rules, ports)
            address_groups = referenced_remotes(rules, ports, address_groups=True)
            self._policy = Policy(
                ports=tuple(ports),
                groups={g: self.groups[g] for g in sorted(used) if g in self.groups},
                members={g: self.members[g] for g in sorted(remotes | address_groups)
                         if g in self.members},
                address_groups={ag: tuple(sorted({n for nets in self.members.get(ag, {}).values()
                                                  for n in nets}))
                                for ag in sorted(address_groups)},
                errors=tuple(errors),
                trusted_devices=frozenset(self.trusted - {p.device for p in ports}))
        return self._policy

    def device_groups(self) -> dict[str, frozenset[str]]:
        """Local device -> the groups of its port."""
        return {d: frozenset(p.security_groups) for d, p in self.ports.items()}

    def device_remotes(self) -> dict[str, frozenset[str]]:
        """Local device -> the remote (and address) groups its rules reference."""
        out = {}
        for device, port in self.ports.items():
            rules = [self.groups.get(g, ()) for g in port.security_groups]
            out[device] = frozenset(referenced_remotes(rules, [port]) |
                                    referenced_remotes(rules, [port], address_groups=True))
        return out


def _per_group(raw: Mapping[Any, Any], parse: Any) -> tuple[dict[str, Any], dict[str, tuple]]:
    """Parse a groups or members section entry by entry, so errors stay attributable."""
    good: dict[str, Any] = {}
    errors: dict[str, tuple[str, ...]] = {}
    for key, value in raw.items():
        mine: list[str] = []
        good.update(parse({key: value}, mine))
        if mine:
            errors[str(key)] = tuple(mine)
    return good, errors


def unexplained(replies: Iterable[tuple[Iterable[str], Any]]) -> list[str]:
    """Asked devices no reply names a port for: those to ask `get_devices_details_list`
    about (Neutron leaves its trusted network:* ports out of the pull)."""
    asked: set[str] = set()
    named: set[str] = set()
    for devices, reply in replies:
        asked |= set(devices)
        for raw in reply_section(reply, "devices").values():
            if isinstance(raw, Mapping) and isinstance(raw.get("device"), str):
                named.add(raw["device"])
    return sorted(asked - named)


def policy_from_replies(replies: Iterable[tuple[Iterable[str], Any]]) -> Policy:
    """The replies of one pull of every device, as a Policy (what a full pull delivers)."""
    cache = PolicyCache()
    cache.merge(replies, full=True)
    return cache.policy()


# ---------------------------------------------------------------- which devices to pull


def cover(wanted: Iterable[str], device_sets: Mapping[str, frozenset[str]]) -> list[str]:
    """The fewest devices (greedy) whose sets together hold every reachable item of
    `wanted`; items no device holds are left out (they do not concern this node)."""
    left = set(wanted) & set().union(*device_sets.values()) if device_sets else set()
    chosen = []
    while left:
        device = max(sorted(device_sets), key=lambda d: len(device_sets[d] & left))
        chosen.append(device)
        left -= device_sets[device]
    return chosen


def devices_to_pull(notice: Notice, cache: PolicyCache, local: frozenset[str]) -> list[str]:
    """The local devices a notification needs pulled (none: it does not concern us).

    `port_delete` pulls nothing; the caller drops the port from the cache.
    """
    if notice.method == rpc_api.RULE_UPDATED:
        return cover(notice.groups, cache.device_groups())
    if notice.method == rpc_api.MEMBER_UPDATED:
        return cover(notice.groups, cache.device_remotes())
    if notice.method == rpc_api.PORT_UPDATE:
        devices = {notice.device} & local if notice.device else set()
        devices |= {d for d, p in cache.ports.items() if p.id == notice.port_id}
        return sorted(devices)
    return []


__all__ = ["MalformedReply", "PolicyCache", "cover", "devices_to_pull", "policy_from_replies",
           "unexplained"]
