"""Trusted ports in the compiler: Neutron's `network:*` devices pass, unfiltered.

Why: Neutron never returns its DHCP and router ports from
`security_group_info_for_devices`, so on an all-in-one or network node their
taps would otherwise fall under `unknown_device_policy = drop`. Neutron's
iptables driver ACCEPTs them both ways with no anti-spoofing; here they get
RETURN in both dispatch trees (the sg-chain then ACCEPTs), and no chains.
"""

from __future__ import annotations

from dataclasses import replace

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.model import Policy, parse_policy
from agent.vocab.rules import IptablesRule

PORT = "5e4f0b1a-9c1d-4c3e-8f00-000000000001"   # device tap5e4f0b1a-9c
DHCP_TAP = "tapdhcp0000-01"
ROUTER_TAP = "tapqr00000-02"
STRANGER = "tapstranger-03"


def policy(trusted: frozenset[str] = frozenset()) -> Policy:
    doc = {"security_groups": {"sg": [{"direction": "egress", "ethertype": "IPv4"}]},
           "ports": [{"id": PORT, "mac_address": "fa:16:3e:00:00:01",
                      "fixed_ips": ["10.0.0.5"], "security_groups": ["sg"]}]}
    parsed = parse_policy(doc)
    assert parsed.errors == ()
    return replace(parsed, trusted_devices=trusted)


def tree(trusted: frozenset[str], devices: set[str],
         root: str = "hostfw-from") -> list[IptablesRule]:
    compiled = compile_ruleset(Snapshot(policy(trusted), frozenset(devices),
                                        Settings(enable_ipv6=False)))
    return [rule for chain, rules in compiled.ruleset.tables[(4, "filter")].chains.items()
            if chain == root for rule in rules]


def verdicts(rules: list[IptablesRule]) -> dict[str, str]:
    """device -> the target of its dispatch rule ("" for the catch-all)."""
    out = {}
    for rule in rules:
        physdev = rule.match("physdev")
        options = physdev.options if physdev else ()
        device = next((o.values[0] for o in options
                       if o.flag in ("--physdev-in", "--physdev-out")), "")
        out[device] = rule.target.name
    return out


def test_a_trusted_device_passes_both_trees_and_strangers_stay_dropped() -> None:
    devices = {"tap5e4f0b1a-9c", DHCP_TAP, ROUTER_TAP, STRANGER}
    trusted = frozenset({DHCP_TAP, ROUTER_TAP})
    for root in ("hostfw-from", "hostfw-to"):
        got = verdicts(tree(trusted, devices, root))
        assert got[DHCP_TAP] == got[ROUTER_TAP] == "RETURN", got
        assert got[""] == "DROP" and STRANGER not in got, got
        assert got["tap5e4f0b1a-9c"].startswith("hostfw-"), got   # its port chain


def test_without_the_trust_the_same_device_is_an_unknown_device() -> None:
    got = verdicts(tree(frozenset(), {"tap5e4f0b1a-9c", DHCP_TAP}))
    assert DHCP_TAP not in got and got[""] == "DROP"


def test_trust_needs_the_device_present_and_never_overrides_a_port() -> None:
    # Not on the node: no rule. A device that is a port's: filtered as the port.
    got = verdicts(tree(frozenset({DHCP_TAP, "tap5e4f0b1a-9c"}), {"tap5e4f0b1a-9c"}))
    assert DHCP_TAP not in got
    assert got["tap5e4f0b1a-9c"] == "hostfw-o5e4f0b1a-9c"


def test_trusted_devices_get_no_chains_of_their_own() -> None:
    devices = {"tap5e4f0b1a-9c", DHCP_TAP}
    plain = compile_ruleset(Snapshot(policy(), frozenset(devices), Settings(enable_ipv6=False)))
    trusted = compile_ruleset(Snapshot(policy(frozenset({DHCP_TAP})), frozenset(devices),
                                       Settings(enable_ipv6=False)))
    assert set(plain.ruleset.tables[(4, "filter")].chains) == \
        set(trusted.ruleset.tables[(4, "filter")].chains)
    assert plain.active_ports == trusted.active_ports == (PORT,)
