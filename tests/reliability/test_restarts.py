"""Restarts under continuous traffic: no allowed packet lost, no denied one let through.

Three sequenced UDP streams at 200 packets/s run while the agent is stopped
(SIGTERM) and started again several times: one allowed (client -> server
port 7001, by a remote-group rule), two denied (the same client to port 7002,
which no rule opens; an outsider to port 7001, not in the remote group). The
allowed stream must get every datagram echoed; the server must never see a
denied one. This is the promise of "SIGTERM leaves every rule in place; a
restarted agent adopts the rules it finds and rewrites only what differs".
"""

from __future__ import annotations

import random
import time

import pytest

from tests.reliability.support import EchoServer, Stream, backend_params, scaled, vm_port
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import Topology, udp_probe

pytestmark = pytest.mark.kernel

ALLOWED, CLOSED = 7001, 7002


def policy(server, client, outsider) -> dict:
    return {
        "security_groups": {
            "sg-server": [
                {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
                 "port_range_min": ALLOWED, "port_range_max": ALLOWED,
                 "remote_group_id": "sg-client"},
                {"direction": "egress", "ethertype": "IPv4"},
                {"direction": "egress", "ethertype": "IPv6"},
            ],
            "sg-client": [{"direction": "egress", "ethertype": "IPv4"},
                          {"direction": "egress", "ethertype": "IPv6"}],
            "sg-outsider": [{"direction": "egress", "ethertype": "IPv4"}],
        },
        "ports": [vm_port(server, "sg-server"), vm_port(client, "sg-client"),
                  vm_port(outsider, "sg-outsider")],
    }


@pytest.mark.parametrize("backend", backend_params("iptables-legacy", "iptables-nft", "iptc"))
def test_restarts_under_traffic_lose_nothing_and_let_nothing_through(
        topology: Topology, tmp_path, backend: str) -> None:
    rng = random.Random()
    server, client = topology.add_vm("server"), topology.add_vm("client")
    outsider = topology.add_vm("outsider")
    agent = AgentProcess(tmp_path, topology.node.ns, policy(server, client, outsider),
                         backend=backend)
    echo = EchoServer(server, [ALLOWED, CLOSED])
    streams: list[Stream] = []
    try:
        agent.start()
        # Resolve neighbours both ways before counting, so a loss can only be the firewall's.
        assert udp_probe(client, server.ipv4, ALLOWED)
        assert not udp_probe(outsider, server.ipv4, ALLOWED, timeout=0.3)
        before = {"closed": echo.arrivals(port=CLOSED), "outsider": echo.arrivals(
            src=outsider.ipv4)}
        streams = [Stream(client, server.ipv4, ALLOWED), Stream(client, server.ipv4, CLOSED),
                   Stream(outsider, server.ipv4, ALLOWED)]
        time.sleep(0.5)
        for _ in range(scaled(3)):
            assert agent.stop() == 0
            time.sleep(rng.uniform(0.0, 0.5))
            agent.start()
            applied = agent.request({"command": "status"})["last_apply"]
            assert applied["lines_written"] == 0, f"restart rewrote rules: {applied}"
            time.sleep(rng.uniform(0.2, 1.0))
        allowed, closed, outsiders = (s.finish() for s in streams)
    finally:
        for stream in streams:
            if stream.proc.poll() is None:
                stream.proc.kill()
        agent.stop()
        echo.stop()
        assert_root_clean()
    assert allowed["sent"] >= 200, allowed
    assert allowed["missing_count"] == 0, f"allowed datagrams lost: {allowed}"
    assert closed["echoed"] == 0 and outsiders["echoed"] == 0, (closed, outsiders)
    assert echo.arrivals(port=CLOSED) == before["closed"], "a datagram to a closed port arrived"
    assert echo.arrivals(src=outsider.ipv4) == before["outsider"], \
        "a datagram from outside the remote group arrived"
