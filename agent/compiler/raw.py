"""The raw table: conntrack zones per bridge and NOTRACK for stateless groups.

Rules of this room: pure. CT is not a terminating target and only the first
CT rule a packet meets takes effect, so NOTRACK rules of stateless ports come
first, then the zone rules, which find the bridge through a dispatch tree
(agent/compiler/dispatch.py) as the filter table finds a port. With NAT on,
agent/compiler/nat.py adds the zone rules of routed flows (`raw_zones`)
around the bridge rules.

NOTRACK is scoped to the port, never the node: packets *from* a stateless
port are matched by `--physdev-in`; packets *to* it by its bridge (`-i`, or
`-o` for the node's own packets) plus one of its host addresses, since the
bridge has not chosen the output port yet when the raw table runs. An
allowed address pair wider than one host (0.0.0.0/0 in the worst case) gets
no destination rule: on a shared bridge it would untrack the traffic of
every other port in that range, and of the node. Traffic to such a range is
tracked one way only (the port's replies are untracked), which admits
nothing extra: ESTABLISHED needs a reply conntrack has seen.
"""

from __future__ import annotations

import ipaddress

from agent.compiler.dispatch import Key, build_tree
from agent.compiler.inputs import Snapshot
from agent.compiler.memo import LastCall
from agent.compiler.nat import raw_zones
from agent.compiler.zones import ZONE_IN, ZONE_OUT
from agent.model import Port
from agent.vocab.rules import IptablesRule, call, jump, opt, physdev
from agent.vocab.ruleset import Table, TableBuilder


def is_stateless(port: Port, snap: Snapshot) -> bool:
    """True when the port's groups are stateless (the model rejects mixing)."""
    rules = [r for g in port.security_groups for r in snap.policy.groups.get(g, ())]
    return bool(rules) and not rules[0].stateful


def mixed_statefulness(port: Port, snap: Snapshot) -> bool:
    flags = {r.stateful for g in port.security_groups for r in snap.policy.groups.get(g, ())}
    return len(flags) > 1


def compile_raw(snap: Snapshot, local: list[Port]) -> dict[tuple[int, str], Table]:
    """The raw tables; the very same objects while their inputs are unchanged.

    They depend on the local ports, their groups' statefulness, bridges and
    zones, not on members.
    """
    key = (tuple(local), snap.policy.groups, snap.bridges, snap.zones, snap.settings)
    return _last_raw(key, snap, local)


def _build_raw(snap: Snapshot, local: list[Port]) -> dict[tuple[int, str], Table]:
    settings = snap.settings
    names = settings.names
    tables = {}
    stateless = [p for p in local if p.port_security_enabled and is_stateless(p, snap)
                 and not mixed_statefulness(p, snap)]
    untracked = {p.device for p in stateless}
    bridges = sorted({snap.bridges[p.device] for p in local
                      if snap.bridges.get(p.device) and p.device not in untracked})
    notrack = jump("CT", opt("--notrack"))
    for family in settings.families:
        b = TableBuilder(family, "raw")
        pre, out = names.chain("PREROUTING"), names.chain("OUTPUT")
        for builtin, chain in (("PREROUTING", pre), ("OUTPUT", out)):
            b.chain(chain)
            b.hook(builtin, chain)
        for port in stateless:
            note = f"port {port.id} is stateless"
            b.chain(pre).append(IptablesRule(notrack, comment=note,
                                             matches=(physdev(in_dev=port.device),)))
            bridge = snap.bridges.get(port.device)
            if not bridge:
                continue  # not on a bridge (yet): no scope for its addresses
            for ip in _host_addresses(port, family):
                b.chain(pre).append(IptablesRule(notrack, dst=ip, in_iface=bridge,
                                                 comment=note))
                b.chain(out).append(IptablesRule(notrack, dst=ip, out_iface=bridge,
                                                 comment=note))
        nat = raw_zones(snap, local) if family == 4 else None
        if nat:
            b.chain(pre).extend(nat.prerouting_first)
            b.chain(out).extend(nat.output_first)
        if settings.conntrack_zones:
            _zone_trees(b, snap, bridges)
        if nat:
            b.chain(pre).extend(nat.prerouting_last)
        tables[(family, "raw")] = b.build()
    return tables


def _zone_trees(b: TableBuilder, snap: Snapshot, bridges: list[str]) -> None:
    """Each bridge's zone, found through a dispatch tree on the bridge name.

    `<p>-zone-in` (PREROUTING, `-i`) and `<p>-zone-out` (OUTPUT, `-o`): a
    node with hundreds of networks puts each packet through a few levels of
    name prefixes instead of one rule per bridge. A packet of a bridge with
    no zone (or none of ours) returns and stays in zone 0.
    """
    names = snap.settings.names
    entries = tuple((bridge, jump("CT", opt("--zone", snap.zones[bridge])),
                     f"zone for bridge {bridge}") for bridge in bridges if bridge in snap.zones)
    if not entries:
        return
    for builtin, root, matched in (("PREROUTING", ZONE_IN, "in"), ("OUTPUT", ZONE_OUT, "out")):
        b.chains.update(build_tree(root, entries, Key(matched, noun="bridge"), jump("RETURN"),
                                   names))
        b.chain(names.chain(builtin)).append(
            IptablesRule(call(names.chain(root)), comment="conntrack zone of the bridge"))


def _host_addresses(port: Port, family: int) -> list[str]:
    """The port's fixed IPs and single-host allowed address pairs, as iptables-save
    prints them (`/32`, `/128`); wider pairs are left out (see the module doc)."""
    host = 32 if family == 4 else 128
    nets = [ipaddress.ip_network(ip) for ip in port.ips(family)]
    nets += [ipaddress.ip_network(p.ip_address) for p in port.allowed_address_pairs]
    return list(dict.fromkeys(str(n) for n in nets
                              if n.version == family and n.prefixlen == host))


_last_raw: LastCall[dict[tuple[int, str], Table]] = LastCall(_build_raw)
