"""Security groups -> filter table chains and ipsets, with Neutron's semantics.

Rules of this room:

1. Pure: a `Snapshot` in, a `FilterResult` out; no I/O, no clock, no config.
2. Neutron's verdicts: every packet gets the verdict Neutron's per-port
   chains (`i` to the VM, `o` from it with the `s` spoof check, then
   `sg-fallback` DROP) would give it, so a Neutron user's expectations hold.
3. The layout is not Neutron's; four changes make it scale (see README):
   - Shared boilerplate. What every port has in common (DHCP guards,
     ND/MLD/RA, known sessions, INVALID, the mark) lives once per family in
     the chains of agent/compiler/common.py.
   - Port chains hold only what is the port's own. `o<dev>`: its (address,
     MAC) pairs, each going to its egress profile, then `-g bad-source`.
     `i<dev>`: its provider rules that name its own addresses, then `-g` its
     ingress profile.
   - Profile chains. Ports with the same ordered groups (and the same
     address-free provider rules) share `<p>-p{i,e}<f>-<digest>`, which jumps
     to the shared checks, then to each group in order, RETURNing on the
     accept mark, and ends in the fallback. A port whose groups change moves
     to another profile: its two port chains change, no group chain does.
   - Shared group chains. A group's rules live once per direction and family
     (`<p>-gi4-<group>`); an allow *goes to* `<p>-accept`, which sets the
     accept mark bit and returns to the profile. A rule change rewrites that
     group's chain only.
   Dispatch trees (agent/compiler/dispatch.py) find the port chain.
4. A port whose chains cannot be built gets chains that drop everything, and
   the reason goes into `errors`: never fail open.

Theory of operation, per packet bridged from tap A to tap B:
FORWARD -> <p>-FORWARD -> <p>-sg-chain -j <p>-from ... -g <p>-oA (a pair of
A matches: -g A's egress profile -j common-e: RETURN on the mark, or groups,
or fallback DROP; no pair: -g bad-source DROP) -> <p>-sg-chain -j <p>-to ...
-g <p>-iB (B's own provider rules, -g B's ingress profile) -> <p>-sg-chain
ACCEPT. A known session costs the dispatch, the pair, the profile's first
rule and the shared chain's drops: a VM's packet always passes its own spoof
check before RELATED,ESTABLISHED is looked at. From a VM to the node itself:
INPUT -> <p>-INPUT -j <p>-from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from agent.compiler.common import DHCP, ICMPV6_RA, bad_source_chain, common_chain, shared_chains
from agent.compiler.dispatch import Key, build_tree
from agent.compiler.inputs import Settings, Snapshot
from agent.compiler.memo import LastCall
from agent.compiler.rules import remote_sets, render_sg_rule
from agent.compiler.spoof import spoof_rules
from agent.model import Port, Rule
from agent.vocab.names import Names
from agent.vocab.rules import IptablesRule, call, goto, jump, mark, opt, physdev
from agent.vocab.ruleset import Ruleset, Table, TableBuilder


@dataclass(frozen=True)
class FilterResult:
    ruleset: Ruleset
    active_ports: tuple[str, ...]          # port ids with chains on this node
    port_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    """What a profile chain runs: shared by every port with the same value."""

    family: int
    direction: str                 # "ingress" (to the VM) or "egress" (from it)
    groups: tuple[str, ...]        # the port's known groups, in the port's order
    provider: tuple[Rule, ...] = ()  # ingress provider rules naming none of its addresses


def local_ports(snapshot: Snapshot) -> list[Port]:
    """The ports whose device is on this node, in device order (stable output)."""
    return sorted((p for p in snapshot.policy.ports if p.device in snapshot.devices),
                  key=lambda p: p.device)


def compile_filter(snapshot: Snapshot) -> FilterResult:
    """Compile the filter table (v4, v6) and the ipsets its rules reference.

    Port, profile and group chains come from memoised functions of frozen
    values (the port, its groups' names or rules, the settings), so after a
    change only the ports, profiles and groups it touched are rendered again;
    that keeps a one-port change cheap at 1,000 ports. The tables do not
    depend on remote group members (rules name the sets), so a members-only
    change reuses the last tables whole and only the sets are computed again.
    """
    groups = snapshot.policy.groups
    local = tuple(local_ports(snapshot))
    trusted = trusted_devices(snapshot, local)
    tables = _last_tables((local, groups, snapshot.settings, trusted), local, groups,
                          snapshot.settings, trusted)
    ipsets = remote_sets(tables.used_rules, snapshot)
    return FilterResult(Ruleset(tables.tables, ipsets), tables.active_ports,
                        tables.port_chains, tables.errors)


@dataclass(frozen=True)
class _Tables:
    tables: dict[tuple[int, str], Table]
    active_ports: tuple[str, ...]
    port_chains: dict[str, tuple[str, ...]]
    errors: tuple[str, ...]
    used_rules: tuple[Rule, ...]


def trusted_devices(snapshot: Snapshot, local: tuple[Port, ...]) -> tuple[str, ...]:
    """Present devices of Neutron's trusted ports that no local port claims, sorted."""
    claimed = {p.device for p in local}
    return tuple(sorted(snapshot.policy.trusted_devices & snapshot.devices - claimed))


def _build_tables(local: tuple[Port, ...], groups: Mapping[str, tuple[Rule, ...]],
                  settings: Settings, trusted: tuple[str, ...]) -> _Tables:
    names = settings.names
    errors = [f"port {p.id!r}: security group {g!r} is unknown; it allows nothing"
              for p in local for g in p.security_groups if g not in groups]
    kinds = {g: frozenset(r.stateful for r in rules) for g, rules in groups.items()}
    mixed: dict[tuple[str, ...], bool] = {}
    entries: list[_PortEntry] = []
    used_rules: list[Rule] = []
    for port in local:
        used_rules += port.security_group_rules
        if not port.port_security_enabled:
            continue
        port_groups = tuple(g for g in port.security_groups if g in groups)
        if port_groups not in mixed:
            mixed[port_groups] = len(frozenset().union(*(kinds[g] for g in port_groups))) > 1
        if mixed[port_groups]:
            errors.append(f"port {port.id!r}: cannot build its chains (it mixes stateful "
                          f"and stateless security groups); dropping all its traffic")
            entries.append(_drop_all(port, settings))
            continue
        try:
            entries.append(_port_entry(port, port_groups, settings))
        except ValueError as exc:
            errors.append(f"port {port.id!r}: cannot build its chains ({exc}); "
                          f"dropping all its traffic")
            entries.append(_drop_all(port, settings))
    tables: dict[tuple[int, str], Table] = {}
    for index, family in enumerate(settings.families):
        builder = TableBuilder(family, "filter")
        _skeleton(builder, names, settings.accept_mark)
        builder.chains.update(shared_chains(names, family, settings.accept_mark))
        profiles: dict[str, Profile] = {}
        for entry in entries:
            builder.chains.update(entry.chains[index])
            profiles.update(entry.profiles[index])
        for name, profile in profiles.items():
            builder.chains[name] = _profile_chain(profile, settings)[1]
        for group in sorted({g for p in profiles.values() for g in p.groups}):
            builder.chains.update(_group_chains(group, groups[group], family, settings))
            used_rules += groups[group]
        _dispatch(builder, list(local), names, settings.unknown_device_policy, trusted)
        tables[(family, "filter")] = builder.build()
    if len(errors) > 1:
        errors = list(dict.fromkeys(errors))
    return _Tables(tables, tuple(p.id for p in local),
                   {entry.port_id: entry.chain_names for entry in entries},
                   tuple(errors), tuple(dict.fromkeys(used_rules)))


@dataclass(frozen=True)
class _PortEntry:
    """One port's chains and profiles, per family in `settings.families` order."""

    port_id: str
    chains: tuple[dict[str, tuple[IptablesRule, ...]], ...]
    profiles: tuple[dict[str, Profile], ...]
    chain_names: tuple[str, ...]          # its own chains and its profiles, for `show`


# The tables do not depend on members: a members-only change reuses them whole.
_last_tables: LastCall[_Tables] = LastCall(_build_tables)


# ---------------------------------------------------------------- shared chains

def _skeleton(b: TableBuilder, names: Names, accept_mark: int) -> None:
    wild = names.device_wildcard
    for builtin in ("INPUT", "FORWARD", "OUTPUT"):
        b.chain(names.chain(builtin))
        b.hook(builtin, names.chain(builtin))
    sg_chain = names.chain("sg-chain")
    b.chain(names.chain("FORWARD")).extend([
        IptablesRule(call(sg_chain), matches=(physdev(out_dev=wild, bridged=True),),
                     comment="traffic to a VM"),
        IptablesRule(call(sg_chain), matches=(physdev(in_dev=wild, bridged=True),),
                     comment="traffic from a VM"),
    ])
    b.chain(names.chain("INPUT")).append(
        IptablesRule(call(names.chain("from")), matches=(physdev(in_dev=wild),),
                     comment="traffic from a VM to this node"))
    b.chain(sg_chain).extend([
        IptablesRule(call(names.chain("from")), matches=(physdev(in_dev=wild, bridged=True),),
                     comment="check the sending VM"),
        IptablesRule(call(names.chain("to")), matches=(physdev(out_dev=wild, bridged=True),),
                     comment="check the receiving VM"),
        IptablesRule(jump("ACCEPT"), comment="both ends passed"),
    ])
    b.chain(names.chain("accept")).append(
        IptablesRule(jump("MARK", opt("--set-xmark", f"{accept_mark:#x}/{accept_mark:#x}")),
                     comment="a group allows"))


def _dispatch(b: TableBuilder, local: list[Port], names: Names, unknown_policy: str,
              trusted: tuple[str, ...]) -> None:
    """The two dispatch trees, from a VM (physdev-in) and to a VM (physdev-out).

    A trusted device (Neutron's `network:*` ports) passes unfiltered both ways,
    like a port without port security, as Neutron's trusted-port ACCEPTs do.
    """
    unknown = jump("DROP" if unknown_policy == "drop" else "RETURN")
    for root, letter, matched in (("from", "o", "physdev-in"), ("to", "i", "physdev-out")):
        entries = tuple(sorted([
            (p.device, goto(names.port_chain(letter, p.device)), f"port {p.id}")
            if p.port_security_enabled else
            (p.device, jump("RETURN"), f"port {p.id} without port security")
            for p in local] + [(d, jump("RETURN"), "trusted network port") for d in trusted],
            key=lambda entry: entry[0]))
        b.chains.update(build_tree(root, entries, Key(matched, names.device_prefix), unknown,
                                   names))


@lru_cache(maxsize=1 << 14)
def _group_chains(group: str, rules: tuple[Rule, ...], family: int,
                  settings: Settings) -> dict[str, tuple[IptablesRule, ...]]:
    """A group's shared chains (ingress, egress) for one family."""
    names = settings.names
    accept = goto(names.chain("accept"))
    return {names.group_chain(direction, family, group): tuple(dict.fromkeys(
        render_sg_rule(r, accept, names) for r in rules
        if r.family == family and r.direction == direction))
        for direction in ("ingress", "egress")}


@lru_cache(maxsize=1 << 12)
def _profile_chain(profile: Profile, settings: Settings) -> tuple[str, tuple[IptablesRule, ...]]:
    """A profile's chain name and rules.

    It depends on group names, not their rules, so a rule change leaves every
    profile as it is. The name is a digest of what the chain runs: equal
    profiles get one chain, and a port that changes groups changes profile.
    """
    names = settings.names
    family, direction = profile.family, profile.direction
    on_mark = (mark(settings.accept_mark, settings.accept_mark),)
    returns = jump("RETURN")
    rules = [IptablesRule(call(common_chain(names, direction, family)),
                          comment="checks every port shares"),
             IptablesRule(returns, matches=on_mark, comment="allowed by a shared check")]
    rules += dict.fromkeys(render_sg_rule(r, returns, names) for r in profile.provider)
    for group in profile.groups:
        rules += [IptablesRule(call(names.group_chain(direction, family, group)),
                               comment=f"group {group}"),
                  IptablesRule(returns, matches=on_mark, comment="allowed by a group")]
    rules.append(IptablesRule(call(names.chain("sg-fallback")), comment="unmatched traffic"))
    digest = hashlib.sha256("\n".join(r.text for r in rules).encode()).hexdigest()[:10]
    return names.chain(f"p{direction[0]}{family}-{digest}"), tuple(rules)


def _drop_all(port: Port, settings: Settings) -> _PortEntry:
    """The entry of a port whose chains cannot be built: i and o drop everything."""
    names = settings.names
    drop = (IptablesRule(jump("DROP"), comment="policy error drop all"),)
    chains = {names.port_chain("i", port.device): drop,
              names.port_chain("o", port.device): drop}
    families = settings.families
    return _PortEntry(port.id, tuple(chains for _ in families), tuple({} for _ in families),
                      tuple(sorted(chains)))


# ---------------------------------------------------------------- per-port chains

@lru_cache(maxsize=1 << 14)
def _port_entry(port: Port, groups: tuple[str, ...], settings: Settings) -> _PortEntry:
    """One port's chains for every family: one cache lookup per port and compile."""
    per_family = [_port_chains(port, family, groups, settings) for family in settings.families]
    chains = tuple(c for c, _ in per_family)
    profiles = tuple(p for _, p in per_family)
    names = sorted({n for c in chains for n in c} | {n for p in profiles for n in p})
    return _PortEntry(port.id, chains, profiles, tuple(names))


def _port_chains(port: Port, family: int, groups: tuple[str, ...], settings: Settings
                 ) -> tuple[dict[str, tuple[IptablesRule, ...]], dict[str, Profile]]:
    """One port's i and o chains for one family, and its two profiles by chain name.

    `groups` are its known groups. Only what is the port's own is here: its
    spoof pairs and the provider rules that name its own addresses.
    """
    names = settings.names
    own, shared = _provider_split(port, family)
    ingress = Profile(family, "ingress", groups, shared)
    egress = Profile(family, "egress", groups)
    ingress_chain = _profile_chain(ingress, settings)[0]
    egress_chain = _profile_chain(egress, settings)[0]
    chains = {
        names.port_chain("i", port.device): (
            *dict.fromkeys(render_sg_rule(r, jump("RETURN"), names) for r in own),
            IptablesRule(goto(ingress_chain), comment="its security groups")),
        names.port_chain("o", port.device): (
            *spoof_rules(port, family, goto(egress_chain)),
            IptablesRule(goto(bad_source_chain(names, family)), comment="no allowed pair")),
    }
    return chains, {ingress_chain: ingress, egress_chain: egress}


def _provider_split(port: Port, family: int) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
    """The port's ingress provider rules: (those naming its own addresses, the others).

    Provider rules the source gives replace the defaults: DHCP replies to the
    port's own addresses and to broadcast (v4) or link-local (v6), and RA on
    IPv6 when the port has an IPv6 address, as Neutron's server adds them.
    Only the first kind differs between ports; the others go to the profile.
    """
    host = "/32" if family == 4 else "/128"
    addresses = tuple(ip + host for ip in port.ips(family))
    given = [r for r in port.security_group_rules
             if r.family == family and r.direction == "ingress"]
    if not given:
        return (tuple(_dhcp_reply(a, family) for a in addresses),
                _default_shared(family, bool(addresses)))
    return (tuple(r for r in given if r.local_ip_prefix in addresses),
            tuple(r for r in given if r.local_ip_prefix not in addresses))


@lru_cache(maxsize=1 << 14)
def _dhcp_reply(destination: str, family: int) -> Rule:
    """A DHCP reply to `destination` (the same Rule object for the same address)."""
    client, server = DHCP[family]
    return Rule(direction="ingress", ethertype=f"IPv{family}", protocol=17, port_min=client,
                port_max=client, source_port_min=server, source_port_max=server,
                local_ip_prefix=destination)


@lru_cache(maxsize=8)
def _default_shared(family: int, addressed: bool) -> tuple[Rule, ...]:
    """The default provider rules no port address is named in."""
    rules = [_dhcp_reply("255.255.255.255/32" if family == 4 else "fe80::/64", family)]
    if family == 6 and addressed:
        rules.append(Rule(direction="ingress", ethertype="IPv6", protocol=58,
                          port_min=ICMPV6_RA))
    return tuple(rules)
