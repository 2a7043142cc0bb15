"""The raw table's zone rules go through a dispatch tree on the bridge name.

Why: one `-i <bridge> -j CT --zone N` rule per bridge made every packet of a
node with hundreds of networks walk hundreds of raw rules before conntrack.
The tree keeps the walk to a few levels, gives each bridge its own zone
whatever the depth, leaves other bridges in zone 0, and the zones still read
back from the kernel's text after a restart (including an older agent's
rules kept in `<p>-PREROUTING`).
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.compiler.zones import zones_from_chains
from agent.model import parse_policy
from agent.vocab.rules import IptablesRule

SETTINGS = Settings()
NAMES = SETTINGS.names


def raw(bridge_count: int) -> tuple[Mapping[str, tuple[IptablesRule, ...]], dict[str, int]]:
    """The IPv4 raw chains of a node with one port on each of `bridge_count` bridges."""
    bridges = {f"tap{i:05d}": f"brq{i * 7919 % 100003:08x}" for i in range(bridge_count)}
    ports = [{"id": f"p{i}", "device": dev, "mac_address": "fa:16:3e:00:00:01",
              "fixed_ips": [f"10.{i >> 8}.{i & 255}.2"], "security_groups": []}
             for i, dev in enumerate(bridges)]
    policy = parse_policy({"security_groups": {}, "ports": ports})
    assert policy.errors == ()
    zones = {b: 4097 + i for i, b in enumerate(sorted(set(bridges.values())))}
    snap = Snapshot(policy, frozenset(bridges), SETTINGS, bridges, zones)
    return compile_ruleset(snap).ruleset.tables[(4, "raw")].chains, zones


def walk(chains: Mapping[str, tuple[IptablesRule, ...]], root: str, bridge: str,
         out: bool = False) -> tuple[str | None, int]:
    """The zone a packet of `bridge` gets from `root`, and the rules it evaluates."""
    chain, evaluated = NAMES.chain(root), 0
    while True:
        for rule in chains[chain]:
            evaluated += 1
            name = rule.out_iface if out else rule.in_iface
            if name is not None and not (bridge.startswith(name[:-1]) if name.endswith("+")
                                         else bridge == name):
                continue
            if rule.target.goto:
                chain = rule.target.name
                break
            if rule.target.name == "CT":
                return rule.target.options[0].values[0], evaluated
            return None, evaluated          # RETURN: an unknown bridge stays in zone 0
        else:
            raise AssertionError(f"{bridge} fell off the end of {chain}")


def test_every_bridge_gets_its_zone_through_a_short_walk() -> None:
    chains, zones = raw(600)
    for root, out in (("zone-in", False), ("zone-out", True)):
        walked = []
        for bridge, zone in zones.items():
            got, evaluated = walk(chains, root, bridge, out)
            assert got == str(zone), bridge
            walked.append(evaluated)
        assert max(walked) < 60, max(walked)        # a linear list would be up to 600
        assert walk(chains, root, "brqnobody", out)[0] is None
    assert max(len(rules) for name, rules in chains.items()
               if name.startswith(NAMES.chain("zone-"))) <= 34


def test_the_hooks_jump_into_the_trees_after_the_notrack_rules() -> None:
    chains, _ = raw(3)
    assert [r.target.name for r in chains[NAMES.chain("PREROUTING")]] == [NAMES.chain("zone-in")]
    assert [r.target.name for r in chains[NAMES.chain("OUTPUT")]] == [NAMES.chain("zone-out")]


def test_zones_read_back_from_the_kernel_text_of_the_trees_and_of_older_agents() -> None:
    chains, zones = raw(40)
    kernel = {name: [rule.text for rule in rules] for name, rules in chains.items()}
    assert zones_from_chains(kernel, NAMES) == zones
    older = {NAMES.chain("PREROUTING"): ["-i br7 -m comment --comment x -j CT --zone 4200"]}
    assert zones_from_chains(older, NAMES) == {"br7": 4200}
