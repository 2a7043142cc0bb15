"""Egress rules, judged with connections VM `a` opens to peers that admit everything.

Mirrors FirewallTestCase.test_egress_tcp_rule / test_egress_udp_rule, the
IPv6 class's "to a specific address" tests, and Neutron's default: a group
without egress rules lets the VM open nothing. The peers' ingress is wide
open here, so only `a`'s egress chain can be what blocks.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.helpers import (
    EGRESS_ALL,
    FAIL,
    FAMILIES,
    PASS,
    Sandbox,
    egress,
    icmp_name,
    ingress,
    passing,
)
from tests.support.topology import ping, tcp_connect, udp_probe

pytestmark = pytest.mark.kernel

# Neutron's IPv6 egress chain returns every ICMPv6 message once its source
# passed the spoof check (research 1.4, egress rule 4: `-p ipv6-icmp -j RETURN`),
# so a VM without egress rules can still ping out over IPv6.
ICMPV6_EGRESS_ALWAYS = {4: False, 6: True}


def ping_out(sb: Sandbox, dst: str, family: int) -> bool:
    """True when a's ping to `dst` behaves as Neutron's egress chain says it
    must without an ICMP egress rule: dropped on IPv4, passed on IPv6.
    """
    if ICMPV6_EGRESS_ALWAYS[family]:
        return ping(sb.a, dst, PASS)
    return not ping(sb.a, dst, FAIL)


def open_peers(family: int) -> dict[str, list[dict[str, Any]]]:
    """sg-b and sg-c admit tcp, udp and ICMP of `family` from anywhere."""
    wide = [*EGRESS_ALL, ingress(family, "tcp"), ingress(family, "udp"),
            ingress(family, icmp_name(family))]
    return {"sg-b": wide, "sg-c": list(wide)}


@pytest.mark.parametrize("family", FAMILIES)
def test_egress_tcp_rule(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_egress_tcp_rule: only tcp/80 out."""
    dst = sb.b.ip_for(family)
    sb.apply(sb.policy({**open_peers(family), "sg-a": [egress(family, "tcp", 80)]}))
    assert passing(
        tcp80=lambda: tcp_connect(sb.a, dst, 80, PASS),
        tcp81=lambda: tcp_connect(sb.a, dst, 81, FAIL),
        udp80=lambda: udp_probe(sb.a, dst, 80, FAIL),
        icmp_as_neutron=lambda: ping_out(sb, dst, family)) == ["tcp80", "icmp_as_neutron"]


@pytest.mark.parametrize("family", FAMILIES)
def test_egress_udp_rule(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_egress_udp_rule: only udp/80 out; the echo
    comes back through conntrack although `a` has no ingress rule.
    """
    dst = sb.b.ip_for(family)
    sb.apply(sb.policy({**open_peers(family), "sg-a": [egress(family, "udp", 80)]}))
    assert passing(
        udp80=lambda: udp_probe(sb.a, dst, 80, PASS),
        udp53=lambda: udp_probe(sb.a, dst, 53, FAIL),
        tcp80=lambda: tcp_connect(sb.a, dst, 80, FAIL)) == ["udp80"]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_egress_rule_means_nothing_out(sb: Sandbox, family: int) -> None:
    """Neutron's default-deny egress (fullstack "an SG update takes effect"):
    with an egress rule `a` reaches `b`; once the group's egress rules are
    removed it can open no tcp or udp connection, nor ping over IPv4 (ICMPv6
    stays allowed out, as in Neutron).
    """
    dst = sb.b.ip_for(family)
    sb.apply(sb.policy({**open_peers(family), "sg-a": [egress(family)]}))
    assert tcp_connect(sb.a, dst, 80, PASS)
    assert ping(sb.a, dst, PASS)
    sb.apply(sb.policy({**open_peers(family), "sg-a": []}))
    assert passing(
        tcp=lambda: tcp_connect(sb.a, dst, 80, FAIL),
        udp=lambda: udp_probe(sb.a, dst, 80, FAIL),
        icmp_as_neutron=lambda: ping_out(sb, dst, family)) == ["icmp_as_neutron"]


@pytest.mark.parametrize("key", ["remote_ip_prefix", "dest_ip_prefix"])
@pytest.mark.parametrize("family", FAMILIES)
def test_egress_to_remote_prefix_only(sb: Sandbox, family: int, key: str) -> None:
    """Mirrors the IPv6 class's "tcp to a specific address" and the unit tests
    test_filter_ipv4/6_egress_prefix: egress to b's prefix only, so `c`
    (equally open) is unreachable; `dest_ip_prefix` is the contract's alias.
    """
    prefix = {4: "10.0.0.20/30", 6: "fd00::20/126"}[family]
    sb.apply(sb.policy({**open_peers(family), "sg-a": [egress(family, **{key: prefix})]}))
    assert passing(
        b=lambda: tcp_connect(sb.a, sb.b.ip_for(family), 80, PASS),
        c=lambda: tcp_connect(sb.a, sb.c.ip_for(family), 80, FAIL),
        icmp_c_as_neutron=lambda: ping_out(sb, sb.c.ip_for(family), family),
    ) == ["b", "icmp_c_as_neutron"]


@pytest.mark.parametrize("family", FAMILIES)
def test_egress_to_remote_group_only(sb: Sandbox, family: int) -> None:
    """An egress rule with `remote_group_id` matches the set on the destination
    (Neutron's `-m set --match-set ... dst`): `a` reaches the member `b`, not
    the equally open non-member `c`.
    """
    sb.apply(sb.policy({**open_peers(family),
                        "sg-a": [egress(family, "tcp", 80, remote_group_id="sg-b")]}))
    assert passing(b=lambda: tcp_connect(sb.a, sb.b.ip_for(family), 80, PASS),
                   c=lambda: tcp_connect(sb.a, sb.c.ip_for(family), 80, FAIL)) == ["b"]
