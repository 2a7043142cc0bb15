"""What conntrack state does for (and against) the rules: RELATED, ESTABLISHED,
an established connection whose rule goes away, and applies that never blink.

Mirrors FirewallTestCase.test_related_connection, test_established_connection_is_cut
(skipped by Neutron for iptables; fullstack checks it), Neutron's other
conntrack cleanup triggers (research 1.11), test_preventing_firewall_blink
and test_arp_is_allowed, plus fullstack's "multiple SGs per port, including
removing one".
"""

from __future__ import annotations

import copy
import re
import subprocess

import pytest

from tests.conformance.helpers import (
    CLOSED_PORT,
    EGRESS_ALL,
    FAIL,
    FAMILIES,
    PASS,
    Sandbox,
    TcpSession,
    connect,
    conntrack_packets,
    egress,
    enable_conntrack_accounting,
    icmp_name,
    ingress,
    passing,
    remote_port,
)
from tests.support.topology import ping, popen_in, tcp_connect

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("family", FAMILIES)
def test_related_icmp_and_rst_reach_the_sender(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_related_connection: the error a flow
    provokes comes back although `a` admits no ICMP at all.

    `a` may send tcp and udp to b's closed port 7777 only. b's kernel answers
    udp with an ICMP port unreachable (RELATED: `a` sees ECONNREFUSED on its
    connected socket instead of a timeout) and tcp with a RST. Unsolicited
    ICMP (b's ping) is still dropped.
    """
    a, b = sb.a, sb.b
    dst = b.ip_for(family)
    sb.apply(sb.policy({
        "sg-a": [egress(family, "udp", CLOSED_PORT), egress(family, "tcp", CLOSED_PORT)],
        "sg-b": [*EGRESS_ALL, ingress(family, "udp", CLOSED_PORT),
                 ingress(family, "tcp", CLOSED_PORT)]}))
    assert passing(
        udp_refused=lambda: connect(a, "udp", dst, CLOSED_PORT) == "refused",
        tcp_refused=lambda: connect(a, "tcp", dst, CLOSED_PORT) == "refused",
        unsolicited_icmp=lambda: ping(b, a.ip_for(family), FAIL),
    ) == ["udp_refused", "tcp_refused"]


def hold(session: TcpSession) -> None:
    """The session is up and carries data before the change under test."""
    assert session.connected, session.first
    assert session.exchange(PASS) == "OK"


@pytest.mark.parametrize("direction", ["ingress", "egress"])
@pytest.mark.parametrize("family", FAMILIES)
def test_established_connection_is_cut(sb: Sandbox, family: int, direction: str) -> None:
    """Mirrors FirewallTestCase.test_established_connection_is_cut (which Neutron
    skips for iptables) and fullstack's "an established connection stops when
    its rule is deleted" (Neutron's conntrack cleanup, research 1.11).

    A TCP connection admitted by one rule (a's ingress from b, or a's egress
    to b) is held open; once that rule is removed, data on it must no longer
    pass: RELATED,ESTABLISHED would keep it alive unless the agent deletes its
    conntrack entries. A new connection is refused too.
    """
    a, b = sb.a, sb.b
    if direction == "ingress":
        client, server_vm = b, a
        allowed = sb.policy({"sg-a": [ingress(family, "tcp", 5000)]})
    else:
        client, server_vm = a, b
        allowed = sb.policy({"sg-a": [egress(family, "tcp", 5000)],
                             "sg-b": [*EGRESS_ALL, ingress(family, "tcp", 5000)]})
    dst = server_vm.ip_for(family)
    sb.apply(allowed)
    with TcpSession(client, dst, 5000) as session:
        hold(session)
        removed = copy.deepcopy(allowed)
        removed["security_groups"]["sg-a"] = []
        sb.apply(removed)
        assert session.exchange(1.0) != "OK"
    assert not tcp_connect(client, dst, 5000, FAIL)


@pytest.mark.parametrize("family", FAMILIES)
def test_established_connection_of_removed_member_is_cut(sb: Sandbox, family: int) -> None:
    """Neutron 9168dbf93d (research 1.11, "remote member removed"): a connection
    from a remote group member (r, a port of another node in sg-b) is cut when
    r leaves the group, while b's connection under the same rule goes on.
    """
    dst = sb.a.ip_for(family)
    groups = {"sg-a": [ingress(family, "tcp", 5000, remote_group_id="sg-b")]}
    with_r = sb.policy(groups, extra_ports=[remote_port(sb.r, "sg-b")])
    sb.apply(with_r)
    with TcpSession(sb.r, dst, 5000) as from_r, TcpSession(sb.b, dst, 5000) as from_b:
        hold(from_r)
        hold(from_b)
        sb.apply(sb.policy(groups))
        assert from_r.exchange(1.0) != "OK"
        assert from_b.exchange(PASS) == "OK"


@pytest.mark.parametrize("family", FAMILIES)
def test_connection_still_allowed_survives_a_cut(sb: Sandbox, family: int) -> None:
    """A cut must not kill a connection another rule still allows (fullstack's
    "overlapping rules"). Removing a tcp-any rule deletes the entries of the
    port's tcp flows (Neutron's granularity, research 1.11; `conntrack -D`
    cannot ask "is it still allowed?"), including a tcp/5000 connection that
    a tcp/5000 rule also admits: it must survive, picked up again as new.
    Its conntrack packet counter restarting shows the cut really happened.
    """
    dst = sb.a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [ingress(family, "tcp", 5000), ingress(family, "tcp")]}))
    enable_conntrack_accounting(sb)
    with TcpSession(sb.b, dst, 5000) as session:
        hold(session)
        for _ in range(3):
            assert session.exchange(PASS) == "OK"
        before = conntrack_packets(sb, family, session.sport)
        sb.apply(sb.policy({"sg-a": [ingress(family, "tcp", 5000)]}))
        assert session.exchange(PASS) == "OK"
        after = conntrack_packets(sb, family, session.sport)
        assert 0 < after < before, \
            f"the entry was not cut and re-created ({before} -> {after} packets): " \
            "if the agent now skips cuts of still-allowed flows, this test's premise is gone"
    assert not tcp_connect(sb.b, dst, 22, FAIL)


@pytest.mark.parametrize("family", FAMILIES)
def test_preventing_firewall_blink(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_preventing_firewall_blink (a459950da3):
    while tcp-only policies are applied, cleared and applied again, a
    background ping (which no rule allows) gets no reply at all: each apply
    is atomic, the chains are never briefly open.
    """
    dst = sb.a.ip_for(family)
    tcp_only = sb.policy({"sg-a": [ingress(family, "tcp", 80)]})
    sb.apply(tcp_only)
    pinger = popen_in(sb.b.ns, ["ping", "-n", "-q", "-i", "0.02", "-w", "2", dst],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for policy in (sb.policy(), tcp_only, sb.policy({"sg-a": [ingress(family, "udp", 80)]}),
                       tcp_only):
            sb.apply(policy)
        out, _ = pinger.communicate(timeout=10)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.communicate()
    sent = re.search(r"(\d+) packets transmitted", out)
    received = re.search(r"(\d+) received", out)
    assert sent and int(sent.group(1)) > 10, out
    assert received and int(received.group(1)) == 0, out


def test_arp_is_allowed(sb: Sandbox) -> None:
    """Mirrors FirewallTestCase.test_arp_is_allowed: with no rule at all, ARP
    still resolves both ways (the firewall filters IP, never ARP), so a rule
    added later works at once.
    """
    a, b = sb.a, sb.b
    sb.apply(sb.policy({"sg-b": []}))
    for vm in (a, b):
        vm.run(["ip", "neigh", "flush", "dev", "eth0"])
    # Each sends something its own chain drops, after ARP resolved the peer.
    assert passing(a_to_b=lambda: tcp_connect(a, b.ipv4, 80, FAIL),
                   b_to_a=lambda: tcp_connect(b, a.ipv4, 80, FAIL)) == []
    for vm, peer in ((a, b), (b, a)):
        neigh = vm.run(["ip", "neigh", "show", peer.ipv4, "dev", "eth0"]).stdout
        assert peer.mac in neigh.lower() and "FAILED" not in neigh, (vm.name, neigh)


@pytest.mark.parametrize("family", FAMILIES)
def test_multiple_groups_per_port(sb: Sandbox, family: int) -> None:
    """Fullstack's "multiple SGs per port, including removing one": a port in
    two groups gets the union of their rules; leaving one group takes its
    rules away and keeps the other's.
    """
    dst = sb.a.ip_for(family)
    groups = {"sg-a": [ingress(family, "tcp", 80)],
              "sg-a2": [ingress(family, icmp_name(family))]}
    sb.apply(sb.policy(groups, ports={"a": {"security_groups": ["sg-a", "sg-a2"]}}))
    assert tcp_connect(sb.b, dst, 80, PASS)
    assert ping(sb.b, dst, PASS)
    sb.apply(sb.policy(groups, ports={"a": {"security_groups": ["sg-a"]}}))
    assert passing(tcp=lambda: tcp_connect(sb.b, dst, 80, PASS),
                   icmp=lambda: ping(sb.b, dst, FAIL)) == ["tcp"]
