"""One security group rule -> the match part of an iptables rule.

Rules of this room: pure, and the only place that knows Neutron's rule
translation (protocols, ports, ICMP type/code, prefixes, remote groups as
ipsets). Tokens come out in iptables-save's order so the kernel's text equals
ours. Remote groups and address groups become hash:net ipsets; a rule only
names its set (`remote_set_name`) and `remote_sets` gathers the members, so
rendering stays a memoisable function of frozen values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache

from agent.compiler.inputs import Snapshot
from agent.compiler.memo import SizedLru
from agent.model import Rule
from agent.vocab import protocols
from agent.vocab.names import Names
from agent.vocab.rules import IptablesRule, Match, Target, icmp, match_set, multiport, ports
from agent.vocab.ruleset import IpSet

ANY_NET = {4: "0.0.0.0/0", 6: "::/0"}


@lru_cache(maxsize=1 << 16)
def render_sg_rule(rule: Rule, target: Target, names: Names) -> IptablesRule:
    """`rule` as one iptables rule ending in `target` (e.g. `-j RETURN`).

    A pure function of frozen values, so it is memoised: a group's rules are
    built once, not once per port and apply.
    """
    ingress = rule.direction == "ingress"
    prefix, local = (None if p == ANY_NET[rule.family] else p
                     for p in (rule.remote_ip_prefix, rule.local_ip_prefix))
    src, dst = (prefix, local) if ingress else (local, prefix)
    matches: list[Match] = []
    proto = protocols.token(rule.protocol) if rule.protocol is not None else None
    if rule.protocol in protocols.ICMP_PROTOCOLS and rule.port_min is not None:
        kind = f"{rule.port_min}/{rule.port_max}" if rule.port_max is not None \
            else str(rule.port_min)
        matches.append(icmp(4 if rule.protocol == 1 else 6, kind))
    elif rule.protocol in protocols.PORT_PROTOCOLS:
        matches += _port_matches(rule)
    set_name = remote_set_name(rule, names)
    if set_name:
        matches.append(match_set(set_name, "src" if ingress else "dst"))
    return IptablesRule(target, src=src, dst=dst, proto=proto, matches=tuple(matches),
                      comment=describe(rule))


def _port_matches(rule: Rule) -> list[Match]:
    """tcp/udp/sctp/dccp use their module for single ports; ranges and udplite multiport."""
    module = protocols.token(rule.protocol) if rule.protocol in protocols.MODULE_PROTOCOLS \
        else None
    singles: dict[str, str] = {}
    ranges = []
    for flag, low, high in (("sport", rule.source_port_min, rule.source_port_max),
                            ("dport", rule.port_min, rule.port_max)):
        if low is None:
            continue
        if low == high and module:
            singles[flag] = str(low)
        else:
            span = str(low) if low == high else f"{low}:{high}"
            ranges.append(multiport(f"--{flag}s", span))
    out = [ports(module, singles.get("sport"), singles.get("dport"))] \
        if singles and module else []
    return out + ranges


def remote_set_name(rule: Rule, names: Names) -> str | None:
    """The ipset of the rule's remote group or address group, if it has one."""
    if rule.remote_group_id:
        return names.ipset(rule.family, "g", rule.remote_group_id)
    if rule.remote_address_group_id:
        return names.ipset(rule.family, "a", rule.remote_address_group_id)
    return None


def remote_sets(rules: Iterable[Rule], snap: Snapshot) -> dict[str, IpSet]:
    """The ipsets (with members) that `rules` reference.

    A set over `Settings.max_set_members` is left empty, so the rules naming
    it match nothing (fail closed) while every other set and rule still
    lands; `oversized_sets` gives the reasons.
    """
    names = snap.settings.names
    limit = snap.settings.max_set_members
    out: dict[str, IpSet] = {}
    for rule in rules:
        name = remote_set_name(rule, names)
        if name is None or name in out:
            continue
        if rule.remote_group_id:
            members = _group_members(frozenset(_group_nets(snap, rule.remote_group_id,
                                                           rule.family)))
        else:
            members = frozenset(set_members(_address_group_nets(
                snap, rule.remote_address_group_id or "", rule.family)))
        out[name] = _ipset(name, rule.family, members if len(members) <= limit else frozenset())
    return out


def oversized_sets(snap: Snapshot, ipsets: Mapping[str, IpSet]) -> list[str]:
    """Why each referenced set in `ipsets` was left empty by `remote_sets`.

    Only groups with more nets than the limit are looked at closely, so this
    costs one length check per group and family.
    """
    names = snap.settings.names
    limit = snap.settings.max_set_members
    errors = []
    for gid, families in snap.policy.members.items():
        for family, nets in families.items():
            if len(nets) >= limit and names.ipset(family, "g", gid) in ipsets:
                count = len(_group_members(frozenset(nets)))
                if count > limit:
                    errors.append(f"security group {gid!r}: {count} IPv{family} members, over "
                                  f"the limit of {limit}; rules with it as remote group match "
                                  f"nothing")
    for agid, all_nets in snap.policy.address_groups.items():
        for family in (4, 6):
            if len(all_nets) >= limit and names.ipset(family, "a", agid) in ipsets:
                count = len(set_members(_address_group_nets(snap, agid, family)))
                if count > limit:
                    errors.append(f"address group {agid!r}: {count} IPv{family} networks, over "
                                  f"the limit of {limit}; rules with it as remote address "
                                  f"group match nothing")
    return errors


def _group_nets(snap: Snapshot, group_id: str, family: int) -> frozenset[str]:
    return snap.policy.members.get(group_id, {}).get(family) or frozenset()


def _address_group_nets(snap: Snapshot, group_id: str, family: int) -> list[str]:
    return [n for n in snap.policy.address_groups.get(group_id, ())
            if (":" in n) == (family == 6)]


# Members held by each of the two memos below: the sets in use keep their
# identity while they add up to fewer; a churning group costs no more.
MEMBER_BUDGET = 1 << 19


def _build_ipset(name: str, family: int, members: frozenset[str]) -> IpSet:
    return IpSet(name, family, members)


# The same IpSet object while a set is unchanged, so the engine can skip it.
_ipset: SizedLru[IpSet] = SizedLru(
    _build_ipset, lambda name, family, members, result: len(members) + 1, MEMBER_BUDGET)


def _build_group_members(nets: frozenset[str]) -> frozenset[str]:
    return frozenset(set_members(nets))


# set_members of a group's member set; an unchanged group costs a hash lookup.
_group_members: SizedLru[frozenset[str]] = SizedLru(
    _build_group_members, lambda nets, result: len(nets) + len(result) + 1, MEMBER_BUDGET)


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
