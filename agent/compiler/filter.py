"""Security groups -> filter table chains and ipsets, with Neutron's semantics.

Rules of this room:

1. Pure: a `Snapshot` in, a `FilterResult` out; no I/O, no clock, no config.
2. The layout follows Neutron's Linux-bridge driver (per-port `i`, `o` and `s`
   chains, `sg-chain`, `sg-fallback`), with one change that keeps unknown
   devices closed: `sg-chain` hands a packet to two dispatch chains,
   `<p>-egress` (by `--physdev-in`, from a VM) and `<p>-ingress` (by
   `--physdev-out`, to a VM), which `goto` the port chain and end in the
   unknown-device verdict. A port chain's RETURN therefore returns to
   `sg-chain`, which checks the other end and finally ACCEPTs.
3. Per-port rule order is Neutron's (see `_ingress_rules`/`_egress_rules`),
   so a Neutron user's expectations about which rule decides hold here.
4. A port whose chains cannot be built gets chains that drop everything, and
   the reason goes into `errors`: never fail open.

Theory of operation, per packet bridged between tap A and tap B:
FORWARD -> <p>-FORWARD -> <p>-sg-chain -> <p>-egress -g <p>-oA (spoof check,
egress rules, RETURN or fallback DROP) -> <p>-ingress -g <p>-iB (ingress rules,
RETURN or DROP) -> ACCEPT. Traffic from a VM to the node itself takes
INPUT -> <p>-INPUT -> <p>-egress.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent import protocols
from agent.compiler.inputs import Snapshot
from agent.compiler.names import Names
from agent.dataplane.ruleset import IpSet, Ruleset, Table, TableBuilder, render_rule
from agent.model import Port, Rule

ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED"
INVALID = "-m conntrack --ctstate INVALID"
ANY_NET = {4: "0.0.0.0/0", 6: "::/0"}

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


def compile_filter(snapshot: Snapshot) -> FilterResult:
    """Compile the filter table (v4, v6) and the ipsets its rules reference."""
    settings = snapshot.settings
    names = settings.names
    local = sorted((p for p in snapshot.policy.ports if p.device in snapshot.devices),
                   key=lambda p: p.device)
    errors: list[str] = []
    ipsets: dict[str, IpSet] = {}
    tables: dict[tuple[int, str], Table] = {}
    port_chains: dict[str, tuple[str, ...]] = {}
    for family in settings.families:
        builder = TableBuilder(family, "filter")
        _skeleton(builder, names, settings.unknown_device_policy)
        for port in local:
            try:
                chains = _port_chains(port, family, snapshot, ipsets)
            except ValueError as exc:  # defensive: a model bug must not open a port
                errors.append(f"port {port.id!r}: cannot build its chains ({exc}); "
                              f"dropping all its traffic")
                chains = _drop_all_chains(port, names)
            _dispatch(builder, port, names)
            for name, rules in chains.items():
                builder.chain(name).extend(rules)
            port_chains.setdefault(port.id, ())
            port_chains[port.id] += tuple(c for c in chains if c not in port_chains[port.id])
        _close_dispatch(builder, names, settings.unknown_device_policy)
        tables[(family, "filter")] = builder.build()
    for port in local:
        for group in port.security_groups:
            if group not in snapshot.policy.groups:
                errors.append(f"port {port.id!r}: security group {group!r} is unknown; "
                              f"it allows nothing")
    return FilterResult(Ruleset(tables, ipsets), tuple(p.id for p in local), port_chains,
                        tuple(errors))


# ---------------------------------------------------------------- shared chains

def _skeleton(b: TableBuilder, names: Names, unknown_policy: str) -> None:
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
        render_rule(f"-j {names.chain('egress')}",
                    matches=[f"-m physdev --physdev-in {wild}"],
                    comment="traffic from a VM to this node"))
    b.chain(sg_chain).extend([
        render_rule(f"-j {names.chain('egress')}",
                    matches=[f"-m physdev --physdev-in {wild} --physdev-is-bridged"],
                    comment="check the sending VM"),
        render_rule(f"-j {names.chain('ingress')}",
                    matches=[f"-m physdev --physdev-out {wild} --physdev-is-bridged"],
                    comment="check the receiving VM"),
    ])
    b.chain(names.chain("egress"))
    b.chain(names.chain("ingress"))
    b.chain(names.chain("sg-fallback")).append(
        render_rule("-j DROP", comment="default drop for unmatched traffic"))


def _close_dispatch(b: TableBuilder, names: Names, unknown_policy: str) -> None:
    verdict = "-j DROP" if unknown_policy == "drop" else "-j RETURN"
    b.chain(names.chain("egress")).append(
        render_rule(verdict, comment=f"unknown device {unknown_policy}"))
    b.chain(names.chain("ingress")).append(
        render_rule(verdict, comment=f"unknown device {unknown_policy}"))
    b.chain(names.chain("sg-chain")).append(render_rule("-j ACCEPT", comment="both ends passed"))


def _dispatch(b: TableBuilder, port: Port, names: Names) -> None:
    dev = port.device
    if port.port_security_enabled:
        to_vm = f"-g {names.port_chain('i', dev)}"
        from_vm = f"-g {names.port_chain('o', dev)}"
        note = f"port {port.id}"
    else:
        to_vm = from_vm = "-j RETURN"
        note = f"port {port.id} without port security"
    b.chain(names.chain("ingress")).append(render_rule(
        to_vm, matches=[f"-m physdev --physdev-out {dev} --physdev-is-bridged"], comment=note))
    b.chain(names.chain("egress")).append(render_rule(
        from_vm, matches=[f"-m physdev --physdev-in {dev}"], comment=note))


def _drop_all_chains(port: Port, names: Names) -> dict[str, list[str]]:
    drop = [render_rule("-j DROP", comment="policy error drop all")]
    return {names.port_chain("i", port.device): list(drop),
            names.port_chain("o", port.device): list(drop)}


# ---------------------------------------------------------------- per-port chains

def _port_chains(port: Port, family: int, snap: Snapshot,
                 ipsets: dict[str, IpSet]) -> dict[str, list[str]]:
    if not port.port_security_enabled:
        return {}
    names = snap.settings.names
    i_chain = names.port_chain("i", port.device)
    o_chain = names.port_chain("o", port.device)
    s_chain = names.port_chain("s", port.device)
    fallback = names.chain("sg-fallback")
    rules = [r for g in port.security_groups for r in snap.policy.groups.get(g, ())
             if r.family == family]
    provider = [r for r in port.security_group_rules if r.family == family] \
        or _provider_rules(port, family)
    ingress = [_sg_rule(r, snap, ipsets) for r in provider + rules if r.direction == "ingress"]
    egress = [_sg_rule(r, snap, ipsets) for r in rules if r.direction == "egress"]
    tail = [render_rule("-j DROP", matches=[INVALID], comment="drop invalid"),
            render_rule(f"-j {fallback}", comment="unmatched traffic")]
    return {
        i_chain: [*_ingress_head(family), *ingress, *tail],
        o_chain: [*_egress_head(family, s_chain), *egress, *tail],
        s_chain: _spoof_rules(port, family),
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
    dests = [str(ipaddress.ip_network(ip)) for ip in port.ips(family)] + [extra]
    rules = [Rule(direction="ingress", ethertype=ethertype, protocol=17, port_min=client,
                  port_max=client, source_port_min=server, source_port_max=server,
                  local_ip_prefix=d) for d in dests]
    if family == 6 and port.ips(6):
        rules.append(Rule(direction="ingress", ethertype=ethertype, protocol=58,
                          port_min=ICMPV6_RA))
    return rules


def _sg_rule(rule: Rule, snap: Snapshot, ipsets: dict[str, IpSet]) -> str:
    """One security group rule as a RETURN rule of a port chain."""
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
        set_name = _remote_set(rule, snap, ipsets)
        matches.append(f"-m set --match-set {set_name} {'src' if ingress else 'dst'}")
    return render_rule("-j RETURN", src=src, dst=dst, proto=proto, matches=matches,
                       comment=_describe(rule, remote))


def _port_matches(rule: Rule) -> list[str]:
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


def _remote_set(rule: Rule, snap: Snapshot, ipsets: dict[str, IpSet]) -> str:
    names = snap.settings.names
    if rule.remote_group_id:
        name = names.ipset(rule.family, "g", rule.remote_group_id)
        members: Iterable[str] = snap.policy.members.get(rule.remote_group_id, {}) \
            .get(rule.family, ())
    else:
        name = names.ipset(rule.family, "a", rule.remote_address_group_id or "")
        members = (n for n in snap.policy.address_groups.get(rule.remote_address_group_id
                                                             or "", ())
                   if ipaddress.ip_network(n).version == rule.family)
    if name not in ipsets:
        ipsets[name] = IpSet(name, rule.family, frozenset(set_members(members)))
    return name


def set_members(nets: Iterable[str]) -> set[str]:
    """Members as hash:net accepts them: /0 becomes two /1 halves."""
    out = set()
    for text in nets:
        net = ipaddress.ip_network(text)
        if net.prefixlen == 0:
            out.update(str(half) for half in net.subnets(prefixlen_diff=1))
        else:
            out.add(str(net))
    return out


def _describe(rule: Rule, remote: str | None) -> str:
    """A short human comment; ids passed the model's whitelist, so they are safe here."""
    what = protocols.token(rule.protocol) if rule.protocol is not None else "any"
    if rule.port_min is not None:
        what += f" {rule.port_min}" + (f"-{rule.port_max}" if rule.port_max not in
                                       (None, rule.port_min) else "")
    if remote:
        what += f" from {remote}" if rule.direction == "ingress" else f" to {remote}"
    return what


# ---------------------------------------------------------------- anti-spoofing

def _spoof_rules(port: Port, family: int) -> list[str]:
    """RETURN for allowed (source, MAC) pairs, then DROP; AAPs first, as Neutron."""
    pairs: list[tuple[str, str]] = []
    for pair in port.allowed_address_pairs:
        net = ipaddress.ip_network(pair.ip_address)
        if net.version == family:
            pairs.append((str(net), pair.mac_address or port.mac_address))
    pairs += [(str(ipaddress.ip_network(ip)), port.mac_address) for ip in port.ips(family)]
    if family == 6:
        macs = [port.mac_address] + [m for _, m in pairs if m != port.mac_address]
        pairs += [(f"{eui64_link_local(m)}/128", m) for m in dict.fromkeys(macs)]
    rules = []
    if not port.fixed_ips and not port.allowed_address_pairs:
        rules.append(render_rule("-j RETURN", matches=[f"-m mac --mac-source {port.mac_address}"],
                                 comment="port without IPs any address from its MAC"))
    for net, mac in dict.fromkeys(pairs):
        rules.append(render_rule("-j RETURN", src=None if net == ANY_NET[family] else net,
                                 matches=[f"-m mac --mac-source {mac}"],
                                 comment="allowed IP and MAC pair"))
    rules.append(render_rule("-j DROP", comment="spoofed source"))
    return rules


def eui64_link_local(mac: str) -> str:
    """The fe80::/64 address SLAAC derives from `mac` (modified EUI-64)."""
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = octets[:3] + [0xFF, 0xFE] + octets[3:]
    iid = int.from_bytes(bytes(eui), "big")
    return str(ipaddress.IPv6Address((0xFE80 << 112) | iid))
