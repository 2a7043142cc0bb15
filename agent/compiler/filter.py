"""Security groups -> filter table chains and ipsets, with Neutron's semantics.

Rules of this room:

1. Pure: a `Snapshot` in, a `FilterResult` out; no I/O, no clock, no config.
2. Neutron's per-port chains (`i` to the VM, `o` from it, `s` anti-spoof, then
   `sg-fallback` DROP) and Neutron's rule order inside them, so a Neutron
   user's expectations about which rule decides hold here.
3. Two changes of layout make it scale (see ARCHITECTURE):
   - Shared group chains. A group's rules live once per direction and family
     (`<p>-gi4-<group>`); an allow *goes to* `<p>-accept`, which sets the
     accept mark bit and returns to the port chain, which RETURNs on the mark.
     A rule change rewrites that group's chain only.
   - Dispatch trees. `<p>-from` (by `--physdev-in`) and `<p>-to` (by
     `--physdev-out`) find the port chain through a prefix tree on the device
     name (agent/compiler/dispatch.py), and end in the unknown-device verdict.
4. A port whose chains cannot be built gets chains that drop everything, and
   the reason goes into `errors`: never fail open.

Theory of operation, per packet bridged from tap A to tap B:
FORWARD -> <p>-FORWARD -> <p>-sg-chain -j <p>-from ... -g <p>-oA (spoof
check, egress rules: RETURN, or fallback DROP) -> <p>-sg-chain -j <p>-to ...
-g <p>-iB (ingress rules) -> <p>-sg-chain ACCEPT. From a VM to the node
itself: INPUT -> <p>-INPUT -j <p>-from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from agent.compiler.dispatch import build_tree
from agent.compiler.inputs import Settings, Snapshot
from agent.compiler.memo import LastCall
from agent.compiler.names import Names
from agent.compiler.rules import remote_sets, render_sg_rule
from agent.compiler.spoof import spoof_rules
from agent.dataplane.ruleset import Ruleset, Table, TableBuilder, render_rule
from agent.model import Port, Rule

ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED"
INVALID = "-m conntrack --ctstate INVALID"

# ICMPv6 types a VM must receive for neighbour discovery and MLD.
ICMPV6_INGRESS_ALLOWED = (130, 135, 136)
# ICMPv6 types a VM may send from :: before it has an address (MLD, DAD).
ICMPV6_UNSPEC_ALLOWED = (131, 135, 143)
ICMPV6_RA = 134
DHCP = {4: (68, 67), 6: (546, 547)}  # (client port, server port)


@dataclass(frozen=True)
class FilterResult:
    ruleset: Ruleset
    active_ports: tuple[str, ...]          # port ids with chains on this node
    port_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


def local_ports(snapshot: Snapshot) -> list[Port]:
    """The ports whose device is on this node, in device order (stable output)."""
    return sorted((p for p in snapshot.policy.ports if p.device in snapshot.devices),
                  key=lambda p: p.device)


def compile_filter(snapshot: Snapshot) -> FilterResult:
    """Compile the filter table (v4, v6) and the ipsets its rules reference.

    Port and group chains come from memoised functions of frozen values (the
    port, its groups' rules, the settings), so after a change only the ports
    and groups it touched are rendered again; that keeps a one-port change
    cheap at 1,000 ports. The tables do not depend on remote group members
    (rules name the sets), so a members-only change reuses the last tables
    whole and only the sets are computed again.
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
    tables: dict[tuple[int, str], Table] = {}
    port_chains: dict[str, list[str]] = {}
    used_rules: list[Rule] = []
    # Port chains name their groups' chains but hold none of their rules, so
    # they are keyed on group names: a rule change re-renders group chains only.
    kinds = {g: frozenset(r.stateful for r in rules) for g, rules in groups.items()}
    for family in settings.families:
        builder = TableBuilder(family, "filter")
        _skeleton(builder, names, settings.accept_mark)
        for port in local:
            port_groups = tuple(g for g in port.security_groups if g in groups)
            stateful = frozenset().union(*(kinds[g] for g in port_groups))
            try:
                chains = _port_chains(port, family, port_groups, stateful, settings)
            except ValueError as exc:  # e.g. mixed stateful and stateless groups
                errors.append(f"port {port.id!r}: cannot build its chains ({exc}); "
                              f"dropping all its traffic")
                chains = _drop_all_chains(port, names)
            builder.chains.update(chains)
            port_chains.setdefault(port.id, []).extend(chains)
            used_rules += port.security_group_rules
        for group in sorted({g for p in local if p.port_security_enabled
                             for g in p.security_groups if g in groups}):
            builder.chains.update(_group_chains(group, groups[group], family, settings))
            used_rules += groups[group]
        _dispatch(builder, list(local), names, settings.unknown_device_policy, trusted)
        tables[(family, "filter")] = builder.build()
    if len(errors) > 1:
        errors = list(dict.fromkeys(errors))
    return _Tables(tables, tuple(p.id for p in local),
                   {p: tuple(dict.fromkeys(c)) for p, c in port_chains.items()},
                   tuple(errors), tuple(dict.fromkeys(used_rules)))


# The tables do not depend on members: a members-only change reuses them whole.
_last_tables: LastCall[_Tables] = LastCall(_build_tables)


# ---------------------------------------------------------------- shared chains

def _skeleton(b: TableBuilder, names: Names, mark: int) -> None:
    wild = names.device_wildcard
    for builtin in ("INPUT", "FORWARD", "OUTPUT"):
        b.chain(names.chain(builtin))
        b.hook(builtin, names.chain(builtin))
    sg_chain = names.chain("sg-chain")
    b.chain(names.chain("FORWARD")).extend([
        render_rule(f"-j {sg_chain}",
                    matches=[f"-m physdev --physdev-out {wild} --physdev-is-bridged"],
                    comment="traffic to a VM"),
        render_rule(f"-j {sg_chain}",
                    matches=[f"-m physdev --physdev-in {wild} --physdev-is-bridged"],
                    comment="traffic from a VM"),
    ])
    b.chain(names.chain("INPUT")).append(
        render_rule(f"-j {names.chain('from')}", matches=[f"-m physdev --physdev-in {wild}"],
                    comment="traffic from a VM to this node"))
    b.chain(sg_chain).extend([
        render_rule(f"-j {names.chain('from')}",
                    matches=[f"-m physdev --physdev-in {wild} --physdev-is-bridged"],
                    comment="check the sending VM"),
        render_rule(f"-j {names.chain('to')}",
                    matches=[f"-m physdev --physdev-out {wild} --physdev-is-bridged"],
                    comment="check the receiving VM"),
        render_rule("-j ACCEPT", comment="both ends passed"),
    ])
    b.chain(names.chain("accept")).append(
        render_rule(f"-j MARK --set-xmark {mark:#x}/{mark:#x}", comment="a group allows"))
    b.chain(names.chain("sg-fallback")).append(
        render_rule("-j DROP", comment="default drop for unmatched traffic"))


def _dispatch(b: TableBuilder, local: list[Port], names: Names, unknown_policy: str,
              trusted: tuple[str, ...]) -> None:
    """The two dispatch trees, from a VM (physdev-in) and to a VM (physdev-out).

    A trusted device (Neutron's `network:*` ports) passes unfiltered both ways,
    like a port without port security, as Neutron's trusted-port ACCEPTs do.
    """
    unknown = "-j DROP" if unknown_policy == "drop" else "-j RETURN"
    for root, letter, direction in (("from", "o", "in"), ("to", "i", "out")):
        entries = tuple(sorted([
            (p.device, f"-g {names.port_chain(letter, p.device)}", f"port {p.id}")
            if p.port_security_enabled else
            (p.device, "-j RETURN", f"port {p.id} without port security")
            for p in local] + [(d, "-j RETURN", "trusted network port") for d in trusted]))
        b.chains.update(build_tree(root, entries, direction, unknown, names))


@lru_cache(maxsize=1 << 14)
def _group_chains(group: str, rules: tuple[Rule, ...], family: int,
                  settings: Settings) -> dict[str, tuple[str, ...]]:
    """A group's shared chains (ingress, egress) for one family."""
    names = settings.names
    accept = f"-g {names.chain('accept')}"
    return {names.group_chain(direction, family, group): tuple(dict.fromkeys(
        render_sg_rule(r, accept, names) for r in rules
        if r.family == family and r.direction == direction))
        for direction in ("ingress", "egress")}


def _drop_all_chains(port: Port, names: Names) -> dict[str, tuple[str, ...]]:
    drop = (render_rule("-j DROP", comment="policy error drop all"),)
    return {names.port_chain("i", port.device): drop,
            names.port_chain("o", port.device): drop}


# ---------------------------------------------------------------- per-port chains

@lru_cache(maxsize=1 << 14)
def _port_chains(port: Port, family: int, groups: tuple[str, ...], stateful: frozenset[bool],
                 settings: Settings) -> dict[str, tuple[str, ...]]:
    """One port's i, o and s chains for one family.

    `groups` are its known groups, `stateful` the statefulness of their rules.
    """
    if not port.port_security_enabled:
        return {}
    if len(stateful) > 1:
        raise ValueError("it mixes stateful and stateless security groups")
    names = settings.names
    mark = settings.accept_mark
    provider = [r for r in port.security_group_rules if r.family == family] \
        or _provider_rules(port, family)
    tail = [render_rule("-j DROP", matches=[INVALID], comment="drop invalid"),
            render_rule(f"-j {names.chain('sg-fallback')}", comment="unmatched traffic")]

    def group_jumps(direction: str) -> list[str]:
        if not groups:
            return []
        out = [render_rule(f"-j MARK --set-xmark 0x0/{mark:#x}", comment="clear the accept mark")]
        for group in groups:
            out += [render_rule(f"-j {names.group_chain(direction, family, group)}",
                                comment=f"group {group}"),
                    render_rule("-j RETURN", matches=[f"-m mark --mark {mark:#x}/{mark:#x}"],
                                comment="allowed by a group")]
        return out

    ingress_provider = dict.fromkeys(render_sg_rule(r, "-j RETURN", names)
                                     for r in provider if r.direction == "ingress")
    s_chain = names.port_chain("s", port.device)
    return {
        names.port_chain("i", port.device): (*_ingress_head(family), *ingress_provider,
                                             *group_jumps("ingress"), *tail),
        names.port_chain("o", port.device): (*_egress_head(family, s_chain),
                                             *group_jumps("egress"), *tail),
        s_chain: tuple(spoof_rules(port, family)),
    }


def _ingress_head(family: int) -> list[str]:
    head = []
    if family == 6:
        head += [_icmp6(t, "-j RETURN", "neighbour discovery and MLD")
                 for t in ICMPV6_INGRESS_ALLOWED]
    head.append(render_rule("-j RETURN", matches=[ESTABLISHED], comment="known session"))
    return head


def _egress_head(family: int, spoof_chain: str) -> list[str]:
    client, server = DHCP[family]
    if family == 4:
        head = [render_rule("-j RETURN", src="0.0.0.0/32", dst="255.255.255.255/32", proto="udp",
                            matches=[f"-m udp --sport {client} --dport {server}"],
                            comment="DHCP discover before an address")]
    else:
        head = [_icmp6(t, "-j RETURN", "MLD and DAD before an address",
                       src="::/128", dst="ff02::/16") for t in ICMPV6_UNSPEC_ALLOWED]
    head.append(render_rule(f"-j {spoof_chain}", comment="anti-spoofing"))
    if family == 6:
        head += [_icmp6(ICMPV6_RA, "-j DROP", "no router advertisements from a VM"),
                 render_rule("-j RETURN", proto="ipv6-icmp", comment="other ICMPv6")]
    head += [
        render_rule("-j RETURN", proto="udp", matches=[f"-m udp --sport {client} --dport {server}"],
                    comment="DHCP client"),
        render_rule("-j DROP", proto="udp", matches=[f"-m udp --sport {server} --dport {client}"],
                    comment="no DHCP server on a VM"),
        render_rule("-j RETURN", matches=[ESTABLISHED], comment="known session"),
    ]
    return head


def _icmp6(kind: int, target: str, comment: str, src: str | None = None,
           dst: str | None = None) -> str:
    return render_rule(target, src=src, dst=dst, proto="ipv6-icmp",
                       matches=[f"-m icmp6 --icmpv6-type {kind}"], comment=comment)


def _provider_rules(port: Port, family: int) -> list[Rule]:
    """DHCP replies to the port's own addresses (and RA on IPv6), as Neutron's server adds."""
    client, server = DHCP[family]
    ethertype = f"IPv{family}"
    extra = "255.255.255.255/32" if family == 4 else "fe80::/64"
    host = "/32" if family == 4 else "/128"
    dests = [ip + host for ip in port.ips(family)] + [extra]
    rules = [Rule(direction="ingress", ethertype=ethertype, protocol=17, port_min=client,
                  port_max=client, source_port_min=server, source_port_max=server,
                  local_ip_prefix=d) for d in dests]
    if family == 6 and port.ips(6):
        rules.append(Rule(direction="ingress", ethertype=ethertype, protocol=58,
                          port_min=ICMPV6_RA))
    return rules
