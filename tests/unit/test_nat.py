"""The NAT compiler (agent/compiler/nat.py) on plain data: no kernel needed.

Golden texts are written out in full on purpose: they are what iptables-save
prints (checked against the kernel by tests/e2e/test_nat.py), so a change in
rendering shows up here as a readable diff.
"""

from __future__ import annotations

from dataclasses import replace

from oslo_config import cfg

from agent import config
from agent.compiler import NatSettings, Settings, Snapshot, compile_ruleset
from agent.compiler.flows import floating_ip_cuts
from agent.compiler.nat import compile_nat
from agent.dataplane.flowcut import describe
from agent.model import Policy, Port, parse_policy
from agent.vocab.names import MAX_CHAIN, Names
from agent.vocab.rule_text import parse_rule_text

NAT = NatSettings(fixed_range="10.0.0.0/24", routing_source_ip="203.0.113.1",
                  public_interface="pub0", dmz_cidr=("192.0.2.0/24",),
                  metadata_host="127.0.0.1", metadata_port=8775, dhcp_bridges=("br0",))
FLOAT_A = "198.51.100.10"


def vm_port(name: str, ip: str, *floating: str, **extra) -> Port:
    return Port(id=f"port-{name}", device=f"tap{name}", mac_address="fa:16:3e:00:00:01",
                fixed_ips=(ip,), floating_ips=floating, **extra)


def snapshot(*ports: Port, nat: NatSettings | None = NAT, devices=None,
             names: Names | None = None) -> Snapshot:
    local = frozenset(p.device for p in ports) if devices is None else frozenset(devices)
    return Snapshot(Policy(ports=ports), local, Settings(names=names or Names(), nat=nat))


def chain_text(rs, table: str, chain: str) -> list[str]:
    """The chain as `-A chain rule` lines, with the comments left out."""
    rules = rs.tables[(4, table)].chains[chain]
    return [f"-A {chain} " + replace(r, comment="").text for r in rules]


def hooks(rs, table: str) -> list[tuple[str, str]]:
    return [(h.chain, h.spec) for h in rs.tables[(4, table)].hooks]


# ---------------------------------------------------------------- floating IPs

def test_floating_ip_golden_rules() -> None:
    result = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A),
                                  vm_port("b", "10.0.0.6")))
    rs = result.ruleset
    assert result.floating_ips == {FLOAT_A: "10.0.0.5"}
    assert result.errors == ()
    assert hooks(rs, "nat") == [
        ("PREROUTING", "-j hostfw-PREROUTING"), ("OUTPUT", "-j hostfw-OUTPUT"),
        ("POSTROUTING", "-j hostfw-POSTROUTING"),
        ("POSTROUTING", "-j hostfw-postrouting-bottom")]
    assert chain_text(rs, "nat", "hostfw-PREROUTING") == [
        "-A hostfw-PREROUTING -s 10.0.0.0/24 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 "
        "-j REDIRECT --to-ports 8775",
        "-A hostfw-PREROUTING -d 198.51.100.10/32 -j DNAT --to-destination 10.0.0.5",
    ]
    assert chain_text(rs, "nat", "hostfw-OUTPUT") == [
        "-A hostfw-OUTPUT -d 198.51.100.10/32 -j DNAT --to-destination 10.0.0.5"]
    assert chain_text(rs, "nat", "hostfw-POSTROUTING") == [
        "-A hostfw-POSTROUTING -s 10.0.0.0/24 -d 192.0.2.0/24 -j ACCEPT",
        "-A hostfw-POSTROUTING -s 10.0.0.0/24 -d 10.0.0.0/24 -m conntrack ! --ctstate DNAT "
        "-j ACCEPT",
        "-A hostfw-POSTROUTING -s 10.0.0.5/32 -m conntrack --ctstate DNAT "
        "-j SNAT --to-source 198.51.100.10",
    ]
    assert chain_text(rs, "nat", "hostfw-postrouting-bottom") == [
        "-A hostfw-postrouting-bottom -j hostfw-snat"]
    assert chain_text(rs, "nat", "hostfw-snat") == [
        "-A hostfw-snat -j hostfw-float-snat",
        "-A hostfw-snat -s 10.0.0.0/24 -o pub0 -j SNAT --to-source 203.0.113.1",
    ]
    assert chain_text(rs, "nat", "hostfw-float-snat") == [
        "-A hostfw-float-snat -s 10.0.0.5/32 -d 10.0.0.5/32 -j SNAT --to-source 198.51.100.10",
        "-A hostfw-float-snat -s 10.0.0.5/32 -o pub0 -j SNAT --to-source 198.51.100.10",
    ]


def test_every_rule_says_why_in_a_comment_iptables_save_prints_back() -> None:
    """`iptables -t nat -S` is read by operators who know nova-network: each
    rule names its purpose, quoted the way iptables-save quotes it."""
    rs = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A))).ruleset
    for table in rs.tables.values():
        for rules in table.chains.values():
            for rule in rules:
                assert rule.comment, rule
                assert parse_rule_text(rule.text).comment == rule.comment, rule


def test_same_floating_ip_twice_on_a_port_gives_one_rule_set() -> None:
    once = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A)))
    twice = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A, FLOAT_A)))
    assert twice.ruleset == once.ruleset
    assert twice.errors == ()


def test_policy_file_dedups_floating_ips() -> None:
    raw = {"ports": [{"id": "p1", "device": "tapa", "mac_address": "fa:16:3e:00:00:01",
                      "fixed_ips": ["10.0.0.5"], "floating_ips": [FLOAT_A, FLOAT_A]}]}
    policy = parse_policy(raw)
    assert policy.ports[0].floating_ips == (FLOAT_A,)


def test_floating_ip_claimed_by_two_ports_goes_to_the_first_only() -> None:
    result = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A),
                                  vm_port("b", "10.0.0.6", FLOAT_A)))
    assert result.floating_ips == {FLOAT_A: "10.0.0.5"}
    assert result.errors == (
        f"port 'port-b': floating IP {FLOAT_A} already belongs to port 'port-a'; ignored",)
    dnat = [r for r in result.ruleset.tables[(4, "nat")].chains["hostfw-PREROUTING"]
            if r.target.name == "DNAT" and r.dst == f"{FLOAT_A}/32"]
    assert len(dnat) == 1


def test_floating_ip_maps_to_the_first_ipv4_fixed_ip() -> None:
    port = replace(vm_port("a", "10.0.0.5", FLOAT_A), fixed_ips=("fd00::5", "10.0.0.5",
                                                                  "10.0.0.7"))
    assert compile_nat(snapshot(port)).floating_ips == {FLOAT_A: "10.0.0.5"}


def test_floating_ips_without_ipv4_or_of_ipv6_are_reported_and_ignored() -> None:
    v6only = replace(vm_port("a", "10.0.0.5", FLOAT_A), fixed_ips=("fd00::5",))
    v6float = vm_port("b", "10.0.0.6", "2001:db8::1")
    result = compile_nat(snapshot(v6only, v6float))
    assert result.floating_ips == {}
    assert result.errors == (
        "port 'port-a': floating IPs need an IPv4 fixed IP; ignored",
        "port 'port-b': floating IP 2001:db8::1 is not IPv4 (NAT is IPv4 only); ignored")


def test_floating_ips_of_ports_on_other_nodes_are_not_ours() -> None:
    result = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A), devices=()))
    assert result.floating_ips == {}
    assert not any(FLOAT_A in r.text for t in result.ruleset.tables.values()
                   for rules in t.chains.values() for r in rules)


def test_without_public_interface_one_snat_per_floating_ip_and_host_snat_anywhere() -> None:
    nat = replace(NAT, public_interface="")
    rs = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A), nat=nat)).ruleset
    assert chain_text(rs, "nat", "hostfw-float-snat") == [
        "-A hostfw-float-snat -s 10.0.0.5/32 -j SNAT --to-source 198.51.100.10"]
    assert chain_text(rs, "nat", "hostfw-snat")[1] == \
        "-A hostfw-snat -s 10.0.0.0/24 -j SNAT --to-source 203.0.113.1"


def test_no_routing_source_ip_means_no_host_snat() -> None:
    rs = compile_nat(snapshot(nat=replace(NAT, routing_source_ip=""))).ruleset
    assert chain_text(rs, "nat", "hostfw-snat") == ["-A hostfw-snat -j hostfw-float-snat"]


# ---------------------------------------------------------------- metadata

def test_metadata_on_loopback_is_redirected_and_accepted_on_any_local_address() -> None:
    rs = compile_nat(snapshot()).ruleset
    assert chain_text(rs, "nat", "hostfw-PREROUTING") == [
        "-A hostfw-PREROUTING -s 10.0.0.0/24 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 "
        "-j REDIRECT --to-ports 8775"]
    assert chain_text(rs, "filter", "hostfw-network-INPUT")[0] == (
        "-A hostfw-network-INPUT -s 10.0.0.0/24 -p tcp -m tcp --dport 8775 "
        "-m addrtype --dst-type LOCAL -j hostfw-network-accept")


def test_metadata_elsewhere_is_dnatted_accepted_and_exempt_from_snat() -> None:
    nat = replace(NAT, metadata_host="10.0.0.1", metadata_port=9697)
    rs = compile_nat(snapshot(vm_port("a", "10.0.0.5", FLOAT_A), nat=nat)).ruleset
    assert chain_text(rs, "nat", "hostfw-PREROUTING")[0] == (
        "-A hostfw-PREROUTING -s 10.0.0.0/24 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 "
        "-j DNAT --to-destination 10.0.0.1:9697")
    assert chain_text(rs, "filter", "hostfw-network-INPUT")[0] == (
        "-A hostfw-network-INPUT -s 10.0.0.0/24 -d 10.0.0.1/32 -p tcp -m tcp --dport 9697 "
        "-j hostfw-network-accept")
    post = chain_text(rs, "nat", "hostfw-POSTROUTING")
    # The exemption comes before the floating IP's SNAT of DNATed flows, or a
    # VM with a floating IP would reach the metadata service from it.
    assert post[0] == "-A hostfw-POSTROUTING -s 10.0.0.0/24 -d 10.0.0.1/32 -j ACCEPT"
    assert "--ctstate DNAT -j SNAT" in post[-1]


# ---------------------------------------------------------------- SNAT exemptions

def test_snat_exemptions_in_order_and_deduplicated() -> None:
    nat = replace(NAT, metadata_host="10.0.0.1",
                  dmz_cidr=("192.0.2.0/24", "192.0.2.7/24", "172.16.0.1"))
    rs = compile_nat(snapshot(nat=nat)).ruleset
    assert chain_text(rs, "nat", "hostfw-POSTROUTING") == [
        "-A hostfw-POSTROUTING -s 10.0.0.0/24 -d 10.0.0.1/32 -j ACCEPT",
        "-A hostfw-POSTROUTING -s 10.0.0.0/24 -d 192.0.2.0/24 -j ACCEPT",
        "-A hostfw-POSTROUTING -s 10.0.0.0/24 -d 172.16.0.1/32 -j ACCEPT",
        "-A hostfw-POSTROUTING -s 10.0.0.0/24 -d 10.0.0.0/24 -m conntrack ! --ctstate DNAT "
        "-j ACCEPT",
    ]


def test_fixed_range_is_written_as_iptables_save_prints_it() -> None:
    rs = compile_nat(snapshot(nat=replace(NAT, fixed_range="10.0.0.77/24",
                                          dmz_cidr=("0.0.0.0/0",)))).ruleset
    post = chain_text(rs, "nat", "hostfw-POSTROUTING")
    assert post[0] == "-A hostfw-POSTROUTING -s 10.0.0.0/24 -j ACCEPT"   # no "-d 0.0.0.0/0"
    assert "-s 10.0.0.0/24 -d 10.0.0.0/24" in post[1]


# ---------------------------------------------------------------- filter chains

def test_filter_top_and_services_come_first_in_the_builtins() -> None:
    rs = compile_ruleset(snapshot(vm_port("a", "10.0.0.5", FLOAT_A))).ruleset
    order: dict[str, list[str]] = {}
    for hook in rs.tables[(4, "filter")].hooks:
        order.setdefault(hook.chain, []).append(hook.target)
    assert order["FORWARD"][0] == "hostfw-filter-top"
    assert order["OUTPUT"][0] == "hostfw-filter-top"
    assert order["INPUT"] == ["hostfw-network-INPUT", "hostfw-INPUT"]
    assert chain_text(rs, "filter", "hostfw-filter-top") == [
        "-A hostfw-filter-top -j hostfw-local"]


def test_routed_traffic_goes_through_the_port_chains() -> None:
    open_port = replace(vm_port("c", "10.0.0.7"), port_security_enabled=False)
    rs = compile_ruleset(snapshot(vm_port("a", "10.0.0.5", FLOAT_A), vm_port("b", "10.0.0.6"),
                                  open_port, vm_port("far", "10.0.0.8"),
                                  devices={"tapa", "tapb", "tapc"})).ruleset
    assert chain_text(rs, "filter", "hostfw-local") == [
        "-A hostfw-local -m physdev --physdev-is-bridged -j RETURN",
        "-A hostfw-local -d 10.0.0.5/32 -j hostfw-ia",
        "-A hostfw-local -d 10.0.0.6/32 -j hostfw-ib",
    ]
    assert chain_text(rs, "filter", "hostfw-network-FORWARD") == [
        "-A hostfw-network-FORWARD -m physdev --physdev-in tap+ ! --physdev-is-bridged "
        "-j hostfw-from"]


def test_dhcp_and_dns_accepted_on_each_bridge_after_the_sender_checks() -> None:
    rs = compile_nat(snapshot(nat=replace(NAT, dhcp_bridges=("br0", "br1", "br0")))).ruleset
    services = chain_text(rs, "filter", "hostfw-network-INPUT")[1:]
    assert services == [
        f"-A hostfw-network-INPUT -i {br} -p {proto} -m {proto} --dport {port} "
        f"-j hostfw-network-accept"
        for br in ("br0", "br1") for proto, port in
        (("udp", 67), ("tcp", 67), ("udp", 53), ("tcp", 53))]
    assert chain_text(rs, "filter", "hostfw-network-accept") == [
        "-A hostfw-network-accept -j hostfw-INPUT", "-A hostfw-network-accept -j ACCEPT"]


# ---------------------------------------------------------------- on/off, names, merge

def test_nat_off_when_not_configured() -> None:
    snap = snapshot(vm_port("a", "10.0.0.5", FLOAT_A), nat=None)
    result = compile_nat(snap)
    assert result.ruleset.tables == {} and result.floating_ips == {}
    compiled = compile_ruleset(snap)
    assert (4, "nat") not in compiled.ruleset.tables
    assert compiled.floating_ips == {}
    assert compiled.ruleset == compile_ruleset(replace(snap, settings=Settings())).ruleset


def test_longest_prefix_keeps_every_name_within_the_kernel_limit() -> None:
    names = Names(chain_prefix="abcdefghijkl")   # the longest [firewall] chain_prefix allowed
    rs = compile_ruleset(snapshot(vm_port("a", "10.0.0.5", FLOAT_A), names=names)).ruleset
    for table in rs.tables.values():
        for chain in table.chains:
            assert len(chain) <= MAX_CHAIN, chain
            assert chain.startswith("abcdefghijkl-")
        assert all(len(h.target) <= MAX_CHAIN for h in table.hooks)


def test_every_jump_lands_on_a_chain_of_the_same_table() -> None:
    rs = compile_ruleset(snapshot(vm_port("a", "10.0.0.5", FLOAT_A),
                                  vm_port("b", "10.0.0.6"))).ruleset
    for (family, name), table in rs.tables.items():
        targets = {r.jump for rules in table.chains.values() for r in rules}
        targets |= {h.target for h in table.hooks}
        owned = {t for t in targets if t and t.startswith("hostfw-")}
        assert owned <= set(table.chains), (family, name, owned - set(table.chains))


def test_nat_errors_reach_the_compiled_result() -> None:
    compiled = compile_ruleset(snapshot(vm_port("a", "10.0.0.5", "2001:db8::1")))
    assert any("not IPv4" in e for e in compiled.errors)


# ---------------------------------------------------------------- config

def _conf(zones: bool = False, **nat: object) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    conf([])
    conf.set_override("conntrack_zones", zones, "firewall")
    for key, value in nat.items():
        conf.set_override(key, value, "nat")
    return conf


def test_nat_options_default_to_off() -> None:
    conf = _conf()
    assert conf.nat.fixed_range == ""
    assert (conf.nat.metadata_host, conf.nat.metadata_port) == ("127.0.0.1", 8775)
    assert config.validate(conf) == []
    assert "nat" in dict(config.list_opts())


def test_nat_works_with_per_bridge_conntrack_zones() -> None:
    """Issue 15.4: `[nat]` with the default `conntrack_zones = true` starts."""
    for zones in (True, False):
        assert config.validate(_conf(zones=zones, fixed_range="10.0.0.0/24",
                                     routing_source_ip="203.0.113.1")) == []


# ---------------------------------------------------------------- conntrack zones

def zoned(*ports: Port, nat: NatSettings | None = NAT,
          bridges: dict[str, str] | None = None) -> list[str]:
    """The raw table (v4) as `-A` lines, chain by chain: PREROUTING, OUTPUT, then the
    bridges' zone trees; each port on br0 (or `bridges`)."""
    bridges = bridges or {p.device: "br0" for p in ports}
    zones = {b: 4097 + i for i, b in enumerate(sorted(set(bridges.values())))}
    snap = Snapshot(Policy(ports=ports), frozenset(p.device for p in ports),
                    Settings(nat=nat), bridges, zones)
    rs = compile_ruleset(snap).ruleset
    return [line for chain in rs.tables[(4, "raw")].chains
            for line in chain_text(rs, "raw", chain)]


def test_nat_zone_rules_golden() -> None:
    """Floating IPs first (from anywhere and from the node), the full zone where
    the fixed source stays, --zone-orig for host SNAT, then the bridges' zone
    tree, then arrivals routed in to fixed IPs (the first CT rule met wins)."""
    assert zoned(vm_port("a", "10.0.0.5", FLOAT_A), vm_port("b", "10.0.0.6")) == [
        f"-A hostfw-PREROUTING -d {FLOAT_A}/32 -j CT --zone 4097",
        "-A hostfw-PREROUTING -d 203.0.113.1/32 -i br0 -j CT --zone 4097",
        "-A hostfw-PREROUTING -d 169.254.169.254/32 -i br0 -j CT --zone 4097",
        "-A hostfw-PREROUTING -d 10.0.0.0/24 -i br0 -j CT --zone 4097",
        "-A hostfw-PREROUTING -d 192.0.2.0/24 -i br0 -j CT --zone 4097",
        "-A hostfw-PREROUTING -s 10.0.0.5/32 -i br0 -j CT --zone 4097",
        "-A hostfw-PREROUTING -s 10.0.0.0/24 -i br0 -j CT --zone-orig 4097",
        "-A hostfw-PREROUTING -j hostfw-zone-in",
        "-A hostfw-PREROUTING -d 10.0.0.5/32 -j CT --zone 4097",
        "-A hostfw-PREROUTING -d 10.0.0.6/32 -j CT --zone 4097",
        f"-A hostfw-OUTPUT -d {FLOAT_A}/32 -j CT --zone 4097",
        "-A hostfw-OUTPUT -j hostfw-zone-out",
        "-A hostfw-zone-in -i br0 -j CT --zone 4097",
        "-A hostfw-zone-in -j RETURN",
        "-A hostfw-zone-out -o br0 -j CT --zone 4097",
        "-A hostfw-zone-out -j RETURN",
    ]


def test_without_host_snat_no_zone_orig_and_each_float_in_its_bridges_zone() -> None:
    rules = zoned(vm_port("a", "10.0.0.5", FLOAT_A), vm_port("b", "10.0.0.6", "198.51.100.11"),
                  nat=replace(NAT, routing_source_ip=""),
                  bridges={"tapa": "br0", "tapb": "br1"})
    assert not any("zone-orig" in r for r in rules)
    assert f"-A hostfw-PREROUTING -d {FLOAT_A}/32 -j CT --zone 4097" in rules
    assert "-A hostfw-OUTPUT -d 198.51.100.11/32 -j CT --zone 4098" in rules
    assert "-A hostfw-zone-in -i br1 -j CT --zone 4098" in rules
    assert rules.index("-A hostfw-PREROUTING -d 10.0.0.6/32 -j CT --zone 4098") > \
        rules.index("-A hostfw-PREROUTING -j hostfw-zone-in")


def test_no_nat_zone_rules_when_zones_or_nat_are_off() -> None:
    ports = (vm_port("a", "10.0.0.5", FLOAT_A),)
    assert zoned(*ports, nat=None) == [
        "-A hostfw-PREROUTING -j hostfw-zone-in", "-A hostfw-OUTPUT -j hostfw-zone-out",
        "-A hostfw-zone-in -i br0 -j CT --zone 4097", "-A hostfw-zone-in -j RETURN",
        "-A hostfw-zone-out -o br0 -j CT --zone 4097", "-A hostfw-zone-out -j RETURN"]
    snap = replace(snapshot(*ports), bridges={"tapa": "br0"}, zones={"br0": 4097})
    snap = replace(snap, settings=replace(snap.settings, conntrack_zones=False))
    assert compile_ruleset(snap).ruleset.tables[(4, "raw")].chains["hostfw-PREROUTING"] == ()


def test_a_port_off_any_bridge_gets_no_nat_zone_rule() -> None:
    assert zoned(vm_port("a", "10.0.0.5", FLOAT_A), bridges={"tapa": ""}) == []


# ---------------------------------------------------------------- conntrack

def test_removed_or_moved_floating_ips_cut_their_flows_both_ways() -> None:
    old = {FLOAT_A: "10.0.0.5", "198.51.100.9": "10.0.0.6", "198.51.100.8": "10.0.0.7"}
    new = {"198.51.100.9": "10.0.0.6", "198.51.100.8": "10.0.0.99"}   # A gone, .8 moved
    cuts = floating_ip_cuts(old, new)
    assert sorted(describe(c) for c in cuts) == sorted([
        "-f ipv4 -d 198.51.100.8",
        "-f ipv4 --reply-dst 198.51.100.8",
        f"-f ipv4 -d {FLOAT_A}",
        f"-f ipv4 --reply-dst {FLOAT_A}",
    ])
    assert floating_ip_cuts(new, new) == []
