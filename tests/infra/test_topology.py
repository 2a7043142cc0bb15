"""Self-test of the namespace sandbox (tests/support/topology.py).

With no firewall in the node namespace everything must flow; then one
namespace-local iptables rule must bite, which proves br_netfilter + physdev
work per namespace (the premise of every kernel test of the agent).
"""

from __future__ import annotations

import shutil

import pytest

from tests.support.topology import (
    Topology,
    list_namespaces,
    ping,
    send_spoofed,
    serve,
    tcp_connect,
    udp_probe,
)

pytestmark = pytest.mark.kernel

TCP_A, TCP_B, UDP_PORT = 8080, 8081, 5353


def test_open_bridge_passes_everything(topology: Topology) -> None:
    a = topology.add_vm("a", tap="tap6f1c2a4e-00", mac="fa:16:3e:00:00:0a",
                        ipv4="10.0.0.10", ipv6="fd00::10")
    b = topology.add_vm("b", mac="fa:16:3e:00:00:0b", ipv4="10.0.0.11/24",
                        ipv6="fd00::11")
    server = serve(b, tcp=[TCP_A, TCP_B], udp=[UDP_PORT])

    for dst in (b.ipv4, b.ipv6):
        assert dst is not None
        assert ping(a, dst), dst
        assert tcp_connect(a, dst, TCP_A), dst
        assert udp_probe(a, dst, UDP_PORT), dst
    assert not tcp_connect(a, b.ipv4, 9), "closed port must be refused"
    assert ping(a, topology.node.ipv4) and ping(a, topology.node.ipv6)

    assert server.sources("tcp", TCP_A) == {a.ipv4, a.ipv6}
    assert server.sources("udp", UDP_PORT) == {a.ipv4, a.ipv6}

    # No firewall: forged sources get through and are recorded as such.
    assert send_spoofed(a, "10.0.0.99", b, UDP_PORT)
    assert send_spoofed(a, "fd00::99", b, UDP_PORT)
    assert send_spoofed(a, "10.0.0.98", b, UDP_PORT,
                        spoofed_mac="fa:16:3e:de:ad:00")
    assert {"10.0.0.99", "fd00::99", "10.0.0.98"} <= server.sources("udp")
    # ...and the VM got its own address and MAC back afterwards.
    addrs = a.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "10.0.0.99" not in addrs and "fd00::99" not in addrs
    link = a.run(["ip", "-o", "link", "show", "dev", "eth0"]).stdout
    assert "fa:16:3e:00:00:0a" in link


def test_plug_later_unplug_and_tuntap(topology: Topology) -> None:
    a = topology.add_vm("a")
    c = topology.add_vm("c", plug=False, ipv6=None)
    assert c.tap not in topology.node_devices()

    c.plug()
    assert c.tap in topology.node_devices()
    assert ping(c, a.ipv4)

    c.unplug()
    assert c.tap not in topology.node_devices()
    assert not ping(a, c.ipv4, timeout=0.3)
    c.plug()  # re-plug after unplug works (e.g. VM reboot / migration back)
    assert ping(a, c.ipv4)

    tap = topology.add_tap("tapdeadbeef-00")
    master = topology.node.run(["ip", "-o", "link", "show", "dev", tap]).stdout
    assert f"master {topology.node.bridge}" in master
    topology.remove_device(tap)
    assert tap not in topology.node_devices()


def test_everything_is_gone_after_exit() -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology() as topo:
        a = topo.add_vm("a")
        b = topo.add_vm("b")
        serve(b, tcp=[TCP_A])
        names = list(topo.namespaces)
        assert len(names) == 3
        assert set(names) <= set(list_namespaces())
        raise RuntimeError("boom")
    assert a.ns not in list_namespaces()
    mine = [n for n in list_namespaces() if n.startswith(f"hfwt-{topo.run_id}")]
    assert mine == []
    assert not set(names) & set(list_namespaces())
    assert not topo.tmpdir.exists()


IPTABLES = [
    pytest.param(tool, family, id=f"{tool}-v{family}")
    for tool, family in (("iptables-legacy", 4), ("ip6tables-legacy", 6),
                         ("iptables-nft", 4), ("ip6tables-nft", 6))
]


@pytest.mark.parametrize(("tool", "family"), IPTABLES)
def test_node_iptables_sees_bridged_traffic(topology: Topology, tool: str,
                                            family: int) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    a = topology.add_vm("a")
    b = topology.add_vm("b")
    serve(b, tcp=[TCP_A, TCP_B])
    dst = b.ip_for(family)
    assert tcp_connect(a, dst, TCP_A) and tcp_connect(a, dst, TCP_B)

    topology.node.run([tool, "-w", "-A", "FORWARD", "-m", "physdev",
                       "--physdev-in", a.tap, "--physdev-is-bridged",
                       "-p", "tcp", "--dport", str(TCP_A), "-j", "DROP"])

    assert not tcp_connect(a, dst, TCP_A, timeout=0.5)
    assert tcp_connect(a, dst, TCP_B)
    # The rule sits in the node namespace only and counted the drops.
    counters = topology.node.run([tool, "-w", "-L", "FORWARD", "-v", "-n", "-x"])
    drop = next(ln for ln in counters.stdout.splitlines() if "DROP" in ln)
    assert int(drop.split()[0]) > 0
