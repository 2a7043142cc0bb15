"""Which conntrack entries to delete when a permission goes away.

Rules of this room: pure; old snapshot + new snapshot in, a list of `FlowCut`
out; the dataplane deletes the matching entries after the apply that removed
the permission (so no new entry can be made under the old rules meanwhile).
It runs after every apply, so the common cases are cheap: with the policy
unchanged (a tap came or went) only removed devices are looked at, and the
members a group lost are computed once per group, not once per port.

Without this, an established connection outlives the rule that allowed it:
RELATED,ESTABLISHED is accepted in the shared checks every profile runs
first (right after the sender's spoof pairs), before any group. The cuts follow
Neutron's triggers, at its (coarse) granularity where finer is not possible:
- a port goes, or leaves a group, or loses an address: all its flows (of the
  lost address);
- a rule of one of its groups goes: its flows of that protocol and direction;
- a member of a remote group or a CIDR of an address group it references
  goes: its flows with that member (an address or a whole network).
The next packet of a cut flow is judged against the current rules; a flow
that is still allowed is picked up again as new.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from agent.compiler.inputs import Snapshot
from agent.model import Port, Rule
from agent.vocab.flows import FlowCut


def floating_ip_cuts(old: Mapping[str, str], new: Mapping[str, str]) -> list[FlowCut]:
    """Flows of floating IPs whose NAT went away or now maps elsewhere.

    NAT is decided on a connection's first packet and kept in its conntrack
    entry, so an established flow keeps the old translation unless its entry
    goes: those DNATed from the floating IP (original destination) and those
    SNATed to it (reply destination). nova cut by fixed IP, which also killed
    the VM's flows that never used the floating IP.
    """
    cuts = []
    for ip in sorted(ip for ip, fixed in old.items() if new.get(ip) != fixed):
        why = f"floating IP {ip} removed or moved"
        cuts += [FlowCut(4, dst=ip, reason=why), FlowCut(4, reply_dst=ip, reason=why)]
    return cuts


def flows_to_cut(old: Snapshot | None, new: Snapshot) -> list[FlowCut]:
    if old is None:
        return []
    new_ports = {p.id: p for p in new.policy.ports if p.device in new.devices}
    cuts: set[FlowCut] = set()
    if old.policy is new.policy and old.settings == new.settings:
        # Same ports, rules and members: only ports whose tap went lose anything.
        old_local = [p for p in old.policy.ports
                     if p.device in old.devices and p.device not in new.devices]
    else:
        old_local = [p for p in old.policy.ports if p.device in old.devices]
    lost_members = _LostMembers(old, new)
    for port in old_local:
        zone = _zone(old, port)
        after = new_ports.get(port.id)
        if after is None or after.device != port.device:
            cuts |= _all_flows(port, port_addresses(port), zone, f"port {port.id} removed")
            continue
        lost = port_addresses(port) - port_addresses(after)
        cuts |= _all_flows(port, lost, zone, f"port {port.id} lost addresses")
        if not port.port_security_enabled:
            if after.port_security_enabled:
                cuts |= _all_flows(after, port_addresses(after), zone,
                                   f"port {port.id} got port security")
            continue
        if set(port.security_groups) - set(after.security_groups):
            cuts |= _all_flows(port, port_addresses(port), zone, f"port {port.id} left a group")
            continue
        old_rules, new_rules = _rules(port, old), _rules(after, new)
        for rule in old_rules - new_rules:
            cuts |= _rule_flows(port, rule, zone, f"a rule of port {port.id} was removed")
        if lost_members.any:
            for rule in old_rules & new_rules:
                cuts |= _member_flows(port, rule, lost_members, zone)
    return sorted(cuts, key=repr)


def _zone(snap: Snapshot, port: Port) -> int | None:
    if not snap.settings.conntrack_zones:
        return None
    return snap.zones.get(snap.bridges.get(port.device, ""))


def port_addresses(port: Port) -> set[str]:
    """Host addresses of the port (fixed IPs and host-sized address pairs)."""
    out = set(port.fixed_ips)
    for pair in port.allowed_address_pairs:
        net = ipaddress.ip_network(pair.ip_address)
        if net.num_addresses == 1:
            out.add(str(net.network_address))
    return out


def _rules(port: Port, snap: Snapshot) -> set[Rule]:
    return {r for g in port.security_groups for r in snap.policy.groups.get(g, ())}


def _all_flows(port: Port, addresses: set[str], zone: int | None, why: str) -> set[FlowCut]:
    out = set()
    for ip in addresses:
        family = ipaddress.ip_address(ip).version
        out.add(FlowCut(family, src=ip, zone=zone, reason=why))
        out.add(FlowCut(family, dst=ip, zone=zone, reason=why))
    return out


def _rule_flows(port: Port, rule: Rule, zone: int | None, why: str) -> set[FlowCut]:
    out = set()
    for ip in port_addresses(port):
        if ipaddress.ip_address(ip).version != rule.family:
            continue
        if rule.direction == "ingress":
            out.add(FlowCut(rule.family, rule.protocol, dst=ip, zone=zone, reason=why))
        else:
            out.add(FlowCut(rule.family, rule.protocol, src=ip, zone=zone, reason=why))
    return out


class _LostMembers:
    """Members each remote group or address group lost, computed once per group."""

    def __init__(self, old: Snapshot, new: Snapshot) -> None:
        self.old, self.new = old.policy, new.policy
        self.any = (self.old.members != self.new.members
                    or self.old.address_groups != self.new.address_groups)
        self._cache: dict[tuple[str, str, int], frozenset[str]] = {}

    def of(self, rule: Rule) -> frozenset[str]:
        key = (rule.remote_group_id or "", rule.remote_address_group_id or "", rule.family)
        if key not in self._cache:
            self._cache[key] = self._compute(rule)
        return self._cache[key]

    def _compute(self, rule: Rule) -> frozenset[str]:
        if rule.remote_group_id:
            group = rule.remote_group_id
            return frozenset(set(self.old.members.get(group, {}).get(rule.family, ())) -
                             set(self.new.members.get(group, {}).get(rule.family, ())))
        if rule.remote_address_group_id:
            ag = rule.remote_address_group_id
            return frozenset(set(self.old.address_groups.get(ag, ())) -
                             set(self.new.address_groups.get(ag, ())))
        return frozenset()


def _member_flows(port: Port, rule: Rule, lost: _LostMembers,
                  zone: int | None) -> set[FlowCut]:
    gone = lost.of(rule)
    if not gone:
        return set()
    group = rule.remote_group_id
    out = set()
    why = f"a member of {group or rule.remote_address_group_id} was removed"
    for net in gone:
        member = ipaddress.ip_network(net)
        if member.version != rule.family:
            continue
        # A host member is cut by its address; a network (an address group's
        # CIDR, a member's address-pair range) by the network: every address in it.
        remote = str(member.network_address) if member.num_addresses == 1 else str(member)
        for ip in port_addresses(port):
            if ipaddress.ip_address(ip).version != rule.family:
                continue
            src, dst = (remote, ip) if rule.direction == "ingress" else (ip, remote)
            out.add(FlowCut(rule.family, rule.protocol, src=src, dst=dst, zone=zone,
                            reason=why))
    return out
