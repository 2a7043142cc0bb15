"""The raw table: conntrack zones per bridge and NOTRACK for stateless groups.

Rules of this room: pure. CT is not a terminating target and only the first
CT rule a packet meets takes effect, so NOTRACK rules of stateless ports come
first, then the zone rules. Packets *from* a stateless port are matched by
`--physdev-in`; packets *to* it by destination address, since the bridge has
not chosen the output port yet when the raw table runs.
"""

from __future__ import annotations

import ipaddress

from agent.compiler.inputs import Snapshot
from agent.compiler.memo import LastCall
from agent.dataplane.ruleset import Table, TableBuilder, render_rule
from agent.model import Port


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
    for family in settings.families:
        b = TableBuilder(family, "raw")
        pre, out = names.chain("PREROUTING"), names.chain("OUTPUT")
        for builtin, chain in (("PREROUTING", pre), ("OUTPUT", out)):
            b.chain(chain)
            b.hook(builtin, chain)
        for port in stateless:
            note = f"port {port.id} is stateless"
            b.chain(pre).append(render_rule("-j CT --notrack", comment=note,
                                            matches=[f"-m physdev --physdev-in {port.device}"]))
            for ip in _addresses(port, family):
                b.chain(pre).append(render_rule("-j CT --notrack", dst=ip, comment=note))
                b.chain(out).append(render_rule("-j CT --notrack", dst=ip, comment=note))
        if settings.conntrack_zones:
            for bridge in bridges:
                zone = snap.zones.get(bridge)
                if zone is None:
                    continue
                note = f"zone for bridge {bridge}"
                b.chain(pre).append(render_rule(f"-j CT --zone {zone}", in_iface=bridge,
                                                comment=note))
                b.chain(out).append(render_rule(f"-j CT --zone {zone}", out_iface=bridge,
                                                comment=note))
        tables[(family, "raw")] = b.build()
    return tables


def _addresses(port: Port, family: int) -> list[str]:
    nets = [str(ipaddress.ip_network(ip)) for ip in port.ips(family)]
    nets += [p.ip_address for p in port.allowed_address_pairs
             if ipaddress.ip_network(p.ip_address).version == family]
    return list(dict.fromkeys(nets))


_last_raw: LastCall[dict[tuple[int, str], Table]] = LastCall(_build_raw)
