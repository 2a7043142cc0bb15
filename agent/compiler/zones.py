"""Conntrack zones: one per bridge, numbers stable across restarts.

Rules of this room: pure. Why per bridge and not per port: on a shared bridge
a connection between two local VMs would be tracked in the sender's zone one
way and the receiver's the other, so replies would never match; one bridge is
one network on a Linux-bridge node (Neutron's LB driver zones per network for
the same reason). Numbers start at 4097 like Neutron's, and a bridge keeps
the number it already has in the kernel, so conntrack entries survive an agent
restart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from agent.vocab.names import Names

FIRST_ZONE = 4097
LAST_ZONE = 65535
ZONE_RULE_RE = re.compile(r"^-i (\S+) .*-j CT --zone (\d+)$")
# The roots of the raw table's zone trees (agent/compiler/raw.py), as `Names.chain` names.
ZONE_IN, ZONE_OUT = "zone-in", "zone-out"


def allocate(bridges: Iterable[str], previous: Mapping[str, int]) -> dict[str, int]:
    """A zone for each bridge: kept if it had one, else the lowest free number."""
    wanted = sorted(set(bridges))
    zones = {b: previous[b] for b in wanted if b in previous}
    used = set(zones.values())
    candidate = FIRST_ZONE
    for bridge in wanted:
        if bridge in zones:
            continue
        while candidate in used:
            candidate += 1
        if candidate > LAST_ZONE:
            raise ValueError("conntrack zones exhausted")
        zones[bridge] = candidate
        used.add(candidate)
    return zones


def zones_from_chains(chains: Mapping[str, Iterable[str]], names: Names) -> dict[str, int]:
    """Bridge -> zone from the agent's raw-table chains, as the kernel holds them.

    The zone rules live in the `zone-in` tree; an agent before the tree kept
    them in `<p>-PREROUTING`, which is read too, so an upgrade keeps zones.
    """
    tree = names.chain(ZONE_IN)
    return zones_from_rules(rule for name, rules in chains.items()
                            if name == names.chain("PREROUTING") or name.startswith(tree)
                            for rule in rules)


def zones_from_rules(rules: Iterable[str]) -> dict[str, int]:
    """Bridge -> zone from the agent's own raw-table rules, as the kernel holds them."""
    out = {}
    for rule in rules:
        match = ZONE_RULE_RE.match(rule)
        if match:
            out[match.group(1)] = int(match.group(2))
    return out
