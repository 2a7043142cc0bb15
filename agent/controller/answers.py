"""The parts of `security_group_info_for_devices` replies, built once per policy version.

Rules of this room:

1. One `Answers` per loaded policy; it lives in the controller's `Snapshot`
   and is dropped with it. Every part a reply is made of (a port's wire dict
   with the groups its rules refer to, a group's wire rules, the members of
   a remote group or address group for one ethertype) is built the first
   time a reply needs it and reused by every later reply of the same
   version. A reply for K devices then costs O(K + their groups), however
   many rules and members those groups have; the pull storm that follows a
   notification (every agent asking at once) builds each part once.
2. Parts are built lazily, not at load time, so a reload (and the casts
   that follow it) is not held up building parts nobody has asked for.
3. The memo dicts are filled without a lock: two threads that build the
   same part at once build equal values and one store wins (a dict store is
   atomic). A stored part is never changed.
4. Parts are shared by many replies and must be treated as read-only: a
   reply goes straight to the serialiser. The one per-request field, a
   port's `device`, is set on a shallow copy (`Answers.port`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from agent.controller.wire import members_to_wire, port_to_wire, rule_to_wire
from agent.model import ETHERTYPES, Policy, Port

Wire = dict[str, Any]
Members = list[list[str | None]]


class PortPart(NamedTuple):
    """A port's reply entry (without `device`) and the remotes its rules use."""

    wire: Wire
    remote_groups: tuple[tuple[str, str], ...]     # (group, ethertype), in rule order
    address_groups: tuple[tuple[str, str], ...]    # (address group, ethertype)


class Answers:
    """Memoised reply parts of one policy version (see the module rules)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._ports: dict[str, PortPart] = {}
        self._rules: dict[str, list[Wire]] = {}
        self._members: dict[tuple[str, str], Members] = {}
        self._address_members: dict[tuple[str, str], Members] = {}

    def port(self, port: Port, device: str) -> tuple[Wire, PortPart]:
        """The port's reply entry with `device` set as requested, and its part."""
        part = self._ports.get(port.id)
        if part is None:
            part = self._ports[port.id] = self._port_part(port)
        return {**part.wire, "device": device}, part

    def rules(self, group: str) -> list[Wire]:
        """A group's rules on the wire (`[]` for a group without rules or not defined)."""
        wire = self._rules.get(group)
        if wire is None:
            wire = self._rules[group] = [rule_to_wire(r)
                                         for r in self.policy.groups.get(group, ())]
        return wire

    def members(self, group: str, ethertype: str) -> Members:
        """A remote group's members of one ethertype as 1.3 pairs."""
        key = (group, ethertype)
        wire = self._members.get(key)
        if wire is None:
            nets = self.policy.members.get(group, {}).get(ETHERTYPES[ethertype], ())
            wire = self._members[key] = members_to_wire(nets)
        return wire

    def address_members(self, group: str, ethertype: str) -> Members:
        """An address group's CIDRs of one ethertype as 1.3 pairs."""
        key = (group, ethertype)
        wire = self._address_members.get(key)
        if wire is None:
            family = ETHERTYPES[ethertype]
            cidrs = self.policy.address_groups.get(group, ())
            wire = self._address_members[key] = members_to_wire(
                c for c in cidrs if (6 if ":" in c else 4) == family)
        return wire

    def _port_part(self, port: Port) -> PortPart:
        rules = [r for g in port.security_groups for r in self.policy.groups.get(g, ())]
        rules += port.security_group_rules
        remotes = dict.fromkeys((r.remote_group_id, r.ethertype)
                                for r in rules if r.remote_group_id)
        address = dict.fromkeys((r.remote_address_group_id, r.ethertype)
                                for r in rules if r.remote_address_group_id)
        wire = {
            **port_to_wire(port),
            "security_group_source_groups": list(dict.fromkeys(g for g, _ in remotes)),
            "security_group_remote_address_groups": list(dict.fromkeys(a for a, _ in address)),
        }
        return PortPart(wire, tuple(remotes), tuple(address))
