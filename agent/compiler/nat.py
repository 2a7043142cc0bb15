"""nova-network NAT: floating IPs, host SNAT, metadata, DHCP and DNS on the bridge.

Rules of this room:

1. Pure, like the rest of the compiler: a `Snapshot` in, a `NatResult` out.
   The one side effect NAT needs, forgetting the conntrack entries of a
   floating IP that went away, is decided by agent/compiler/flows.py from
   `NatResult.floating_ips` of two successive compiles and run by the writer
   thread: this module only says which addresses are mapped.
2. IPv4 only, as nova-network was: nothing here writes ip6tables.
3. Off unless configured: with `Settings.nat` unset (no `[nat] fixed_range`)
   the result is empty, no nat chain exists, and `floating_ips` on ports are
   ignored. Every exemption and the metadata rules are scoped by the fixed
   range, so NAT without one would be ill-defined.
4. nova's layout (research/nova_network.md 1.3 and 2), under our prefix, so
   an operator who knows nova-network reads the tables at once:

   nat    PREROUTING  -> <p>-PREROUTING   metadata DNAT/REDIRECT, floating DNAT
          OUTPUT      -> <p>-OUTPUT       floating DNAT (the node itself)
          POSTROUTING -> <p>-POSTROUTING  no-SNAT exemptions, then SNAT of DNATed
                                          flows to their floating IP
                      -> <p>-postrouting-bottom -> <p>-snat -> <p>-float-snat
                                                   then the host SNAT
   filter FORWARD, OUTPUT -> <p>-filter-top -> <p>-local   routed traffic to a VM
          FORWARD -> <p>-network-FORWARD   routed traffic from a VM
          INPUT   -> <p>-network-INPUT     metadata, DHCP, DNS -> <p>-network-accept

5. NAT must not open a way around security groups. Bridged traffic is
   checked by the filter compiler through physdev, but a packet the node
   *routes* to or from a VM (a floating IP's flows, host SNAT, the node
   itself talking to a VM) is not "bridged" and would pass unchecked. So
   routed traffic goes through the same port chains: to a VM by its fixed
   IPv4 address in `<p>-local`, from a VM through the `<p>-from` dispatch
   tree in `<p>-network-FORWARD`. The latter cannot live in `<p>-local`:
   that chain is reachable from OUTPUT, where the kernel refuses the
   anti-spoofing chains' `-m mac`.
6. Conntrack zones (`[firewall] conntrack_zones`, on by default) put each
   bridge's packets in its own zone in the raw table (agent/compiler/raw.py).
   A routed flow has one end on the bridge and the other on the public side
   or in the node itself, where no bridge rule applies, so `raw_zones` adds
   what makes both directions meet the same entry (research/nova_network.md):
   - packets *to a floating IP*, from anywhere and from the node itself,
     get the zone of its VM's bridge, before the bridge rules: a client's
     DNATed flow, the replies of a VM's floating SNAT, and a VM reaching
     another VM's floating IP on its bridge;
   - packets routed in *to a fixed IP* (DMZ, a remote metadata host) get the
     zone of the port's bridge, after the bridge rules;
   - with a host SNAT (`routing_source_ip`) the replies come back to the
     node's own address, which no zone can be keyed on. So a VM without a
     floating IP leaving the fixed range gets its bridge's zone for the
     original direction only (`CT --zone-orig`): the entry's reply side is
     in zone 0, where those replies arrive. Destinations that keep the
     fixed source (the node's routing_source_ip and its fixed-range
     address, metadata, the DMZ) keep the full zone.
   One flow cannot work with zones: between floating IPs of VMs on two
   different bridges, each direction is addressed to the other bridge's
   floating IP, so the two directions get two zones.
7. The services in `<p>-network-INPUT` accept only after the sender passed
   its own checks (`<p>-network-accept` jumps to `<p>-INPUT` first), so the
   result does not depend on where the planner put our INPUT hook relative
   to the filter compiler's (it inserts missing hooks at the top). Likewise
   the routed checks only drop or fall through, so their order against
   `<p>-FORWARD` does not matter either.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.compiler.inputs import NatSettings, Snapshot
from agent.model import Port
from agent.vocab.names import Names
from agent.vocab.rules import IptablesRule, Target, call, ctstate, jump, match, opt, physdev, ports
from agent.vocab.ruleset import Ruleset, Table, TableBuilder

METADATA_IP = "169.254.169.254/32"
METADATA_PORT = 80
# What the node serves on a VM bridge (nova's dnsmasq accept rules).
BRIDGE_SERVICES = (("udp", 67, "DHCP"), ("tcp", 67, "DHCP"),
                   ("udp", 53, "DNS"), ("tcp", 53, "DNS"))


@dataclass(frozen=True)
class NatResult:
    """What `compile_nat` made, and what the writer needs to clean up after it."""

    ruleset: Ruleset
    floating_ips: Mapping[str, str] = field(default_factory=dict)  # floating -> fixed IPv4
    errors: tuple[str, ...] = ()


def compile_nat(snapshot: Snapshot) -> NatResult:
    """The nat table and the extra filter chains of this node; empty when NAT is off."""
    nat = snapshot.settings.nat
    if nat is None:
        return NatResult(Ruleset())
    names = snapshot.settings.names
    local = sorted((p for p in snapshot.policy.ports if p.device in snapshot.devices),
                   key=lambda p: p.device)
    targets, errors = _floating_fixed(local)
    floating = {ip: fixed for ip, (fixed, _) in targets.items()}
    tables = {(4, "nat"): _nat_table(nat, names, floating),
              (4, "filter"): _filter_table(nat, names, local)}
    return NatResult(Ruleset(tables), floating, tuple(errors))


@dataclass(frozen=True)
class NatZones:
    """raw-table rules (IPv4) that keep routed NAT flows in one conntrack zone."""

    prerouting_first: tuple[IptablesRule, ...] = ()   # before the bridge rules
    prerouting_last: tuple[IptablesRule, ...] = ()    # after them: arrivals from elsewhere
    output_first: tuple[IptablesRule, ...] = ()


def raw_zones(snapshot: Snapshot, local: Sequence[Port]) -> NatZones:
    """See point 6 of the module doc; empty when NAT or zones are off."""
    settings = snapshot.settings
    nat = settings.nat
    if nat is None or not settings.conntrack_zones:
        return NatZones()

    def zone_of(port: Port) -> tuple[str, int] | None:
        bridge = snapshot.bridges.get(port.device, "")
        zone = snapshot.zones.get(bridge)
        return (bridge, zone) if bridge and zone is not None else None

    fixed_range = ipaddress.IPv4Network(nat.fixed_range, strict=False)
    by_id = {p.id: p for p in local}
    floating, _ = _floating_targets(local, by_id)
    first, last, output = [], [], []
    for ip, port in floating.items():
        where = zone_of(port)
        if where:
            rule = IptablesRule(_zone(where[1]), dst=f"{ip}/32",
                                comment=f"floating IP {ip} in the zone of {where[0]}")
            first.append(rule)
            output.append(rule)
    if nat.routing_source_ip:
        first += _host_snat_zones(nat, str(fixed_range), local, zone_of,
                                  {p.id for p in floating.values()})
    for port in local:
        where = zone_of(port)
        if where:
            last += [IptablesRule(_zone(where[1]), dst=f"{ip}/32",
                                  comment=f"routed to port {port.id}")
                     for ip in port.ips(4) if ipaddress.IPv4Address(ip) in fixed_range]
    return NatZones(tuple(first), tuple(dict.fromkeys(last)), tuple(output))


def _host_snat_zones(nat: NatSettings, fixed_range: str, local: Sequence[Port],
                     zone_of: Callable[[Port], tuple[str, int] | None],
                     with_floating: set[str]) -> list[IptablesRule]:
    """Per bridge: the full zone where the source stays, then `--zone-orig`."""
    rules = []
    bridges: dict[tuple[str, int], list[Port]] = {}
    for port in local:
        where = zone_of(port)
        if where:
            bridges.setdefault(where, []).append(port)
    for (bridge, zone), members in sorted(bridges.items()):
        full = _zone(zone)
        rules += [
            IptablesRule(full, dst=f"{nat.routing_source_ip}/32", in_iface=bridge,
                         comment=f"zone for bridge {bridge} to the node"),
            IptablesRule(full, dst=METADATA_IP, in_iface=bridge,
                         comment=f"zone for bridge {bridge} to metadata"),
            IptablesRule(full, dst=fixed_range, in_iface=bridge,
                         comment=f"zone for bridge {bridge} in the fixed range"),
        ]
        rules += [IptablesRule(full, dst=_dst(_net(cidr)), in_iface=bridge,
                               comment=f"zone for bridge {bridge} to the DMZ")
                  for cidr in dict.fromkeys(nat.dmz_cidr)]
        rules += [IptablesRule(full, src=f"{ip}/32", in_iface=bridge,
                               comment=f"port {port.id} leaves by its floating IP")
                  for port in members if port.id in with_floating for ip in port.ips(4)[:1]]
        rules.append(IptablesRule(jump("CT", opt("--zone-orig", zone)), src=fixed_range,
                                  in_iface=bridge,
                                  comment=f"host SNAT from bridge {bridge} replies in zone 0"))
    return rules


def _zone(zone: int) -> Target:
    """`-j CT --zone <n>`: the conntrack zone of what the rule matches."""
    return jump("CT", opt("--zone", zone))


def _floating_targets(ports: Sequence[Port],
                      by_id: Mapping[str, Port]) -> tuple[dict[str, Port], list[str]]:
    """Each floating IP of `ports` and the port it maps to (see `_floating_fixed`)."""
    targets, errors = _floating_fixed(ports)
    return {ip: by_id[owner] for ip, (_, owner) in targets.items()}, errors


def _floating_fixed(ports: Sequence[Port]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Map each floating IP of `ports` to its port's first IPv4 fixed IP and id.

    A floating IP is one address on one node: the first port (in the given
    order) that claims it keeps it, and every other claim is an error, so a
    duplicate can never produce two competing DNAT rules.
    """
    targets: dict[str, tuple[str, str]] = {}   # floating -> (fixed, port id)
    errors: list[str] = []
    for port in ports:
        fixed = port.ips(4)
        if port.floating_ips and not fixed:
            errors.append(f"port {port.id!r}: floating IPs need an IPv4 fixed IP; ignored")
            continue
        for ip in port.floating_ips:
            if ipaddress.ip_address(ip).version != 4:
                errors.append(f"port {port.id!r}: floating IP {ip} is not IPv4 "
                              f"(NAT is IPv4 only); ignored")
            elif ip not in targets:
                targets[ip] = (fixed[0], port.id)
            elif targets[ip][1] != port.id:
                errors.append(f"port {port.id!r}: floating IP {ip} already belongs to port "
                              f"{targets[ip][1]!r}; ignored")
    return targets, errors


# ---------------------------------------------------------------- nat table

def _nat_table(nat: NatSettings, names: Names, floating: Mapping[str, str]) -> Table:
    b = TableBuilder(4, "nat")
    pre, out, post = (names.chain(c) for c in ("PREROUTING", "OUTPUT", "POSTROUTING"))
    bottom, snat, float_snat = (names.chain(c) for c in
                                ("postrouting-bottom", "snat", "float-snat"))
    # Given order = kernel order on a first apply: <p>-POSTROUTING before the bottom.
    for builtin, chain in (("PREROUTING", pre), ("OUTPUT", out), ("POSTROUTING", post),
                           ("POSTROUTING", bottom)):
        b.chain(chain)
        b.hook(builtin, chain)
    fixed_range = _net(nat.fixed_range)

    b.chain(pre).append(_metadata_forward(nat, fixed_range))
    # Exemptions first: a DNATed metadata request must keep its fixed source
    # even when the VM has a floating IP (the metadata service identifies the
    # instance by it).
    b.chain(post).extend(_snat_exemptions(nat, fixed_range))
    b.chain(bottom).append(IptablesRule(call(snat), comment="SNAT after every exemption"))
    b.chain(snat).append(IptablesRule(call(float_snat), comment="floating IPs first"))
    if nat.routing_source_ip:
        b.chain(snat).append(IptablesRule(
            jump("SNAT", opt("--to-source", nat.routing_source_ip)), src=fixed_range,
            out_iface=nat.public_interface or None, comment="host SNAT of the fixed range"))
    b.chain(float_snat)
    for ip, fixed in floating.items():
        fixed_host, to_float = f"{fixed}/32", jump("SNAT", opt("--to-source", ip))
        dnat = IptablesRule(jump("DNAT", opt("--to-destination", fixed)), dst=f"{ip}/32",
                            comment=f"floating IP {ip}")
        b.chain(pre).append(dnat)
        b.chain(out).append(dnat)
        # Replies to a VM's own floating IP and floating-to-floating flows show
        # the client's floating address, not its fixed one.
        b.chain(post).append(IptablesRule(to_float, src=fixed_host, matches=(ctstate("DNAT"),),
                                          comment=f"floating IP {ip} DNATed flows"))
        if nat.public_interface:
            b.chain(float_snat).extend([
                IptablesRule(to_float, src=fixed_host, dst=fixed_host,
                             comment=f"floating IP {ip} hairpin"),
                IptablesRule(to_float, src=fixed_host, out_iface=nat.public_interface,
                             comment=f"floating IP {ip} outbound"),
            ])
        else:
            b.chain(float_snat).append(IptablesRule(to_float, src=fixed_host,
                                                    comment=f"floating IP {ip} outbound"))
    return b.build()


def _metadata_forward(nat: NatSettings, fixed_range: str) -> IptablesRule:
    """169.254.169.254:80 to the metadata service.

    DNAT to a loopback address would be dropped as martian, so a loopback
    metadata host gets REDIRECT instead, which delivers to the address of the
    incoming interface: the service must listen there (or on 0.0.0.0).
    """
    if ipaddress.ip_address(nat.metadata_host).is_loopback:
        target = jump("REDIRECT", opt("--to-ports", nat.metadata_port))
    else:
        target = jump("DNAT", opt("--to-destination", f"{nat.metadata_host}:{nat.metadata_port}"))
    return IptablesRule(target, src=fixed_range, dst=METADATA_IP, proto="tcp",
                        matches=(ports("tcp", dport=METADATA_PORT),), comment="metadata")


def _snat_exemptions(nat: NatSettings, fixed_range: str) -> list[IptablesRule]:
    """Traffic that keeps its fixed source; ACCEPT in nat ends the SNAT walk."""
    rules = []
    if not ipaddress.ip_address(nat.metadata_host).is_loopback:  # local: never POSTROUTING
        rules.append(IptablesRule(jump("ACCEPT"), src=fixed_range,
                                  dst=f"{nat.metadata_host}/32",
                                  comment="metadata sees the fixed IP"))
    for cidr in dict.fromkeys(_net(c) for c in nat.dmz_cidr):
        rules.append(IptablesRule(jump("ACCEPT"), src=fixed_range, dst=_dst(cidr),
                                  comment="the DMZ sees the fixed IP"))
    rules.append(IptablesRule(jump("ACCEPT"), src=fixed_range, dst=fixed_range,
                              matches=(ctstate("DNAT", negated=True),),
                              comment="no SNAT inside the fixed range"))
    return rules


# ---------------------------------------------------------------- filter chains

def _filter_table(nat: NatSettings, names: Names, local: Sequence[Port]) -> Table:
    b = TableBuilder(4, "filter")
    top, local_chain = names.chain("filter-top"), names.chain("local")
    b.chain(top).append(IptablesRule(call(local_chain), comment="rules of this node"))
    for builtin in ("FORWARD", "OUTPUT"):
        b.hook(builtin, top)
    b.chain(local_chain).extend(_routed_to_vms(names, local))
    from_vms = names.chain("network-FORWARD")
    b.hook("FORWARD", from_vms)
    b.chain(from_vms).append(IptablesRule(
        call(names.chain("from")),
        matches=(physdev(in_dev=names.device_wildcard, bridged=False),),
        comment="routed from a VM its egress rules"))

    services, accept = names.chain("network-INPUT"), names.chain("network-accept")
    b.hook("INPUT", services)
    b.chain(accept).extend([
        IptablesRule(call(names.chain("INPUT")), comment="the checks of the sender first"),
        IptablesRule(jump("ACCEPT"), comment="a service of this node"),
    ])
    fixed_range = _net(nat.fixed_range)
    if ipaddress.ip_address(nat.metadata_host).is_loopback:
        metadata = IptablesRule(call(accept), src=fixed_range, proto="tcp",
                                matches=(ports("tcp", dport=nat.metadata_port),
                                         match("addrtype", opt("--dst-type", "LOCAL"))),
                                comment="metadata from the fixed range")
    else:
        metadata = IptablesRule(call(accept), src=fixed_range,
                                dst=f"{nat.metadata_host}/32", proto="tcp",
                                matches=(ports("tcp", dport=nat.metadata_port),),
                                comment="metadata from the fixed range")
    b.chain(services).append(metadata)
    for bridge in dict.fromkeys(nat.dhcp_bridges):
        b.chain(services).extend(
            IptablesRule(call(accept), in_iface=bridge, proto=proto,
                         matches=(ports(proto, dport=port),), comment=f"{what} on {bridge}")
            for proto, port, what in BRIDGE_SERVICES)
    return b.build()


def _routed_to_vms(names: Names, local: Sequence[Port]) -> list[IptablesRule]:
    """Send routed traffic to a VM through the port chain bridged traffic gets.

    `--physdev-out` is unknown for a routed packet, so the VM is found by its
    fixed IPv4 address (a linear list, crossed only by routed traffic and the
    node's own: bridged packets leave at the first rule). Ports without port
    security have no chains and stay open, as they are when bridged.
    """
    rules = [IptablesRule(jump("RETURN"), matches=(physdev(bridged=True),),
                          comment=f"bridged traffic is checked in {names.chain('FORWARD')}")]
    for port in local:
        if port.port_security_enabled:
            rules += [IptablesRule(call(names.port_chain("i", port.device)), dst=f"{ip}/32",
                                   comment=f"routed to port {port.id}")
                      for ip in port.ips(4)]
    return rules


def _net(cidr: str) -> str:
    """The canonical network iptables-save prints (host bits cleared, /32 on hosts)."""
    return str(ipaddress.IPv4Network(cidr, strict=False))


def _dst(cidr: str) -> str | None:
    """iptables-save omits a match on 0.0.0.0/0, so the rule must omit it too."""
    return None if cidr.endswith("/0") else cidr
