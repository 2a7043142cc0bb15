"""ML2/OVS hybrid plugging: hostfw enforces on per-port qbr bridges.

With `firewall_driver = hostfw` in the OVS agent (agent/neutron_firewall.py),
Nova plugs each VM as Neutron's iptables_hybrid expects::

    VM a eth0 -- tapA [qbrA] qvbA ==== qvoA [br-int] qvoB ==== qvbB [qbrB] tapB -- eth0 VM b
                                            |
                                            r  (another node, behind br-int)

br-int is Open vSwitch, which iptables never sees; here a Linux bridge in a
namespace of its own with br_netfilter off stands in for it. Each qbr is a
bridge of one port plus the uplink, so a flow between two VMs of the node
crosses netfilter twice, once per qbr (on qbrA only the sender is a tap, on
qbrB only the receiver), and each qbr gets its own conntrack zone. The
agent's dispatch by `--physdev-in/--physdev-out tap...` and the zone per
bridge are what make that work; nothing here is hybrid-specific in the agent.

Why its own sandbox: the package's sandbox plugs every VM into one br0.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.helpers import (
    FAIL,
    PASS,
    TcpSession,
    connect,
    egress,
    ingress,
    port_of,
    spoof_send,
    zones_of,
)
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import VM, Server, Topology, kernel_skip_reason, run_in, serve

pytestmark = pytest.mark.kernel

BACKEND = "iptables-legacy"
PORTS = (22, 80)


@dataclass
class Hybrid:
    topo: Topology
    agent: AgentProcess
    a: VM
    b: VM
    r: VM
    qbr: dict[str, str]
    servers: dict[str, Server]

    def apply(self, a_rules: list[dict[str, Any]]) -> None:
        self.agent.apply_policy(self.policy(a_rules))

    def policy(self, a_rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {"security_groups": {"sg-a": a_rules, "sg-b": [egress(4), egress(6)]},
                "ports": [port_of(self.a, "sg-a"), port_of(self.b, "sg-b")]}

    def node(self, *argv: str) -> str:
        return run_in(self.topo.node.ns, list(argv), check=False).stdout


@pytest.fixture(scope="module")
def hy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hybrid]:
    reason = kernel_skip_reason() or (
        None if shutil.which("iptables-legacy-restore") else "iptables-legacy is not installed")
    if reason:
        pytest.skip(reason)
    workdir: Path = tmp_path_factory.mktemp("hybrid")
    with Topology() as topo:
        integration = topo.add_integration_bridge()
        a = topo.add_vm("a", ipv4="10.0.0.10", ipv6="fd00::10", plug=False)
        b = topo.add_vm("b", ipv4="10.0.0.20", ipv6="fd00::20", plug=False)
        r = topo.add_vm("r", ipv4="10.0.0.50", ipv6="fd00::50", tap="uplr0", plug=False)
        qbr = {"a": topo.plug_hybrid(a, integration), "b": topo.plug_hybrid(b, integration)}
        topo.plug(r, bridge="brint", ns=integration)
        servers = {vm.name: serve(vm, tcp=PORTS, udp=(9999,)) for vm in (a, b, r)}
        hybrid = Hybrid(topo, AgentProcess(workdir, topo.node.ns, {}, backend=BACKEND),
                        a, b, r, qbr, servers)
        hybrid.agent.write_policy(hybrid.policy([]))
        try:
            hybrid.agent.start()
            yield hybrid
        finally:
            hybrid.agent.stop()
    assert_root_clean()


def connects(vm: VM, dst: str, port: int, timeout: float) -> bool:
    return connect(vm, "tcp", dst, port, timeout) == "ok"


def test_a_ports_ingress_rules_hold_on_its_qbr_from_the_node_and_from_afar(hy: Hybrid) -> None:
    hy.apply([ingress(4, "tcp", 22), ingress(6, "tcp", 22)])
    for src in (hy.b, hy.r):   # b: another qbr of this node; r: behind br-int
        for dst in (hy.a.ipv4, hy.a.ipv6):
            assert connects(src, dst, 22, PASS), (src.name, dst)
            assert not connects(src, dst, 80, FAIL), (src.name, dst)


def test_replies_return_and_a_port_without_ingress_is_closed(hy: Hybrid) -> None:
    """Egress is open for b: its flows' replies come back through conntrack
    (ESTABLISHED on qbrB), while nothing can open a connection to b."""
    hy.apply([ingress(4, "tcp", 22)])
    assert connects(hy.b, hy.r.ipv4, 80, PASS)
    assert not connects(hy.r, hy.b.ipv4, 80, FAIL)
    assert not connects(hy.a, hy.b.ipv4, 22, FAIL)


def test_anti_spoofing_holds_on_the_qbr(hy: Hybrid) -> None:
    hy.apply([egress(4), egress(6)])
    assert not spoof_send(hy.a, "10.0.0.99", hy.r, hy.servers["r"])
    assert spoof_send(hy.a, hy.a.ipv4, hy.r, hy.servers["r"], timeout=PASS)


def test_each_qbr_is_a_conntrack_zone_of_its_own(hy: Hybrid) -> None:
    """A flow b -> a is tracked once on qbrB and once on qbrA, in two zones."""
    hy.apply([ingress(4, "tcp", 22)])
    save = hy.node("iptables-legacy-save", "-t", "raw")
    zone_rules = [line for line in save.splitlines() if "CT --zone" in line]
    assert any(f"-i {hy.qbr['a']} " in rule for rule in zone_rules), zone_rules
    assert any(f"-i {hy.qbr['b']} " in rule for rule in zone_rules), zone_rules
    hy.node("conntrack", "-D", "-p", "tcp", "--dport", "22")
    with TcpSession(hy.b, hy.a.ipv4, 22) as session:
        assert session.connected and session.exchange(PASS) == "OK", session.first
        entries = [line for line in hy.node("conntrack", "-L", "-p", "tcp", "--dport",
                                            "22").splitlines()
                   if f"dst={hy.a.ipv4}" in line and f"sport={session.sport} " in line]
    zones = zones_of(entries)
    assert len(entries) == 2 and len(zones) == 2 and 0 not in zones, entries
