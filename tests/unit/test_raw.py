"""The raw table: NOTRACK of stateless ports stays scoped to the port.

Why: a stateless port once put `-d <address> -j CT --notrack` in raw
PREROUTING and OUTPUT with no bridge, device or zone match. An allowed
address pair 0.0.0.0/0 then untracked every IPv4 packet of the node (and
iptables-save prints that rule without `-d 0.0.0.0/0`, so the table never
matched what was written), and a tenant reusing the address on another
bridge lost its return traffic. The kernel side is in
tests/reliability/test_hostile_policy.py.
"""

from __future__ import annotations

from typing import Any

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.model import parse_policy
from agent.vocab.rules import IptablesRule, Target, jump, opt

NOTRACK = jump("CT", opt("--notrack"))

STATELESS = [{"direction": "ingress", "protocol": "tcp", "port_range_min": 22,
              "stateful": False},
             {"direction": "egress", "stateful": False}]
STATEFUL = [{"direction": "ingress", "protocol": "tcp", "port_range_min": 22}]


def port(pid: str, ip: str, group: str, **extra: Any) -> dict[str, Any]:
    return {"id": pid, "device": f"tap{pid}", "mac_address": "fa:16:3e:00:00:01",
            "fixed_ips": [ip], "security_groups": [group], **extra}


def raw_rules(ports: list[dict[str, Any]], bridges: dict[str, str],
              family: int = 4) -> dict[str, tuple[IptablesRule, ...]]:
    policy = parse_policy({"security_groups": {"sl": STATELESS, "sf": STATEFUL},
                           "ports": ports})
    assert policy.errors == ()
    zones = {b: 4097 + i for i, b in enumerate(sorted(set(bridges.values())))}
    snap = Snapshot(policy, frozenset(bridges), Settings(), bridges, zones)
    return dict(compile_ruleset(snap).ruleset.tables[(family, "raw")].chains)


def head(rule: IptablesRule) -> str:
    """The addresses and interfaces, as iptables-save prints them before the comment."""
    return " ".join(word for flag, value, negated in rule.header()
                    for word in (["!"] if negated else []) + [flag, value])


def notrack(chains: dict[str, tuple[IptablesRule, ...]]) -> list[IptablesRule]:
    return [r for rules in chains.values() for r in rules if r.target == NOTRACK]


def scoped(rule: IptablesRule, device: str, bridge: str) -> bool:
    """The rule matches only what the port sends, or what its bridge carries."""
    physdev = rule.match("physdev")
    sent = physdev is not None and physdev.option("--physdev-in") == opt("--physdev-in", device)
    return sent or bridge in (rule.in_iface, rule.out_iface)


def zone(number: int) -> Target:
    return jump("CT", opt("--zone", number))


def zone_rules(chains: dict[str, tuple[IptablesRule, ...]]) -> list[IptablesRule]:
    """The rules that put a bridge in its zone, wherever the zone tree keeps them."""
    return [r for rules in chains.values() for r in rules
            if r.target.name == "CT" and r.target != NOTRACK]


def test_every_notrack_rule_names_the_port_or_its_bridge() -> None:
    chains = raw_rules([port("s", "10.0.0.5", "sl"), port("t", "10.0.0.6", "sf")],
                       {"taps": "brA", "tapt": "brA"})
    assert notrack(chains) and all(scoped(r, "taps", "brA") for r in notrack(chains))
    pre, out = chains["hostfw-PREROUTING"], chains["hostfw-OUTPUT"]
    assert [head(r) for r in pre if r.target == NOTRACK] == ["", "-d 10.0.0.5/32 -i brA"]
    assert [head(r) for r in out if r.target == NOTRACK] == ["-d 10.0.0.5/32 -o brA"]
    assert any(head(r) == "-i brA" and r.target == zone(4097) for r in zone_rules(chains))


def test_a_wide_allowed_address_pair_untracks_nothing_but_the_port_itself() -> None:
    """0.0.0.0/0 (and ::/0, and any network wider than a host) gets no
    destination rule: only the port's own sends (physdev-in) and its host
    addresses on its bridge are untracked."""
    pairs = [{"ip_address": "0.0.0.0/0"}, {"ip_address": "192.168.0.0/16"},
             {"ip_address": "10.9.9.9"}, {"ip_address": "::/0"}]
    ports = [port("s", "10.0.0.5", "sl", allowed_address_pairs=pairs)]
    for family in (4, 6):
        rules = notrack(raw_rules(ports, {"taps": "brA"}, family))
        assert rules and all(scoped(r, "taps", "brA") for r in rules), rules
        assert all(address is None or address.endswith(("/32", "/128"))
                   for r in rules for address in (r.src, r.dst)), rules
    assert sorted(head(r) for r in notrack(raw_rules(ports, {"taps": "brA"}))) == [
        "", "-d 10.0.0.5/32 -i brA", "-d 10.0.0.5/32 -o brA", "-d 10.9.9.9/32 -i brA",
        "-d 10.9.9.9/32 -o brA"]


def test_a_reused_address_on_another_bridge_stays_tracked() -> None:
    chains = raw_rules([port("s", "10.0.0.5", "sl"), port("t", "10.0.0.5", "sf")],
                       {"taps": "brA", "tapt": "brB"})
    assert notrack(chains) and not any("brB" in r.text for r in notrack(chains))
    assert any(head(r) == "-i brB" and r.target == zone(4098) for r in zone_rules(chains))


def test_a_stateless_port_off_any_bridge_untracks_only_its_own_sends() -> None:
    rules = notrack(raw_rules([port("s", "10.0.0.5", "sl")], {"taps": ""}))
    assert [head(r) for r in rules] == [""]
    assert "-m physdev --physdev-in taps" in rules[0].text
