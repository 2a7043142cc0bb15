"""Ingress rules, judged with real packets from peer VMs to VM `a`.

Mirrors `neutron/tests/functional/agent/test_firewall.py::FirewallTestCase`
(ingress tcp/udp/icmp, next port closed, port ranges) and its IPv6 class,
which Neutron skips since the eventlet removal: every test here runs for
IPv4 and IPv6. Probes that must fail use short timeouts (`FAIL`).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.helpers import (
    FAIL,
    FAMILIES,
    PASS,
    IcmpSniffer,
    Sandbox,
    echo_type,
    icmp_name,
    icmp_send,
    ingress,
    passing,
)
from tests.support.topology import ping, tcp_connect, udp_probe

pytestmark = pytest.mark.kernel
# ICMP types no rule of these tests allows: timestamp request, and an ICMPv6
# type from the private experimentation range the kernel ignores.
OTHER_ICMP = {4: 13, 6: 200}


def probe(sb: Sandbox, kind: str, dst: str, port: int = 80, timeout: float = PASS) -> bool:
    """One probe from b to `dst` of kind tcp, udp or icmp."""
    if kind == "tcp":
        return tcp_connect(sb.b, dst, port, timeout)
    if kind == "udp":
        return udp_probe(sb.b, dst, port, timeout)
    return ping(sb.b, dst, timeout)


@pytest.mark.parametrize("family", FAMILIES)
def test_ingress_tcp_rule(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_ingress_tcp_rule (+ the skipped IPv6 class).

    Nothing enters before the rule; after it, tcp/80 does and udp/80, ICMP
    and the other family's tcp/80 still do not: a rule opens only its own
    protocol, port and ethertype.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy())
    assert not tcp_connect(sb.b, dst, 80, FAIL)
    sb.apply(sb.policy({"sg-a": [ingress(family, "tcp", 80)]}))
    assert tcp_connect(sb.b, dst, 80, PASS)
    assert passing(
        udp=lambda: udp_probe(sb.b, dst, 80, FAIL),
        icmp=lambda: ping(sb.b, dst, FAIL),
        other_family=lambda: tcp_connect(sb.b, sb.a.ip_for(10 - family), 80, FAIL)) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_ingress_udp_rule(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_ingress_udp_rule: only udp/80 in; the reply
    (the echo) comes back through conntrack although `a` has no egress rule.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy())
    assert not udp_probe(sb.b, dst, 80, FAIL)
    sb.apply(sb.policy({"sg-a": [ingress(family, "udp", 80)]}))
    assert udp_probe(sb.b, dst, 80, PASS)
    assert passing(tcp=lambda: tcp_connect(sb.b, dst, 80, FAIL),
                   udp53=lambda: udp_probe(sb.b, dst, 53, FAIL)) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_ingress_icmp_rule(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_ingress_icmp_secgroup: no ping before the
    rule, ping after it; tcp stays closed.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy())
    assert not ping(sb.b, dst, FAIL)
    sb.apply(sb.policy({"sg-a": [ingress(family, icmp_name(family))]}))
    assert ping(sb.b, dst, PASS)
    assert not tcp_connect(sb.b, dst, 80, FAIL)


@pytest.mark.parametrize("family", FAMILIES)
def test_icmp_type_and_code_rule(sb: Sandbox, family: int) -> None:
    """An ICMP rule with a type (and code) admits that type only.

    Mirrors Neutron's unit tests test_filter_ipv4/6_ingress_icmp_type(_code)
    (`--icmp-type 8/0` and friends) with packets: echo-request passes, another
    type does not reach the VM (a raw-socket sniffer in `a` is the judge), the
    same echo with a wrong code is refused, and an any-ICMP rule lets the other
    type through (which shows the sniffer would have seen it).
    """
    a, b = sb.a, sb.b
    dst, src = a.ip_for(family), b.ip_for(family)
    other = OTHER_ICMP[family]
    with IcmpSniffer(a) as sniffer:
        sb.apply(sb.policy({"sg-a": [ingress(family, icmp_name(family), echo_type(family))]}))
        assert ping(b, dst, PASS)
        icmp_send(b, dst, other)
        assert not sniffer.seen(src, other, timeout=FAIL)

        sb.apply(sb.policy({"sg-a": [ingress(family, icmp_name(family), echo_type(family), 0)]}))
        assert ping(b, dst, PASS)
        sb.apply(sb.policy({"sg-a": [ingress(family, icmp_name(family), echo_type(family), 1)]}))
        assert not ping(b, dst, FAIL)

        sb.apply(sb.policy({"sg-a": [ingress(family, icmp_name(family))]}))
        icmp_send(b, dst, other)
        assert sniffer.seen(src, other, timeout=PASS)


@pytest.mark.parametrize("family", FAMILIES)
def test_next_port_closed(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_next_port_closed (LP#1611991, a masking
    bug): port 42 allowed, the next port 43 closed.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [ingress(family, "tcp", 42)]}))
    assert tcp_connect(sb.b, dst, 42, PASS)
    assert not tcp_connect(sb.b, dst, 43, FAIL)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_port_range_edges(sb: Sandbox, family: int, proto: str) -> None:
    """Mirrors FirewallTestCase.test_connection_with_destination_port_range:
    min and max pass, min-1 and max+1 do not.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [ingress(family, proto, 1000, 2000)]}))
    assert passing(
        min=lambda: probe(sb, proto, dst, 1000),
        max=lambda: probe(sb, proto, dst, 2000),
        min_minus_1=lambda: probe(sb, proto, dst, 999, FAIL),
        max_plus_1=lambda: probe(sb, proto, dst, 2001, FAIL)) == ["min", "max"]


@pytest.mark.parametrize("family", FAMILIES)
def test_port_range_from_zero(sb: Sandbox, family: int) -> None:
    """Mirrors the unit tests test_filter_ingress_tcp_min_port_0_for_ipv4/6:
    `port_range_min: 0` is a real range (0:100), not "any port".
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [ingress(family, "tcp", 0, 100)]}))
    assert passing(
        p22=lambda: tcp_connect(sb.b, dst, 22, PASS),
        p100=lambda: tcp_connect(sb.b, dst, 100, PASS),
        p101=lambda: tcp_connect(sb.b, dst, 101, FAIL)) == ["p22", "p100"]


SPELLINGS = [
    pytest.param(4, "tcp", "tcp", id="v4-tcp-name"),
    pytest.param(4, "tcp", 6, id="v4-tcp-number"),
    pytest.param(4, "tcp", "6", id="v4-tcp-number-string"),
    pytest.param(4, "udp", "udp", id="v4-udp-name"),
    pytest.param(4, "udp", 17, id="v4-udp-number"),
    pytest.param(4, "icmp", "icmp", id="v4-icmp-name"),
    pytest.param(4, "icmp", 1, id="v4-icmp-number"),
    pytest.param(6, "tcp", "tcp", id="v6-tcp-name"),
    pytest.param(6, "tcp", 6, id="v6-tcp-number"),
    pytest.param(6, "udp", 17, id="v6-udp-number"),
    pytest.param(6, "icmp", "ipv6-icmp", id="v6-ipv6-icmp"),
    pytest.param(6, "icmp", "icmpv6", id="v6-icmpv6"),
    pytest.param(6, "icmp", "icmp", id="v6-icmp-rewritten"),
    pytest.param(6, "icmp", 58, id="v6-icmp-number"),
]


@pytest.mark.parametrize(("family", "kind", "spelling"), SPELLINGS)
def test_protocol_by_name_and_number(sb: Sandbox, family: int, kind: str,
                                     spelling: Any) -> None:
    """A protocol given by name or number opens exactly that protocol.

    Mirrors Neutron's unit tests of protocol translation (numbers to the names
    iptables-save prints, `icmp` on an IPv6 rule rewritten to ipv6-icmp), here
    with packets. A port-less tcp/udp rule opens every port of it.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [ingress(family, spelling)]}))
    other = "udp" if kind == "tcp" else "tcp"
    assert passing(
        own=lambda: probe(sb, kind, dst, 80),
        own_other_port=lambda: probe(sb, kind, dst, 5000),
        other=lambda: probe(sb, other, dst, 80, FAIL)) == ["own", "own_other_port"]


ANY = [pytest.param({}, id="absent"), pytest.param({"protocol": None}, id="null"),
       pytest.param({"protocol": "0"}, id="zero")]


@pytest.mark.parametrize("spelling", ANY)
@pytest.mark.parametrize("family", FAMILIES)
def test_protocol_any(sb: Sandbox, family: int, spelling: dict[str, Any]) -> None:
    """Mirrors the unit tests test_filter_ipv4_ingress_protocol_zero/_blank:
    a rule without a protocol (absent, null or `"0"`, CONTRACT 4) admits tcp,
    udp and ICMP alike, but only of its own ethertype.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [{**ingress(family), **spelling}]}))
    assert passing(
        tcp=lambda: probe(sb, "tcp", dst, 80),
        udp=lambda: probe(sb, "udp", dst, 5000),
        icmp=lambda: probe(sb, "icmp", dst),
        other_family=lambda: tcp_connect(sb.b, sb.a.ip_for(10 - family), 80, FAIL),
    ) == ["tcp", "udp", "icmp"]


PREFIXES = {
    "bare": {4: "10.0.0.20", 6: "fd00::20"},
    "cidr": {4: "10.0.0.20/30", 6: "fd00::20/126"},
    "cidr-host-bits": {4: "10.0.0.21/30", 6: "fd00::21/126"},
}


@pytest.mark.parametrize(("form", "key"), [
    pytest.param("bare", "remote_ip_prefix", id="bare"),
    pytest.param("cidr", "remote_ip_prefix", id="cidr"),
    pytest.param("cidr-host-bits", "source_ip_prefix", id="cidr-host-bits-source_ip_prefix"),
])
@pytest.mark.parametrize("family", FAMILIES)
def test_remote_ip_prefix(sb: Sandbox, family: int, form: str, key: str) -> None:
    """Mirrors the IPv6 class's "tcp from a specific address" and the unit
    tests test_filter_ipv4/6_ingress_prefix: a bare address is a host prefix,
    a CIDR (host bits cleared, as Neutron's normalized_cidr) covers `b` but
    not `c`; `source_ip_prefix` is the ingress alias of the contract.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [ingress(family, "tcp", 80, **{key: PREFIXES[form][family]})]}))
    assert passing(b=lambda: tcp_connect(sb.b, dst, 80, PASS),
                   c=lambda: tcp_connect(sb.c, dst, 80, FAIL)) == ["b"]
