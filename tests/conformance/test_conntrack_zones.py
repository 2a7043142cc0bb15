"""Conntrack zones: one per bridge (network), stable across agent restarts.

Mirrors Neutron's raw-table zone rules (research 1.8: `CT --zone` per
network for the Linux bridge driver, zones from 4097, rebuilt from the raw
table at start so they survive restarts); Neutron has no functional traffic
test for it. Why it matters: without a zone, VMs of different networks with
overlapping addresses share conntrack entries, and a zone that changed on
restart would orphan every established connection.

Port 7002 is used by nothing else in the suite, so the conntrack table can be
asked about these flows alone.
"""

from __future__ import annotations

import re

import pytest

from tests.conformance.helpers import (
    PASS,
    Sandbox,
    TcpSession,
    conntrack_entries,
    ingress,
    zones_of,
)
from tests.support.topology import tcp_connect

pytestmark = pytest.mark.kernel

PORT = 7002


def raw_zones(sb: Sandbox, family: int) -> set[int]:
    """Zone numbers of the agent's `CT --zone` rules in the raw table."""
    return {int(z) for z in re.findall(r"-j CT --zone (\d+)", sb.save(family))}


def test_vm_traffic_is_tracked_in_one_nonzero_zone_that_survives_restart(sb: Sandbox) -> None:
    """VM-to-VM flows of both families are tracked in the bridge's zone (not
    0, the same for IPv4 and IPv6); after the agent restarts the raw table
    keeps that number, an established connection goes on exchanging data, and
    new flows land in the same zone.
    """
    a, b = sb.a, sb.b
    for family in (4, 6):
        sb.node("conntrack", "-D", "-f", f"ipv{family}", "-p", "tcp", "--dport", str(PORT),
                check=False)
    sb.apply(sb.policy({"sg-a": [ingress(4, "tcp", PORT), ingress(6, "tcp", PORT)]}))
    with TcpSession(b, a.ipv4, PORT) as session:
        assert session.connected, session.first
        assert session.exchange(PASS) == "OK"
        zones = zones_of(conntrack_entries(sb, 4, "tcp", a.ipv4, PORT))
        assert len(zones) == 1 and 0 not in zones, zones
        zone = zones.pop()
        assert tcp_connect(b, a.ipv6, PORT, PASS)
        assert zones_of(conntrack_entries(sb, 6, "tcp", a.ipv6, PORT)) == {zone}
        assert zone in raw_zones(sb, 4) and zone in raw_zones(sb, 6)

        assert sb.agent.stop() == 0
        sb.agent.start()
        assert raw_zones(sb, 4) == raw_zones(sb, 6) == {zone}
        written = sb.status()["last_apply"]["tables_written"]
        assert not any(t.startswith("raw/") for t in written), written
        assert session.exchange(PASS) == "OK"

    assert tcp_connect(b, a.ipv4, PORT, PASS)
    assert zones_of(conntrack_entries(sb, 4, "tcp", a.ipv4, PORT)) == {zone}
