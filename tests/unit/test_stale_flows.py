"""FlowAudit: which conntrack entries the current policy no longer allows (pure).

The kernel side (real entries dumped and deleted) is in
tests/functional/test_flowcut.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.compiler import Snapshot
from agent.compiler.stale_flows import FlowAudit
from agent.model import parse_policy
from agent.vocab.flows import Flow

ZONE = 4097
TCP, UDP, ICMP = 6, 17, 1


def port(name: str, ip: str, *groups: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "device": f"tap{name}", "mac_address": "fa:16:3e:00:00:0a",
            "fixed_ips": [ip], "security_groups": list(groups), **extra}


def audit(*ports: dict[str, Any], zones: bool = True, node: tuple[str, ...] = ("10.0.0.1",),
          zone_of: dict[str, int] | None = None, **groups: list[dict[str, Any]]) -> FlowAudit:
    policy = parse_policy({"security_groups": groups, "ports": list(ports),
                           "address_groups": {"ag-ops": ["10.1.0.0/16"]},
                           "sg_member_ips": {"sg-peers": {"IPv4": ["10.0.0.20"]}}})
    devices = frozenset(p["device"] for p in ports)
    snap = Snapshot(policy, devices, bridges=dict.fromkeys(devices, "br0"),
                    zones={"br0": ZONE} if zone_of is None else zone_of)
    if not zones:
        snap = replace(snap, settings=replace(snap.settings, conntrack_zones=False))
    return FlowAudit(snap, node)


def tcp(src: str, dst: str, dport: int, zone: int = ZONE, **extra: Any) -> Flow:
    return Flow(4, TCP, src, dst, sport=40000, dport=dport, zone=zone, **extra)


WEB = [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
        "port_range_min": 80, "port_range_max": 80},
       {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
        "port_range_min": 22, "port_range_max": 22, "remote_address_group_id": "ag-ops"},
       {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp",
        "port_range_min": 8, "remote_group_id": "sg-peers"},
       {"direction": "egress", "ethertype": "IPv4", "protocol": "tcp",
        "remote_ip_prefix": "10.0.0.0/24"}]


@pytest.mark.parametrize(("flow", "allowed"), [
    (tcp("10.0.0.20", "10.0.0.10", 80), True),
    (tcp("10.0.0.20", "10.0.0.10", 22), False),            # 22 only from ag-ops
    (tcp("10.1.7.7", "10.0.0.10", 22), True),               # inside the address group
    (tcp("10.0.0.10", "10.0.0.30", 5432), True),            # egress inside 10.0.0.0/24
    (tcp("10.0.0.10", "192.0.2.1", 443), False),            # egress elsewhere
    (Flow(4, UDP, "10.0.0.10", "192.0.2.1", sport=5000, dport=53, zone=ZONE), False),
    (Flow(4, ICMP, "10.0.0.20", "10.0.0.10", icmp_type=8, icmp_code=0, zone=ZONE), True),
    (Flow(4, ICMP, "10.0.0.30", "10.0.0.10", icmp_type=8, icmp_code=0, zone=ZONE), False),
    (Flow(4, ICMP, "10.0.0.20", "10.0.0.10", icmp_type=13, icmp_code=0, zone=ZONE), False),
    # Left alone: the node's own traffic to the VM, another zone, NAT, DHCP.
    (tcp("10.0.0.1", "10.0.0.10", 22), True),
    (tcp("10.0.0.20", "10.0.0.10", 22, zone=0), True),
    (tcp("10.0.0.20", "10.0.0.10", 22, nat=True), True),
    (Flow(4, UDP, "10.0.0.10", "10.0.0.1", sport=68, dport=67, zone=ZONE), True),
    # Not a port address at all: undecidable here, never cut.
    (tcp("10.0.0.20", "10.0.0.99", 22), True),
])
def test_verdicts_follow_the_port_chains(flow: Flow, allowed: bool) -> None:
    verdict = audit(port("a", "10.0.0.10", "sg-web"), **{"sg-web": WEB}).verdict(flow)
    assert (verdict is None) == allowed, verdict


def test_a_flow_between_two_ports_needs_both_sides() -> None:
    check = audit(port("a", "10.0.0.10", "sg-web"), port("b", "10.0.0.20", "sg-b"),
                  **{"sg-web": WEB, "sg-b": []})
    assert check.verdict(tcp("10.0.0.20", "10.0.0.10", 80)) == \
        "no egress rule of port b allows it"
    assert check.verdict(tcp("10.0.0.30", "10.0.0.10", 80)) is None


def test_ports_the_chains_do_not_filter_are_left_alone() -> None:
    stateless = [{"direction": "ingress", "ethertype": "IPv4", "stateful": False}]
    check = audit(port("a", "10.0.0.10", "sg-none", port_security_enabled=False),
                  port("b", "10.0.0.20", "sg-none", device_owner="network:dhcp"),
                  port("c", "10.0.0.30", "sg-stateless"),
                  **{"sg-none": [], "sg-stateless": stateless})
    for dst in ("10.0.0.10", "10.0.0.20", "10.0.0.30"):
        assert check.verdict(tcp("192.0.2.1", dst, 22)) is None


def test_without_zones_every_zone_is_judged_and_shared_addresses_are_not() -> None:
    check = audit(port("a", "10.0.0.10", "sg-none"), zones=False, **{"sg-none": []})
    assert check.verdict(tcp("192.0.2.1", "10.0.0.10", 22, zone=0)) is not None
    twins = audit(port("a", "10.0.0.10", "sg-none"), port("b", "10.0.0.10", "sg-none"),
                  zones=False, **{"sg-none": []})
    assert twins.verdict(tcp("192.0.2.1", "10.0.0.10", 22, zone=0)) is None


def test_a_port_without_a_known_zone_is_left_alone() -> None:
    check = audit(port("a", "10.0.0.10", "sg-none"), zone_of={}, **{"sg-none": []})
    assert check.verdict(tcp("192.0.2.1", "10.0.0.10", 22)) is None
