"""Trusted ports in the kernel: a `network:*` device's traffic passes, a stranger's does not.

Why: on a Linux bridge node Neutron's DHCP port is a tap on the network's
bridge that no security group reply describes. Learnt as trusted
(agent/sources/device_details.py -> `Policy.trusted_devices`), its packets
must pass both ways unfiltered, with no anti-spoofing, while an unknown tap
next to it stays dropped and a VM's own rules still hold. The ruleset is
compiled and applied with the engine inside the node namespace, as the
daemon's writer does, and probed with real packets.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.dataplane.engine import Engine
from agent.dataplane.restore_backend import RestoreBackend
from agent.model import Policy, parse_policy
from agent.vocab.names import Names
from tests.conformance.helpers import FAIL, PASS, connect, spoof_send
from tests.support.agent import assert_root_clean
from tests.support.in_netns import call_in_netns
from tests.support.topology import VM, Topology, kernel_skip_reason, serve

pytestmark = pytest.mark.kernel


def in_node(topo: Topology, fn: Callable[[], Any]) -> Any:
    """Run `fn` in a thread that entered the node namespace, as the daemon's writer."""
    return call_in_netns(topo.node.ns, fn, timeout=60)


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[Topology, dict[str, VM]]]:
    reason = kernel_skip_reason() or (
        None if shutil.which("iptables-legacy-restore") else "iptables-legacy is not installed")
    if reason:
        pytest.skip(reason)
    with Topology() as topo:
        vms = {"a": topo.add_vm("a", ipv4="10.0.0.10", ipv6=None),
               "dhcp": topo.add_vm("dhcp", ipv4="10.0.0.2", ipv6=None, tap="tapdhcp0000-0d"),
               "stranger": topo.add_vm("stranger", ipv4="10.0.0.66", ipv6=None,
                                       tap="tapstrange-66"),
               "r": topo.add_vm("r", ipv4="10.0.0.50", ipv6=None, tap="uplr0")}
        for vm in vms.values():
            serve(vm, tcp=(22, 80), udp=(9999,))
        yield topo, vms
    assert_root_clean()


def apply(topo: Topology, vms: dict[str, VM], trusted: frozenset[str]) -> None:
    a = vms["a"]
    policy: Policy = parse_policy({
        "security_groups": {"sg-a": [{"direction": "ingress", "ethertype": "IPv4",
                                      "protocol": "tcp", "port_range_min": 22,
                                      "port_range_max": 22},
                                     {"direction": "egress", "ethertype": "IPv4"}]},
        "ports": [{"id": a.port_id, "device": a.tap, "mac_address": a.mac,
                   "fixed_ips": [a.ipv4], "security_groups": ["sg-a"]}]})
    devices = frozenset(vm.tap for vm in vms.values() if vm.tap.startswith("tap"))
    ruleset = compile_ruleset(Snapshot(replace(policy, trusted_devices=trusted), devices,
                                       Settings(enable_ipv6=False))).ruleset
    in_node(topo, lambda: Engine(RestoreBackend("iptables-legacy"), Names(), (4,))
            .apply(ruleset, refresh=True))


def test_a_trusted_device_passes_unfiltered_and_a_stranger_stays_dropped(node) -> None:
    topo, vms = node
    a, dhcp, stranger, r = vms["a"], vms["dhcp"], vms["stranger"], vms["r"]
    apply(topo, vms, frozenset())
    assert connect(dhcp, "tcp", r.ipv4, 80, FAIL) == "timeout"   # an unknown device
    apply(topo, vms, frozenset({dhcp.tap}))
    assert connect(dhcp, "tcp", r.ipv4, 80, PASS) == "ok"        # out of it
    assert connect(r, "tcp", dhcp.ipv4, 80, PASS) == "ok"        # into it, any port
    assert connect(stranger, "tcp", r.ipv4, 80, FAIL) == "timeout"
    # The VM's own rules still decide what reaches it, from the trusted port too.
    assert connect(dhcp, "tcp", a.ipv4, 22, PASS) == "ok"
    assert connect(dhcp, "tcp", a.ipv4, 80, FAIL) == "timeout"


def test_a_trusted_device_has_no_anti_spoofing_as_in_neutron(node) -> None:
    topo, vms = node
    apply(topo, vms, frozenset({vms["dhcp"].tap}))
    r_server = serve(vms["r"], udp=(9998,))
    assert spoof_send(vms["dhcp"], "10.0.0.3", vms["r"], r_server, port=9998, timeout=PASS)
