"""Hostile policies and hostile neighbours, judged in the kernel (issue 14).

Each case once broke the whole node, not just the object at fault:

- a stateless port with the allowed address pair 0.0.0.0/0 untracked every
  IPv4 packet of the node, so stateful ports lost their replies;
- a stateless port's address untracked the same address on every bridge, so
  another tenant reusing it lost its return traffic.

Every test runs its own agent (iptables-legacy: the raw-table and ipset
behaviour under test does not depend on the backend) in a fresh topology.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import vm_port
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import VM, Topology, serve, tcp_connect

pytestmark = pytest.mark.kernel

PORT = 7301
PASS = 3.0
STATELESS = [{"direction": "ingress", "protocol": "tcp", "port_range_min": PORT,
              "stateful": False},
             {"direction": "egress", "protocol": "tcp", "stateful": False}]
SERVER = [{"direction": "ingress", "protocol": "tcp", "port_range_min": PORT},
          {"direction": "egress"}]
CLIENT = [{"direction": "egress"}]


def start_agent(tmp_path: Path, topo: Topology, policy: dict[str, Any],
                extra_conf: str = "") -> AgentProcess:
    agent = AgentProcess(tmp_path, topo.node.ns, policy, extra_conf=extra_conf)
    agent.start()
    return agent


def conntrack_lines(topo: Topology, dst: str) -> list[str]:
    out = topo.node.run(["conntrack", "-L", "-p", "tcp", "-d", dst, "--dport", str(PORT)],
                        check=False).stdout
    return [line for line in out.splitlines() if f"dport={PORT}" in line]


def on_bridge(topo: Topology, vm: VM, bridge: str) -> None:
    """Move `vm`'s tap to `bridge` (created, up, when missing)."""
    if topo.node.run(["ip", "link", "show", bridge], check=False).returncode:
        topo.node.run(["ip", "link", "add", bridge, "type", "bridge"])
        topo.node.run(["ip", "link", "set", bridge, "up"])
    topo.node.run(["ip", "link", "set", vm.tap, "master", bridge])


def test_stateless_port_with_allowed_pair_0_0_0_0_0_untracks_only_itself(
        topology: Topology, tmp_path: Path) -> None:
    """A stateless port s holds the allowed address pair 0.0.0.0/0. The
    stateful client b still reaches server c, because c's reply is tracked
    (ESTABLISHED admits it at b); the flow has its conntrack entry; the raw
    table reads back as written, so the agent is in sync and a second
    resync writes nothing.
    """
    s = topology.add_vm("s", ipv6=None)
    b = topology.add_vm("b", ipv6=None)
    c = topology.add_vm("c", ipv6=None)
    server = serve(c, tcp=[PORT])
    policy = {"security_groups": {"sl": STATELESS, "cl": CLIENT, "sv": SERVER},
              "ports": [{**vm_port(s, "sl"), "allowed_address_pairs": [
                  {"ip_address": "0.0.0.0/0"}]}, vm_port(b, "cl"), vm_port(c, "sv")]}
    agent = start_agent(tmp_path, topology, policy)
    try:
        assert tcp_connect(b, c.ipv4, PORT, PASS), agent.log()
        assert conntrack_lines(topology, c.ipv4), "the stateful flow was not tracked"
        agent.resync()
        assert agent.status()["in_sync"]
        agent.resync()
        written = agent.request({"command": "status"})["last_apply"]["tables_written"]
        assert not any(t.startswith("raw/") for t in written), written
    finally:
        server.stop()
        agent.stop()
        assert_root_clean()


def test_a_tenant_reusing_a_stateless_ports_address_on_another_bridge_keeps_its_replies(
        topology: Topology, tmp_path: Path) -> None:
    """Tenant 1's stateless port s has 10.0.0.5 on br0. Tenant 2's stateful
    server z has 10.0.0.5 too, on br1, and its client w connects to it: the
    connection completes and is tracked, in br1's zone. s's own flow stays
    untracked (its client r, on br0, has no port security).
    """
    s = topology.add_vm("s", ipv4="10.0.0.5", ipv6=None)
    r = topology.add_vm("r", ipv4="10.0.0.6", ipv6=None)
    z = topology.add_vm("z", ipv4="10.0.0.5", ipv6=None)
    w = topology.add_vm("w", ipv4="10.0.0.7", ipv6=None)
    for vm in (z, w):
        on_bridge(topology, vm, "br1")
    servers = [serve(z, tcp=[PORT]), serve(s, tcp=[PORT])]
    policy = {"security_groups": {"sl": STATELESS, "cl": CLIENT, "sv": SERVER},
              "ports": [vm_port(s, "sl"), {**vm_port(r), "port_security_enabled": False},
                        vm_port(z, "sv"),
                        vm_port(w, "cl")]}
    agent = start_agent(tmp_path, topology, policy)
    try:
        assert tcp_connect(w, "10.0.0.5", PORT, PASS), agent.log()
        entries = conntrack_lines(topology, "10.0.0.5")
        assert entries and all("zone=" in line for line in entries), entries
        topology.node.run(["conntrack", "-D", "-p", "tcp", "--dport", str(PORT)], check=False)
        assert tcp_connect(r, "10.0.0.5", PORT, PASS), "the stateless port lost its traffic"
        assert conntrack_lines(topology, "10.0.0.5") == [], "the stateless flow was tracked"
        assert agent.status()["in_sync"]
    finally:
        for server in servers:
            server.stop()
        agent.stop()
        assert_root_clean()
