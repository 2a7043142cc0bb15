"""flows_to_cut: which conntrack entries go when a permission goes (pure).

The traffic side (an established flow really stops) is in
tests/conformance/test_connection_state.py; these pin the cut lists,
including the fast paths (unchanged policy, unchanged members).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agent.compiler import Snapshot
from agent.compiler.flows import flows_to_cut
from agent.dataplane.flowcut import describe
from agent.model import Policy, parse_policy
from agent.vocab.flows import FlowCut

BRIDGES = {"tapa": "br0", "tapb": "br0", "tapc": "br0"}
ZONES = {"br0": 4097}


def doc(**groups: list[dict[str, Any]]) -> dict[str, Any]:
    rules = {"sg-web": [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                         "port_range_min": 80, "remote_group_id": "sg-client"},
                        {"direction": "egress", "ethertype": "IPv4"}],
             "sg-client": [{"direction": "egress", "ethertype": "IPv4"}]}
    rules.update(groups)
    return {"security_groups": rules,
            "ports": [{"id": "a", "device": "tapa", "mac_address": "fa:16:3e:00:00:0a",
                       "fixed_ips": ["10.0.0.10"], "security_groups": ["sg-web"]},
                      {"id": "b", "device": "tapb", "mac_address": "fa:16:3e:00:00:0b",
                       "fixed_ips": ["10.0.0.11"], "security_groups": ["sg-client"]},
                      {"id": "c", "device": "tapc", "mac_address": "fa:16:3e:00:00:0c",
                       "fixed_ips": ["10.0.0.12"], "security_groups": ["sg-client"]}],
            "sg_member_ips": {"sg-client": {"IPv4": ["10.0.0.11", "10.0.0.12"]}}}


def snap(policy: Policy, devices: set[str] | None = None) -> Snapshot:
    return Snapshot(policy, frozenset(devices if devices is not None else BRIDGES),
                    bridges=BRIDGES, zones=ZONES)


def cuts(old: Snapshot, new: Snapshot) -> list[str]:
    return sorted(f"{describe(c)} ({c.reason})" for c in flows_to_cut(old, new))


def test_nothing_changed_cuts_nothing() -> None:
    policy = parse_policy(doc())
    assert flows_to_cut(snap(policy), snap(policy)) == []
    assert flows_to_cut(None, snap(policy)) == []


def test_a_tap_that_goes_loses_its_flows_in_its_zone_and_only_its_own() -> None:
    policy = parse_policy(doc())
    assert cuts(snap(policy), snap(policy, {"tapa", "tapc"})) == [
        "-f ipv4 -d 10.0.0.11 -w 4097 (port b removed)",
        "-f ipv4 -s 10.0.0.11 -w 4097 (port b removed)",
    ]


def test_a_removed_rule_cuts_that_protocol_and_direction_of_its_ports() -> None:
    old = parse_policy(doc())
    new = parse_policy(doc(**{"sg-web": [{"direction": "egress", "ethertype": "IPv4"}]}))
    assert cuts(snap(old), snap(new)) == [
        "-f ipv4 -p 6 -d 10.0.0.10 -w 4097 (a rule of port a was removed)"]


def test_a_removed_member_cuts_its_flows_with_the_ports_that_admitted_it() -> None:
    old = parse_policy(doc())
    members = {"sg-client": {4: frozenset({"10.0.0.11/32"})}}
    new = replace(old, members=members)
    assert cuts(snap(old), snap(new)) == [
        "-f ipv4 -p 6 -s 10.0.0.12 -d 10.0.0.10 -w 4097 "
        "(a member of sg-client was removed)"]


def test_without_zones_cuts_match_every_zone() -> None:
    policy = parse_policy(doc())
    old, new = snap(policy), snap(policy, {"tapa", "tapb"})
    settings = replace(old.settings, conntrack_zones=False)
    found = flows_to_cut(replace(old, settings=settings), replace(new, settings=settings))
    assert found and all(isinstance(c, FlowCut) and c.zone is None for c in found)


def test_a_removed_address_group_cidr_cuts_its_network_with_the_ports_that_admitted_it() -> None:
    """Issue 14.5: a CIDR an address group lost was skipped (only host members
    were cut), so flows from the revoked network stayed established."""
    rule = {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 22, "remote_address_group_id": "ag-ops"}
    raw = doc(**{"sg-web": [rule]})
    old = parse_policy({**raw, "address_groups": {"ag-ops": ["10.1.0.0/16", "10.9.9.9/32"]}})
    new = parse_policy({**raw, "address_groups": {"ag-ops": ["10.9.9.9/32"]}})
    assert cuts(snap(old), snap(new)) == [
        "-f ipv4 -p 6 -s 10.1.0.0/16 -d 10.0.0.10 -w 4097 (a member of ag-ops was removed)"]
