"""ICMPv6 rules of the per-port chains that no security group rule controls.

Mirrors Neutron's default IPv6 chains (research 1.4, IPTABLES_FILTER_V6_1 in
`neutron/tests/unit/agent/test_securitygroups_rpc.py`) and its RA provider
rule (1.5): a VM may never send a router advertisement, and receives them
when it has an IPv6 address. Judged by a raw-socket sniffer in the receiver.
"""

from __future__ import annotations

import pytest

from tests.conformance.helpers import (
    EGRESS_ALL,
    FAIL,
    PASS,
    IcmpSniffer,
    Sandbox,
    icmp_send,
    ingress,
)

pytestmark = pytest.mark.kernel

RA = 134
EXPERIMENTAL = 200   # an ICMPv6 type the kernel ignores: the control


def test_router_advertisement_from_vm_is_dropped(sb: Sandbox) -> None:
    """Neutron's egress rule `--icmpv6-type 134 -j DROP`: b's RA to c, which
    admits every ICMPv6, never arrives; another ICMPv6 type does.
    """
    b, c = sb.b, sb.c
    sb.apply(sb.policy({"sg-c": [*EGRESS_ALL, ingress(6, "ipv6-icmp")]}))
    with IcmpSniffer(c) as sniffer:
        icmp_send(b, c.ipv6, EXPERIMENTAL)
        assert sniffer.seen(b.ipv6, EXPERIMENTAL, timeout=PASS)
        icmp_send(b, c.ipv6, RA)
        assert not sniffer.seen(b.ipv6, RA, timeout=FAIL)


def test_router_advertisement_to_vm_is_admitted(sb: Sandbox) -> None:
    """Neutron's RA provider rule: a port with an IPv6 fixed IP receives RAs
    with no ingress rule, while other unsolicited ICMPv6 is dropped.
    """
    a, r = sb.a, sb.r
    sb.apply(sb.policy())
    with IcmpSniffer(a) as sniffer:
        icmp_send(r, a.ipv6, RA)
        assert sniffer.seen(r.ipv6, RA, timeout=PASS)
        icmp_send(r, a.ipv6, EXPERIMENTAL)
        assert not sniffer.seen(r.ipv6, EXPERIMENTAL, timeout=FAIL)
