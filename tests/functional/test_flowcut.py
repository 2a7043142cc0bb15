"""Conntrack cuts and the start audit against real conntrack entries.

Each test gets the node namespace of a Topology, puts real entries into its
conntrack table (`conntrack -I`, so no traffic has to be held open), and
runs agent/dataplane/flowcut.py in a thread that entered the namespace, as
the daemon's writer does. What is left is read back with `conntrack -L`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest

from agent.compiler import Snapshot, compile_ruleset
from agent.compiler.stale_flows import FlowAudit
from agent.dataplane import flowcut
from agent.dataplane.engine import Engine
from agent.dataplane.restore_backend import RestoreBackend
from agent.model import parse_policy
from agent.vocab.flows import FlowCut
from agent.vocab.names import Names
from tests.conformance.helpers import EGRESS_ALL, PASS, TcpSession, ingress, port_of
from tests.support.in_netns import call_in_netns
from tests.support.topology import Topology, serve, tcp_connect

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(shutil.which("conntrack") is None,
                                 reason="needs conntrack (conntrack-tools)")]

ZONE = 4097


def in_ns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` in a thread inside `ns`, like the daemon's writer thread."""
    return call_in_netns(ns, fn, timeout=60)


def insert(topo: Topology, proto: str, src: str, dst: str, *args: str,
           zone: int = ZONE) -> None:
    topo.node.run(["conntrack", "-I", "-p", proto, "-s", src, "-d", dst, *args,
                   "-t", "600", "-w", str(zone)])


def tcp(topo: Topology, src: str, dst: str, dport: int, sport: int = 40000,
        zone: int = ZONE) -> None:
    insert(topo, "tcp", src, dst, "--sport", str(sport), "--dport", str(dport),
           "--state", "ESTABLISHED", "-u", "ASSURED", zone=zone)


def entries(topo: Topology) -> list[str]:
    """The entries still there, as `src>dst:dport/zone` (zone 0 for none)."""
    out = []
    for family in ("ipv4", "ipv6"):
        listing = topo.node.run(["conntrack", "-L", "-f", family], check=False).stdout
        for line in listing.splitlines():
            first: dict[str, str] = {}  # the first src, dst, ... are the original tuple's
            for word in line.split():
                key, _, value = word.partition("=")
                if value and key not in first:
                    first[key] = value
            port = first.get("dport") or f"icmp{first.get('type')}"
            out.append(f"{first['src']}>{first['dst']}:{port}/{first.get('zone', '0')}")
    return out


def left(topo: Topology) -> set[str]:
    return set(entries(topo))


def test_cut_by_network_deletes_only_the_entries_inside_it(topology: Topology) -> None:
    """Issue 14.5: an address group's CIDR that went away is cut as a network."""
    tcp(topology, "10.1.2.3", "10.0.0.10", 22)
    tcp(topology, "10.1.200.9", "10.0.0.10", 22)
    tcp(topology, "10.2.0.1", "10.0.0.10", 22)
    tcp(topology, "10.1.2.3", "10.0.0.11", 22)
    report = in_ns(topology.node.ns, lambda: flowcut.cut(
        [FlowCut(4, 6, src="10.1.0.0/16", dst="10.0.0.10", zone=ZONE, reason="test")]))
    assert (report.deleted, report.errors, report.retry, report.complete) == (2, [], [], True)
    assert left(topology) == {f"10.2.0.1>10.0.0.10:22/{ZONE}",
                              f"10.1.2.3>10.0.0.11:22/{ZONE}"}


def test_a_bounded_sweep_feeds_progress_and_hands_its_cuts_back(topology: Topology) -> None:
    """Issue 14.5: the dump stops at its bound, calls `progress` on the way (the
    daemon's watchdog ping) and returns every cut of the family for a retry."""
    for sport in range(40000, 40005):
        tcp(topology, "10.0.0.20", "10.0.0.10", 22, sport=sport)
    cuts = [FlowCut(4, dst="10.0.0.10", reason="test")]
    ticks: list[int] = []
    report = in_ns(topology.node.ns, lambda: flowcut.cut(
        cuts, flowcut.Limits(entries=3, progress_every=1), progress=lambda: ticks.append(1)))
    assert not report.complete and report.retry == cuts and len(ticks) >= 3
    assert "stopped after 3 entries" in report.errors[0]
    assert report.deleted == 3  # what the partial dump found goes at once
    again = in_ns(topology.node.ns, lambda: flowcut.cut(report.retry))
    assert again.complete and again.deleted == 2 and not again.retry
    assert left(topology) == set()


def test_the_start_audit_cuts_what_the_policy_no_longer_allows(topology: Topology) -> None:
    """Issue 14.5: after a restart there is no previous snapshot; every entry of
    a port is judged against the policy in force. Allowed flows, the node's
    own, other zones' and ICMPv6 stay; the revoked ones (v4 and v6) go."""
    web = [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 80, "port_range_max": 80},
           {"direction": "ingress", "ethertype": "IPv6", "protocol": "tcp",
            "port_range_min": 80, "port_range_max": 80},
           {"direction": "egress", "ethertype": "IPv4", "protocol": "tcp",
            "remote_ip_prefix": "10.0.0.0/24"}]
    policy = parse_policy({"security_groups": {"sg-web": web}, "ports": [
        {"id": "a", "device": "tapa", "mac_address": "fa:16:3e:00:00:0a",
         "fixed_ips": ["10.0.0.10", "fd00::10"], "security_groups": ["sg-web"]}]})
    snap = Snapshot(policy, frozenset({"tapa"}), bridges={"tapa": "br0"},
                    zones={"br0": ZONE})
    tcp(topology, "10.0.0.20", "10.0.0.10", 80)              # allowed
    tcp(topology, "10.0.0.20", "10.0.0.10", 22)              # revoked
    tcp(topology, "10.0.0.10", "10.0.0.30", 5432)            # allowed egress
    tcp(topology, "10.0.0.10", "192.0.2.1", 443)             # revoked egress
    tcp(topology, "10.0.0.20", "10.0.0.10", 22, zone=7)      # another bridge's zone
    tcp(topology, topology.node.ipv4, "10.0.0.10", 22)       # the node itself
    tcp(topology, "fd00::20", "fd00::10", 80)                # allowed
    tcp(topology, "fd00::20", "fd00::10", 22)                # revoked
    insert(topology, "icmpv6", "fd00::20", "fd00::10", "--icmpv6-type", "128",
           "--icmpv6-code", "0", "--icmpv6-id", "7")         # ICMPv6: never cut

    def run() -> flowcut.CutReport:
        check = FlowAudit(snap, flowcut.node_addresses())
        return flowcut.audit(check.verdict, (4, 6))

    report = in_ns(topology.node.ns, run)
    assert (report.deleted, report.errors, report.complete) == (3, [], True)
    assert left(topology) == {
        f"10.0.0.20>10.0.0.10:80/{ZONE}", f"10.0.0.10>10.0.0.30:5432/{ZONE}",
        "10.0.0.20>10.0.0.10:22/7", f"{topology.node.ipv4}>10.0.0.10:22/{ZONE}",
        f"fd00::20>fd00::10:80/{ZONE}", f"fd00::20>fd00::10:icmp128/{ZONE}"}


def test_the_audit_stops_a_revoked_connection_that_outlived_its_rule(
        topology: Topology) -> None:
    """Issue 14.5 with real packets: a policy that changed while no previous
    snapshot was known (a restart) leaves the revoked connection established,
    since RELATED,ESTABLISHED comes first. The audit stops it; a connection
    the new policy still allows goes on."""
    a, b = topology.add_vm("a"), topology.add_vm("b")
    serve(a, tcp=[80, 5000])
    bridges = {a.tap: topology.node.bridge, b.tap: topology.node.bridge}

    def snapshot(rules: list[dict[str, Any]]) -> Snapshot:
        policy = parse_policy({"security_groups": {"sg-a": rules, "sg-b": EGRESS_ALL},
                               "ports": [port_of(a, "sg-a"), port_of(b, "sg-b")]})
        return Snapshot(policy, frozenset(bridges), bridges=bridges,
                        zones={topology.node.bridge: ZONE})

    engine = in_ns(topology.node.ns, lambda: Engine(RestoreBackend("iptables-legacy"),
                                                    Names(), (4, 6)))
    before = snapshot([ingress(4, "tcp", 80), ingress(4, "tcp", 5000)])
    after = snapshot([ingress(4, "tcp", 80)])
    in_ns(topology.node.ns, lambda: engine.apply(compile_ruleset(before).ruleset))
    with TcpSession(b, a.ipv4, 5000) as revoked, TcpSession(b, a.ipv4, 80) as kept:
        assert revoked.exchange(PASS) == "OK" and kept.exchange(PASS) == "OK"
        in_ns(topology.node.ns, lambda: engine.apply(compile_ruleset(after).ruleset))
        assert revoked.exchange(PASS) == "OK", "premise: the entry keeps it alive"

        report = in_ns(topology.node.ns, lambda: flowcut.audit(
            FlowAudit(after, flowcut.node_addresses()).verdict, (4, 6)))
        assert report.deleted >= 1 and report.complete and not report.errors
        assert revoked.exchange(1.0) != "OK"
        assert kept.exchange(PASS) == "OK"
    assert not tcp_connect(b, a.ipv4, 5000, 0.4)
