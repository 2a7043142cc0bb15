"""Anti-spoofing: which (source IP, source MAC) pairs a port may send from.

Mirrors FirewallTestCase.test_ip_spoofing, test_mac_spoofing,
test_allowed_address_pairs (every combination of allowed / not allowed IP
and MAC), the *_works_without_port_security_enabled variants and
test_port_security_enabled_set_to_false, plus the IPv6 rules Neutron's unit
tests pin down (EUI-64 link-local per MAC, d1b9026729) and this project's
deliberate difference: an IPv4-only port may send IPv6 only from its
link-local address (Neutron leaves that family unfiltered).

`c` (or `d`) sends UDP datagrams to `b`, which admits udp/9999 from anyone;
`b`'s echo server records the source address that arrived. The neighbour
entry of the destination is pinned, so a blocked probe shows the firewall
dropped the datagram itself (see helpers.spoof_send).
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
    conntrack_entries,
    ingress,
    link_local,
    spoof_send,
)
from tests.support.topology import tcp_connect, udp_probe

pytestmark = pytest.mark.kernel
M2 = "fa:16:3e:aa:00:02"   # an allowed-address-pair MAC
M3 = "fa:16:3e:aa:00:03"   # a MAC nobody allowed
X1 = {4: "10.0.0.201", 6: "fd00::c9"}   # pair without a MAC (the port's MAC)
X2 = {4: "10.0.0.202", 6: "fd00::ca"}   # pair with MAC M2
X3 = {4: "10.0.0.203", 6: "fd00::cb"}   # not allowed
PAIR_NET = {4: "10.0.0.128/28", 6: "fd00::100/124"}
# How long to wait for a datagram that must not arrive, counted after the
# sender's three datagrams went out over 0.1 s: the window is FAIL long.
SPOOF_FAIL = FAIL - 0.1


def receiver_policy(sb: Sandbox, c_port: dict[str, Any] | None = None,
                    d_port: dict[str, Any] | None = None) -> dict[str, Any]:
    """b admits udp/9999 (both families) from anyone; `c`/`d` port overrides."""
    ports = {k: v for k, v in (("c", c_port), ("d", d_port)) if v is not None}
    return sb.policy({"sg-b": [*EGRESS_ALL, ingress(4, "udp", 9999), ingress(6, "udp", 9999)]},
                     ports=ports)


def sent(sb: Sandbox, sender: str, src_ip: str, mac: str | None = None,
         expect: bool = False, dst_ip: str | None = None) -> bool:
    """Whether a datagram from `sender` with (src_ip, mac) reached b."""
    return spoof_send(sb.vms[sender], src_ip, sb.b, sb.servers["b"], mac=mac, dst_ip=dst_ip,
                      timeout=PASS if expect else SPOOF_FAIL)


@pytest.mark.parametrize("family", FAMILIES)
def test_ip_spoofing(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_ip_spoofing: the port's own address passes,
    a forged one is dropped.
    """
    sb.apply(receiver_policy(sb))
    assert sent(sb, "c", sb.c.ip_for(family), expect=True)
    assert not sent(sb, "c", X3[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_mac_spoofing(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_mac_spoofing: the port's own address from
    a forged MAC is dropped.
    """
    sb.apply(receiver_policy(sb))
    assert not sent(sb, "c", sb.c.ip_for(family), mac=M3)
    assert sent(sb, "c", sb.c.ip_for(family), expect=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_allowed_address_pairs(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_allowed_address_pairs: every combination.

    Pairs: (X1, no MAC = the port's MAC) and (X2, M2). Only exact pairs pass:
    X1 from M2, X2 from the port's MAC, the port's own IP from M2, and the
    unlisted X3 from any MAC are all dropped.
    """
    c = sb.c
    pairs = [{"ip_address": X1[family]}, {"ip_address": X2[family], "mac_address": M2}]
    sb.apply(receiver_policy(sb, {"allowed_address_pairs": pairs}))
    assert sent(sb, "c", X1[family], expect=True)
    assert sent(sb, "c", X2[family], mac=M2, expect=True)
    assert sent(sb, "c", c.ip_for(family), expect=True)
    assert not sent(sb, "c", X1[family], mac=M2)
    assert not sent(sb, "c", X1[family], mac=M3)
    assert not sent(sb, "c", X2[family])
    assert not sent(sb, "c", X2[family], mac=M3)
    assert not sent(sb, "c", c.ip_for(family), mac=M2)
    assert not sent(sb, "c", X3[family])
    assert not sent(sb, "c", X3[family], mac=M2)


@pytest.mark.parametrize("family", FAMILIES)
def test_allowed_address_pair_cidr(sb: Sandbox, family: int) -> None:
    """An allowed address pair may be a CIDR (Neutron keeps it as the spoof
    rule's prefix): its first and last addresses pass, its neighbours do not.
    """
    net = PAIR_NET[family]
    inside = {4: ("10.0.0.128", "10.0.0.143"), 6: ("fd00::100", "fd00::10f")}[family]
    outside = {4: ("10.0.0.127", "10.0.0.144"), 6: ("fd00::ff", "fd00::110")}[family]
    sb.apply(receiver_policy(sb, {"allowed_address_pairs": [{"ip_address": net}]}))
    for addr in inside:
        assert sent(sb, "c", addr, expect=True), addr
    for addr in outside:
        assert not sent(sb, "c", addr), addr


@pytest.mark.parametrize("family", FAMILIES)
def test_port_without_fixed_ips_sends_from_any_ip_of_its_mac(sb: Sandbox, family: int) -> None:
    """Neutron's spoof chain for a port with no fixed IPs (and no pairs) is a
    MAC-only rule in both families: any source address from the port's MAC
    passes, nothing from another MAC does.
    """
    sb.apply(receiver_policy(sb, {"fixed_ips": []}))
    assert sent(sb, "c", X3[family], expect=True)
    assert sent(sb, "c", sb.c.ip_for(family), expect=True)
    assert not sent(sb, "c", X3[family], mac=M3)


def test_ipv6_link_local_from_eui64_of_each_mac(sb: Sandbox) -> None:
    """Neutron (d1b9026729): each MAC with an IPv6 pair may also send from its
    EUI-64 link-local address; another link-local address is dropped.
    """
    c, b = sb.c, sb.b
    pairs = [{"ip_address": X2[6], "mac_address": M2}]
    sb.apply(receiver_policy(sb, {"allowed_address_pairs": pairs}))
    to_b = link_local(b.mac)
    assert sent(sb, "c", link_local(c.mac), dst_ip=to_b, expect=True)
    assert sent(sb, "c", link_local(M2), mac=M2, dst_ip=to_b, expect=True)
    assert not sent(sb, "c", "fe80::99", dst_ip=to_b)
    assert not sent(sb, "c", link_local(M2), dst_ip=to_b)


def test_ipv4_only_port_sends_ipv6_only_from_its_link_local(sb: Sandbox) -> None:
    """Deliberate difference from Neutron (README): `d` has no IPv6 fixed IP.
    Neutron gives it no IPv6 spoof chain, so any IPv6 source would pass; here
    only its EUI-64 link-local address does, and a global one is dropped.
    """
    d, b = sb.d, sb.b
    sb.apply(receiver_policy(sb))
    assert sent(sb, "d", link_local(d.mac), dst_ip=link_local(b.mac), expect=True)
    assert not sent(sb, "d", "fd00::99")
    assert not sent(sb, "d", "fe80::99", dst_ip=link_local(b.mac))


@pytest.mark.parametrize("family", FAMILIES)
def test_allowed_address_pair_any_address(sb: Sandbox, family: int) -> None:
    """An allowed address pair of 0.0.0.0/0 (::/0) lets the port send from any
    address, but only from its MAC; research 1.4 suspects Neutron's rendering
    of it (`-s 0.0.0.0/0`, which iptables-save omits) never converges, so a
    resync must write nothing here.
    """
    anything = {4: "0.0.0.0/0", 6: "::/0"}[family]
    sb.apply(receiver_policy(sb, {"allowed_address_pairs": [{"ip_address": anything}]}))
    assert sent(sb, "c", X3[family], expect=True)
    assert not sent(sb, "c", X3[family], mac=M3)
    sb.agent.resync()
    assert sb.status()["last_apply"]["lines_written"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_forging_another_vms_established_flow_is_dropped(sb: Sandbox, family: int) -> None:
    """Known sessions are accepted early, but never before the sender's spoof check.

    `c` has a UDP flow with `b` (b echoes, so conntrack sees both directions
    and takes the next packet of it as ESTABLISHED). `d` then sends a
    datagram with the flow's exact 5-tuple: c's address, c's source port,
    b's address and port. b admits udp/9999 from c only, so nothing but d's
    own spoof check stands between the forgery and b: were RELATED,ESTABLISHED
    looked at first, the datagram would arrive.
    """
    c, b = sb.c, sb.b
    c_ip, b_ip = c.ip_for(family), b.ip_for(family)
    host = "/32" if family == 4 else "/128"
    sb.apply(sb.policy({"sg-b": [*EGRESS_ALL, ingress(family, "udp", 9999,
                                                      remote_ip_prefix=c_ip + host)]}))
    sport = 40999
    assert spoof_send(c, c_ip, b, sb.servers["b"], sport=sport, timeout=PASS)
    flows = [e for e in conntrack_entries(sb, family, "udp", b_ip, 9999)
             if f"sport={sport} " in e]
    assert flows and "UNREPLIED" not in flows[0], flows  # b's echo came back: established
    assert not spoof_send(sb.d, c_ip, b, sb.servers["b"], sport=sport, timeout=SPOOF_FAIL)
    # The flow itself is untouched: c's next datagram still gets through.
    assert spoof_send(c, c_ip, b, sb.servers["b"], sport=sport, timeout=PASS)


NO_PORT_SECURITY = {"port_security_enabled": False, "security_groups": []}


@pytest.mark.parametrize("family", FAMILIES)
def test_spoofing_works_without_port_security(sb: Sandbox, family: int) -> None:
    """Mirrors test_ip_spoofing_works_without_port_security_enabled and
    test_mac_spoofing_works_without_port_security_enabled: with port security
    off, forged addresses and MACs pass.
    """
    sb.apply(receiver_policy(sb, NO_PORT_SECURITY))
    assert sent(sb, "c", X3[family], expect=True)
    assert sent(sb, "c", sb.c.ip_for(family), mac=M3, expect=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_port_security_disabled_is_unfiltered(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_port_security_enabled_set_to_false: with
    port security off, `c` receives anything although it has no group, while
    the same traffic to a filtered port without rules (`a`) is dropped.
    """
    sb.apply(receiver_policy(sb, NO_PORT_SECURITY))
    assert tcp_connect(sb.b, sb.c.ip_for(family), 80, PASS)
    assert udp_probe(sb.r, sb.c.ip_for(family), 5000, PASS)
    assert not tcp_connect(sb.b, sb.a.ip_for(family), 80, FAIL)
    ports = {p["device"]: p["state"] for p in sb.agent.request({"command": "ports"})["ports"]}
    assert "no port security" in ports[sb.c.tap], ports
