"""nova-network NAT with real packets: floating IPs, host SNAT, metadata, services.

The sandbox is tests/support/topology.py's node (bridge br0, 10.0.0.1/24,
VMs on veth "taps") plus an "outside" namespace wired to the node's public
interface:

    outside eth0 203.0.113.2/24 --- pub0 203.0.113.1/24  node  br0 10.0.0.1/24 --- VMs
    route 198.51.100.0/24 (the floating range) via the node; no route to 10.0.0.0/24

so the outside reaches a VM only through a floating IP, and a VM's packets
come back from the outside only if the node SNATed them. The real agent runs
in standalone mode with a `[nat]` section (`[agent] netns` = the node); one
test applies a compiled ruleset with the Engine directly, to prove that our
text is what iptables-save prints. Every namespace is deleted by Topology,
even on failure, and nothing touches the root namespace's firewall.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.fixtures import require_kernel
from tests.support.topology import (
    VM,
    Server,
    Topology,
    popen_in,
    run_in,
    serve,
    tcp_connect,
    udp_probe,
)

pytestmark = pytest.mark.kernel

FAIL = 0.5                     # seconds a probe that must fail may take
FLOAT_A = "198.51.100.10"      # the floating IP of VM a
NODE_PUBLIC, OUTSIDE = "203.0.113.1", "203.0.113.2"
METADATA_PORT = 8775
ZONES = [pytest.param(True, id="zones-on"), pytest.param(False, id="zones-off")]


def nat_conf(zones: bool) -> str:
    """The node's [nat], with per-bridge conntrack zones (the default) or without."""
    return (f"[nat]\nfixed_range = 10.0.0.0/24\nrouting_source_ip = {NODE_PUBLIC}\n"
            f"public_interface = pub0\nmetadata_port = {METADATA_PORT}\n"
            "dhcp_bridges = br0\n"
            f"[firewall]\nconntrack_zones = {str(zones).lower()}\n")


SG = {
    "sg-web": [
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": 80, "port_range_max": 80},
        {"direction": "egress", "ethertype": "IPv4"},
    ],
    # Reachable on 80, but may not open connections of its own.
    "sg-mute": [
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": 80, "port_range_max": 80},
    ],
}


def port(vm: VM, group: str, *floating: str) -> dict[str, Any]:
    return {"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
            "fixed_ips": [vm.ipv4], "security_groups": [group],
            "floating_ips": list(floating)}


def wire_outside(topo: Topology) -> VM:
    """The outside namespace on the node's public interface pub0 (see the module doc)."""
    outside = topo.add_vm("outside", ipv4=f"{OUTSIDE}/24", ipv6=None, plug=False)
    node = topo.node
    node.run(["ip", "link", "add", "pub0", "type", "veth", "peer", "name", "hfwtpub"])
    node.run(["ip", "link", "set", "hfwtpub", "netns", outside.ns])
    outside.run(["ip", "link", "set", "hfwtpub", "name", "eth0"])
    outside.run(["ip", "addr", "add", f"{OUTSIDE}/24", "dev", "eth0"])
    outside.run(["ip", "link", "set", "eth0", "up"])
    outside.run(["ip", "route", "add", "198.51.100.0/24", "via", NODE_PUBLIC])
    node.run(["ip", "addr", "add", f"{NODE_PUBLIC}/24", "dev", "pub0"])
    node.run(["ip", "link", "set", "pub0", "up"])
    node.run(["ip", "route", "add", "default", "via", OUTSIDE])
    node.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    return outside


def node_host(topo: Topology) -> VM:
    """The node namespace as a VM record, so the probe and server helpers take it."""
    node = topo.node
    return VM(name="node", ns=node.ns, port_id="", tap="", mac="", ipv4=node.ipv4,
              ipv6=None, prefix4=24, prefix6=64, topology=topo)


def build(topo: Topology) -> tuple[dict[str, VM], dict[str, Any]]:
    vms = {name: topo.add_vm(name, ipv6=None) for name in ("a", "b", "c")}
    vms["outside"] = wire_outside(topo)
    # A VM reaching its own floating IP is bridged back out of its own port.
    topo.node.run(["ip", "link", "set", "dev", vms["a"].tap, "type", "bridge_slave",
                   "hairpin", "on"])
    policy = {"security_groups": SG,
              "ports": [port(vms["a"], "sg-web", FLOAT_A), port(vms["b"], "sg-web"),
                        port(vms["c"], "sg-mute")]}
    return vms, policy


@pytest.fixture(scope="module", params=ZONES)
def nat_node(request: pytest.FixtureRequest,
             tmp_path_factory) -> Iterator[tuple[Topology, dict[str, VM], dict[str, Server]]]:
    """One NAT node, with its servers, for the tests that only send traffic;
    once with conntrack zones (each flow must then meet its entry in the zone
    of the VM's bridge, from whichever side its packets come) and once without."""
    require_kernel()
    with Topology() as topo:
        vms, policy = build(topo)
        servers = {"a": serve(vms["a"], tcp=[80, 81]),
                   "outside": serve(vms["outside"], tcp=[8080]),
                   # metadata_host is loopback (the default): REDIRECT to the bridge
                   # address, so the service listens on 0.0.0.0 as nova-api-metadata does.
                   "node": serve(node_host(topo), tcp=[METADATA_PORT], udp=[53])}
        agent = AgentProcess(tmp_path_factory.mktemp("nat"), topo.node.ns, policy,
                             extra_conf=nat_conf(request.param))
        try:
            agent.start()
            yield topo, vms, servers
        finally:
            agent.stop()
            assert_root_clean()


# ---------------------------------------------------------------- floating IPs

def test_outside_reaches_a_vm_through_its_floating_ip(nat_node) -> None:
    _, vms, servers = nat_node
    # A completed handshake means the replies came back from FLOAT_A.
    assert tcp_connect(vms["outside"], FLOAT_A, 80)
    assert servers["a"].saw(OUTSIDE, "tcp", 80, timeout=1)     # the real client address


def test_floating_ip_does_not_bypass_the_security_groups(nat_node) -> None:
    _, vms, _ = nat_node
    assert not tcp_connect(vms["outside"], FLOAT_A, 81, timeout=FAIL)   # sg-web: 80 only


def test_outbound_leaves_with_the_floating_ip_or_the_host_address(nat_node) -> None:
    _, vms, servers = nat_node
    assert tcp_connect(vms["a"], OUTSIDE, 8080)
    assert tcp_connect(vms["b"], OUTSIDE, 8080)
    assert servers["outside"].sources("tcp", 8080) == {FLOAT_A, NODE_PUBLIC}


def test_routed_egress_is_checked_by_the_security_groups(nat_node) -> None:
    _, vms, _ = nat_node
    assert not tcp_connect(vms["c"], OUTSIDE, 8080, timeout=FAIL)       # sg-mute: no egress


def test_a_vm_reaches_its_own_floating_ip(nat_node) -> None:
    _, vms, servers = nat_node
    assert tcp_connect(vms["a"], FLOAT_A, 80)
    assert servers["a"].saw(FLOAT_A, "tcp", 80, timeout=1)     # hairpin: SNATed to the float


def test_the_node_itself_reaches_a_floating_ip(nat_node) -> None:
    topo, _, servers = nat_node
    assert tcp_connect(node_host(topo), FLOAT_A, 80)
    assert servers["a"].saw(NODE_PUBLIC, "tcp", 80, timeout=1)


# ---------------------------------------------------------------- node services

def test_metadata_request_reaches_the_metadata_service(nat_node) -> None:
    topo, vms, servers = nat_node
    with input_policy_drop(topo):           # only the agent's accept lets it in
        assert tcp_connect(vms["b"], "169.254.169.254", 80)
        assert tcp_connect(vms["a"], "169.254.169.254", 80)
        assert not tcp_connect(vms["outside"], NODE_PUBLIC, METADATA_PORT, timeout=FAIL)
    # The service identifies the instance by its fixed IP, floating IP or not.
    assert servers["node"].sources("tcp", METADATA_PORT) == {vms["a"].ipv4, vms["b"].ipv4}


def test_dns_and_dhcp_ports_are_open_on_the_bridge_only(nat_node) -> None:
    topo, vms, _ = nat_node
    with input_policy_drop(topo):
        assert udp_probe(vms["b"], topo.node.ipv4, 53)
        assert not udp_probe(vms["outside"], NODE_PUBLIC, 53, timeout=FAIL)


class input_policy_drop:  # noqa: N801 - reads as a statement in a `with`
    """Set the node's INPUT policy to DROP (as on Fedora) for the block's duration.

    The policy of a built-in chain is the operator's, never the agent's; the
    test sets and restores it to show what the agent's accepts do.
    """

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def __enter__(self) -> None:
        self.topo.node.run(["iptables-legacy", "-P", "INPUT", "DROP"])

    def __exit__(self, *exc: object) -> None:
        self.topo.node.run(["iptables-legacy", "-P", "INPUT", "ACCEPT"])


# ---------------------------------------------------------------- DMZ

@pytest.mark.parametrize("zones", ZONES)
def test_the_dmz_sees_fixed_ips_both_ways(tmp_path, zones: bool) -> None:
    """With the outside in dmz_cidr (and a route back to the fixed range), a
    VM's flow leaves with its fixed IP, and the outside reaches a VM's fixed
    IP directly. With zones, the packets routed in to the fixed IP must get
    the zone of the VM's bridge, or the VM's flows never see their replies.
    """
    require_kernel()
    with Topology() as topo:
        vms, policy = build(topo)
        vms["outside"].run(["ip", "route", "add", "10.0.0.0/24", "via", NODE_PUBLIC])
        conf = nat_conf(zones).replace("dhcp_bridges", "dmz_cidr = 203.0.113.0/24\ndhcp_bridges")
        agent = AgentProcess(tmp_path, topo.node.ns, policy, extra_conf=conf)
        outside = serve(vms["outside"], tcp=[8080])
        inside = serve(vms["b"], tcp=[80])
        try:
            agent.start()
            assert tcp_connect(vms["a"], OUTSIDE, 8080)
            assert tcp_connect(vms["b"], OUTSIDE, 8080)
            assert outside.sources("tcp", 8080) == {vms["a"].ipv4, vms["b"].ipv4}
            assert tcp_connect(vms["outside"], vms["b"].ipv4, 80)
            assert inside.saw(OUTSIDE, "tcp", 80, timeout=1)
        finally:
            outside.stop()
            inside.stop()
            agent.stop()
            assert_root_clean()


# ---------------------------------------------------------------- removal

class HeldConnection:
    """A TCP connection from `vm` kept open, to test what happens to a live flow."""

    SCRIPT = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
        "for line in sys.stdin:\n"
        "    try:\n"
        "        s.sendall(b'ping'); ok = s.recv(4) == b'ping'\n"
        "    except OSError:\n"
        "        ok = False\n"
        "    print('alive' if ok else 'dead', flush=True)\n"
    )

    def __init__(self, vm: VM, dst: str, port: int) -> None:
        self.proc = popen_in(vm.ns, [sys.executable, "-I", "-S", "-c", self.SCRIPT, dst,
                                     str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def alive(self) -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == "alive"

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.mark.parametrize("zones", ZONES)
def test_removing_a_floating_ip_cuts_its_flows(tmp_path, zones: bool) -> None:
    require_kernel()
    with Topology() as topo:
        vms, policy = build(topo)
        agent = AgentProcess(tmp_path, topo.node.ns, policy, extra_conf=nat_conf(zones))
        try:
            agent.start()
            serve(vms["a"], tcp=[80])
            held = HeldConnection(vms["outside"], FLOAT_A, 80)
            try:
                assert held.alive()
                policy["ports"][0]["floating_ips"] = []
                agent.apply_policy(policy)
                assert f"-d {FLOAT_A}/32" not in agent.save()
                assert not held.alive()              # the established flow is gone too
            finally:
                held.close()
            assert not tcp_connect(vms["outside"], FLOAT_A, 80, timeout=FAIL)
            # Flows to FLOAT_A may exist (the probes above made them), but none
            # is translated to the VM any more.
            flows = run_in(topo.node.ns, ["conntrack", "-L", "-d", FLOAT_A]).stdout
            assert f"src={vms['a'].ipv4} " not in flows
        finally:
            agent.stop()
            assert_root_clean()


# ---------------------------------------------------------------- canonical text

APPLY_TWICE = """
import json, sys
from agent.compiler import NatSettings, Settings, Snapshot, compile_ruleset
from agent.dataplane.engine import Engine
from agent.dataplane.restore_backend import RestoreBackend
from agent.model import parse_policy
spec = json.load(sys.stdin)
nat = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["nat"].items()}
settings = Settings(nat=NatSettings(**nat))
snap = Snapshot(parse_policy(spec["policy"]), frozenset(spec["devices"]), settings,
                {d: "br0" for d in spec["devices"]}, {"br0": 4097})
ruleset = compile_ruleset(snap).ruleset
reports = []
for _ in range(2):  # a fresh engine each time: the second one reads the kernel
    engine = Engine(RestoreBackend("iptables-legacy"), settings.names, settings.families)
    reports.append(engine.apply(ruleset, refresh=True).tables_written)
print(json.dumps(reports))
"""


@pytest.mark.parametrize("metadata_host", ["127.0.0.1", "10.0.0.1"])
def test_second_apply_writes_nothing(tmp_path, metadata_host: str) -> None:
    """Our rule text is exactly what iptables-save prints, for every rule form
    (the raw table's NAT zone rules included)."""
    require_kernel()
    ns = f"hfwt-{os.getpid()}-{secrets.token_hex(2)}-canon"
    nat = {"fixed_range": "10.0.0.0/24", "routing_source_ip": NODE_PUBLIC,
           "public_interface": "pub0", "dmz_cidr": ["192.0.2.0/24", "0.0.0.0/0"],
           "metadata_host": metadata_host, "dhcp_bridges": ["br0", "br1"]}
    policy = {"security_groups": SG, "ports": [
        {"id": "p-a", "device": "tapa", "mac_address": "fa:16:3e:00:00:0a",
         "fixed_ips": ["10.0.0.5"], "security_groups": ["sg-web"],
         "floating_ips": [FLOAT_A, "198.51.100.11"]},
        {"id": "p-b", "device": "tapb", "mac_address": "fa:16:3e:00:00:0b",
         "fixed_ips": ["10.0.0.6"], "security_groups": ["sg-web"]}]}
    spec = {"nat": nat, "policy": policy, "devices": ["tapa", "tapb"]}
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = run_in(ns, [sys.executable, "-c", APPLY_TWICE], input=json.dumps(spec),
                      cwd=str(Path(__file__).resolve().parents[2]))
        first, second = json.loads(proc.stdout)
        assert "nat/v4" in first and "filter/v4" in first and "raw/v4" in first
        assert second == []
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
