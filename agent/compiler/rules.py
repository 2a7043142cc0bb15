"""One security group rule -> the match part of an iptables rule.

Rules of this room: pure, and the only place that knows Neutron's rule
translation (protocols, ports, ICMP type/code, prefixes, remote groups as
ipsets). Tokens come out in iptables-save's order so the kernel's text equals
ours. Remote groups and address groups become hash:net ipsets, registered in
the `ipsets` dict the caller passes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from agent import protocols
from agent.compiler.inputs import Snapshot
from agent.dataplane.ruleset import IpSet, render_rule
from agent.model import Rule

ANY_NET = {4: "0.0.0.0/0", 6: "::/0"}


def render_sg_rule(rule: Rule, target: str, snap: Snapshot, ipsets: dict[str, IpSet]) -> str:
    """`rule` as one iptables rule ending in `target` (e.g. `-j RETURN`)."""
    ingress = rule.direction == "ingress"
    prefix, local = (None if p == ANY_NET[rule.family] else p
                     for p in (rule.remote_ip_prefix, rule.local_ip_prefix))
    src, dst = (prefix, local) if ingress else (local, prefix)
    matches: list[str] = []
    proto = protocols.token(rule.protocol) if rule.protocol is not None else None
    if rule.protocol in protocols.ICMP_PROTOCOLS and rule.port_min is not None:
        kind = f"{rule.port_min}/{rule.port_max}" if rule.port_max is not None \
            else str(rule.port_min)
        matches.append(f"-m icmp --icmp-type {kind}" if rule.protocol == 1
                       else f"-m icmp6 --icmpv6-type {kind}")
    elif rule.protocol in protocols.PORT_PROTOCOLS:
        matches += _port_matches(rule)
    remote = rule.remote_group_id or rule.remote_address_group_id
    if remote:
        set_name = remote_set(rule, snap, ipsets)
        matches.append(f"-m set --match-set {set_name} {'src' if ingress else 'dst'}")
    return render_rule(target, src=src, dst=dst, proto=proto, matches=matches,
                       comment=describe(rule))


def _port_matches(rule: Rule) -> list[str]:
    """tcp/udp/sctp/dccp use their module for single ports; ranges and udplite multiport."""
    module = protocols.token(rule.protocol) if rule.protocol in protocols.MODULE_PROTOCOLS \
        else None
    singles = []
    ranges = []
    for flag, low, high in (("sport", rule.source_port_min, rule.source_port_max),
                            ("dport", rule.port_min, rule.port_max)):
        if low is None:
            continue
        if low == high and module:
            singles.append(f"--{flag} {low}")
        else:
            span = str(low) if low == high else f"{low}:{high}"
            ranges.append(f"-m multiport --{flag}s {span}")
    out = [f"-m {module} " + " ".join(singles)] if singles else []
    return out + ranges


def remote_set(rule: Rule, snap: Snapshot, ipsets: dict[str, IpSet]) -> str:
    """The ipset holding the members of the rule's remote (address) group."""
    names = snap.settings.names
    if rule.remote_group_id:
        name = names.ipset(rule.family, "g", rule.remote_group_id)
        members: Iterable[str] = snap.policy.members.get(rule.remote_group_id, {}) \
            .get(rule.family, ())
    else:
        group = rule.remote_address_group_id or ""
        name = names.ipset(rule.family, "a", group)
        members = (n for n in snap.policy.address_groups.get(group, ())
                   if (":" in n) == (rule.family == 6))
    if name not in ipsets:
        ipsets[name] = IpSet(name, rule.family, frozenset(set_members(members)))
    return name


def set_members(nets: Iterable[str]) -> set[str]:
    """Members as hash:net accepts them: /0 becomes two /1 halves."""
    out = set()
    for text in nets:  # canonical network strings from the model
        if text.endswith("/0"):
            out.update(str(half) for half in ipaddress.ip_network(text).subnets(prefixlen_diff=1))
        else:
            out.add(text)
    return out


def describe(rule: Rule) -> str:
    """A short human comment; ids passed the model's whitelist, so they are safe here."""
    what = protocols.token(rule.protocol) if rule.protocol is not None else "any"
    if rule.port_min is not None:
        what += f" {rule.port_min}" + (f"-{rule.port_max}" if rule.port_max not in
                                       (None, rule.port_min) else "")
    remote = rule.remote_group_id or rule.remote_address_group_id
    if remote:
        what += f" from {remote}" if rule.direction == "ingress" else f" to {remote}"
    return what
