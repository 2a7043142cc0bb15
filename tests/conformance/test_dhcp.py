"""DHCP and DHCPv6 through the per-port chains, with no user rule involved.

Mirrors FirewallTestCase.test_dhcp_requests_from_vm and
test_dhcp_server_forbidden_on_vm, the IPv6 class's DHCPv6 546->547 check,
and Neutron's provider rules (research 1.4/1.5): a VM may always be a DHCP
client, never a DHCP server, and receives DHCP replies addressed to it.

Host `r` (behind the uplink) plays the DHCP server of the network, as a
network node would; its echo server records the source address and port of
what arrived. `d` (IPv4) and `b` (IPv6) are the clients.
"""

from __future__ import annotations

import pytest

from tests.conformance.helpers import (
    FAIL,
    PASS,
    Sandbox,
    dhcp_discover,
    server_saw,
    udp_send,
)

pytestmark = pytest.mark.kernel

CLIENT = {4: "d", 6: "b"}
PORTS = {4: (68, 67), 6: (546, 547)}   # (client port, server port)
OTHER = 5555                           # some other source port


def no_rules(sb: Sandbox) -> dict:
    """Every local port in a group without any rule."""
    return sb.policy({"sg-a": [], "sg-b": [], "sg-c": [], "sg-d": []})


def test_dhcp_discover_from_unspecified_address(sb: Sandbox) -> None:
    """Mirrors FirewallTestCase.test_dhcp_requests_from_vm (the first rule of
    Neutron's IPv4 egress chain): a discover from 0.0.0.0:68 to
    255.255.255.255:67 passes before the VM has an address, even without any
    egress rule; the same broadcast to another port is a spoofed source and
    is dropped.
    """
    server = sb.servers["r"]
    sb.apply(no_rules(sb))
    dhcp_discover(sb.d)
    assert server_saw(server, "0.0.0.0", "udp", 67, sport=68, timeout=PASS)
    dhcp_discover(sb.d, dport=9999)
    assert not server_saw(server, "0.0.0.0", "udp", 9999, timeout=FAIL)


@pytest.mark.parametrize("family", [pytest.param(4, id="v4"), pytest.param(6, id="v6-dhcpv6")])
def test_dhcp_client_requests_pass_without_egress_rules(sb: Sandbox, family: int) -> None:
    """Mirrors test_dhcp_requests_from_vm (renew/rebind, udp 68->67) and the
    IPv6 class's DHCPv6 546->547: allowed with no egress rule at all, while
    the same datagram from another source port is dropped.
    """
    client = sb.vms[CLIENT[family]]
    cport, sport = PORTS[family]
    server, dst = sb.servers["r"], sb.r.ip_for(family)
    sb.apply(no_rules(sb))
    udp_send(client, dst, sport, sport=cport)
    assert server_saw(server, client.ip_for(family), "udp", sport, sport=cport, timeout=PASS)
    udp_send(client, dst, sport, sport=OTHER)
    assert not server_saw(server, client.ip_for(family), "udp", sport, sport=OTHER,
                          timeout=FAIL)


@pytest.mark.parametrize("family", [pytest.param(4, id="v4"), pytest.param(6, id="v6-dhcpv6")])
def test_dhcp_server_forbidden_on_vm(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_dhcp_server_forbidden_on_vm: a VM whose
    egress is wide open still cannot send from the DHCP server port to the
    client port (67->68, 547->546), and a client's request (68->67) is not
    admitted into a VM without an ingress rule for it.
    """
    client = sb.vms[CLIENT[family]]
    cport, sport = PORTS[family]
    server, dst = sb.servers["r"], sb.r.ip_for(family)
    sb.apply(sb.policy())   # b, c, d: all egress allowed
    udp_send(client, dst, cport, sport=OTHER)   # the control: egress is open
    assert server_saw(server, client.ip_for(family), "udp", cport, sport=OTHER, timeout=PASS)
    udp_send(client, dst, cport, sport=sport)
    assert not server_saw(server, client.ip_for(family), "udp", cport, sport=sport,
                          timeout=FAIL)
    udp_send(sb.r, client.ip_for(family), sport, sport=cport)
    assert not server_saw(sb.servers[CLIENT[family]], sb.r.ip_for(family), "udp", sport,
                          timeout=FAIL)


@pytest.mark.parametrize("family", [pytest.param(4, id="v4"), pytest.param(6, id="v6-dhcpv6")])
def test_dhcp_reply_reaches_client_without_ingress_rules(sb: Sandbox, family: int) -> None:
    """Neutron's provider rule (research 1.5): a DHCP reply (67->68, 547->546)
    to the port's own address is admitted with no ingress rule; the same
    datagram from another source port is not.
    """
    client = sb.vms[CLIENT[family]]
    cport, sport = PORTS[family]
    receiver, src = sb.servers[CLIENT[family]], sb.r.ip_for(family)
    sb.apply(no_rules(sb))
    udp_send(sb.r, client.ip_for(family), cport, sport=sport)
    assert server_saw(receiver, src, "udp", cport, sport=sport, timeout=PASS)
    udp_send(sb.r, client.ip_for(family), cport, sport=OTHER)
    assert not server_saw(receiver, src, "udp", cport, sport=OTHER, timeout=FAIL)
