"""Which established flows the current policy no longer allows: the start audit.

Rules of this room: pure; a Snapshot in, a verdict per conntrack entry out.
The dataplane (agent/dataplane/flowcut.py `audit`) dumps the entries and
deletes those given a reason.

Why: cuts after a change (agent/compiler/flows.py) need the previous
snapshot. After a restart there is none, so a flow revoked while the agent
was down (or whose cut failed) would stay established for good, since
RELATED,ESTABLISHED comes first in every port chain. At start the agent
therefore judges every entry in the namespace against the policy now in
force, as the port chains would judge its first packet.

What is decidable, and so what is judged (everything else is left alone):
- only an entry's original tuple, and only entries without NAT (a reply
  tuple that is not the mirror of the original);
- only sides that are an address of a local port (fixed IP or host-sized
  address pair) in that port's conntrack zone (any zone when zones are off),
  owned by exactly one such port, with port security, not trusted
  (`network:*`), and in stateful groups only;
- a flow from such a port is judged by its egress rules; a flow to it by its
  ingress rules, unless it comes from the node itself (the node's own
  traffic to a VM crosses no port chain);
- what every port chain lets through before the groups is never cut:
  ICMPv6 and DHCP (udp ports 67, 68, 546, 547).
An entry is cut when no rule of the port's groups (or its provider rules)
matches it: protocol, ports, ICMP type and code, remote prefix, remote group
members and address group networks, local prefix. A cut of a flow that is in
fact allowed is harmless: its next packet is judged again and passes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import cached_property

from agent.compiler.flows import port_addresses
from agent.compiler.inputs import Snapshot
from agent.model import Port, Rule
from agent.vocab import protocols
from agent.vocab.flows import Flow

DHCP_PORTS = frozenset({67, 68, 546, 547})
TRUSTED_OWNER = "network:"


class _Networks:
    """A set of networks: host addresses in a set, the rest tested one by one."""

    def __init__(self, nets: Iterable[str]) -> None:
        self.hosts: set[str] = set()
        self.others: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in nets:
            net = ipaddress.ip_network(text)
            if net.num_addresses == 1:
                self.hosts.add(str(net.network_address))
            else:
                self.others.append(net)

    def __contains__(self, address: str) -> bool:
        if address in self.hosts:
            return True
        if not self.others:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.others)


class FlowAudit:
    """`verdict(flow)`: why the policy in `snap` no longer allows it, or None."""

    def __init__(self, snap: Snapshot, node_addresses: Iterable[str] = ()) -> None:
        self.snap = snap
        self.node = frozenset(node_addresses)
        self._sets: dict[tuple[str, str, int], _Networks] = {}

    @cached_property
    def _ports(self) -> dict[tuple[str, int | None], Port | None]:
        """(address, zone or None) -> the one judged port there (None: ambiguous)."""
        snap = self.snap
        groups = snap.policy.groups
        out: dict[tuple[str, int | None], Port | None] = {}
        for port in snap.policy.ports:
            if (port.device not in snap.devices or not port.port_security_enabled
                    or port.device_owner.startswith(TRUSTED_OWNER)
                    or any(not r.stateful for g in port.security_groups
                           for r in groups.get(g, ()))):
                continue
            zone = None
            if snap.settings.conntrack_zones:
                zone = snap.zones.get(snap.bridges.get(port.device, ""))
                if zone is None:
                    continue  # its entries' zone is unknown: leave them
            for address in port_addresses(port):
                key = (address, zone)
                out[key] = None if key in out else port
        return out

    def verdict(self, flow: Flow) -> str | None:
        if flow.nat or flow.family not in self.snap.settings.families or _always_open(flow):
            return None
        zone = flow.zone if self.snap.settings.conntrack_zones else None
        sender = self._ports.get((flow.src, zone))
        if sender is not None and not self._allowed(sender, "egress", flow, flow.src,
                                                    flow.dst):
            return f"no egress rule of port {sender.id} allows it"
        receiver = self._ports.get((flow.dst, zone))
        if receiver is not None and flow.src not in self.node and \
                not self._allowed(receiver, "ingress", flow, flow.dst, flow.src):
            return f"no ingress rule of port {receiver.id} allows it"
        return None

    def _allowed(self, port: Port, direction: str, flow: Flow, local: str,
                 remote: str) -> bool:
        groups = self.snap.policy.groups
        rules = [r for g in port.security_groups for r in groups.get(g, ())]
        if direction == "ingress":
            rules += _provider_rules(port, flow.family)
        return any(self._matches(r, direction, flow, local, remote) for r in rules)

    def _matches(self, rule: Rule, direction: str, flow: Flow, local: str,
                 remote: str) -> bool:
        if rule.direction != direction or rule.family != flow.family:
            return False
        if rule.protocol is not None and rule.protocol != flow.proto:
            return False
        if rule.protocol in protocols.ICMP_PROTOCOLS:
            if not _icmp_matches(rule, flow):
                return False
        elif rule.protocol in protocols.PORT_PROTOCOLS:
            if not (_in_range(flow.dport, rule.port_min, rule.port_max)
                    and _in_range(flow.sport, rule.source_port_min, rule.source_port_max)):
                return False
        if rule.remote_ip_prefix and not _in_net(remote, rule.remote_ip_prefix):
            return False
        if rule.local_ip_prefix and not _in_net(local, rule.local_ip_prefix):
            return False
        if rule.remote_group_id and remote not in self._members("g", rule.remote_group_id,
                                                                rule.family):
            return False
        return not (rule.remote_address_group_id and remote not in self._members(
            "a", rule.remote_address_group_id, rule.family))

    def _members(self, kind: str, group: str, family: int) -> _Networks:
        key = (kind, group, family)
        if key not in self._sets:
            policy = self.snap.policy
            if kind == "g":
                nets: Iterable[str] = policy.members.get(group, {}).get(family, ())
            else:
                nets = (n for n in policy.address_groups.get(group, ())
                        if ipaddress.ip_network(n).version == family)
            self._sets[key] = _Networks(nets)
        return self._sets[key]


def _always_open(flow: Flow) -> bool:
    """What the port chains pass before any group rule (ND, MLD, DHCP), never cut."""
    if flow.proto == protocols.ICMPV6:
        return True
    return flow.proto == 17 and bool({flow.sport, flow.dport} & DHCP_PORTS)


def _provider_rules(port: Port, family: int) -> list[Rule]:
    """The port's own provider rules (the compiler adds DHCP ones, kept by _always_open)."""
    return [r for r in port.security_group_rules if r.family == family]


def _icmp_matches(rule: Rule, flow: Flow) -> bool:
    """ICMP type/code; an unknown type or code in the entry counts as a match."""
    if rule.port_min is None or flow.icmp_type is None:
        return True
    if flow.icmp_type != rule.port_min:
        return False
    return rule.port_max is None or flow.icmp_code is None or flow.icmp_code == rule.port_max


def _in_range(value: int | None, low: int | None, high: int | None) -> bool:
    if low is None or value is None:
        return True
    return low <= value <= (high if high is not None else low)


def _in_net(address: str, net: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(net)

