"""The pure compiler: a node snapshot in, a desired Ruleset out.

Rules of this room: nothing under `agent/compiler/` imports anything that
touches the kernel, the network, files or the clock. Each part compiles one
concern (filter, nat) and `compile_ruleset` merges them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.compiler.filter import compile_filter, local_ports
from agent.compiler.inputs import NatSettings, Settings, Snapshot
from agent.compiler.nat import compile_nat
from agent.compiler.raw import compile_raw
from agent.compiler.rules import oversized_sets
from agent.vocab.ruleset import Ruleset, merge

__all__ = ["Compiled", "NatSettings", "Settings", "Snapshot", "compile_ruleset"]


@dataclass(frozen=True)
class Compiled:
    """A compiled ruleset plus what the operator needs to know about it."""

    ruleset: Ruleset
    active_ports: tuple[str, ...]
    port_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    # floating IP -> fixed IP mapped on this node; the writer forgets the
    # conntrack entries of a mapping that disappears between two applies.
    floating_ips: Mapping[str, str] = field(default_factory=dict)


def compile_ruleset(snapshot: Snapshot) -> Compiled:
    filt = compile_filter(snapshot)
    nat = compile_nat(snapshot)
    raw = Ruleset(compile_raw(snapshot, local_ports(snapshot)))
    # NAT first: its filter hooks (<p>-filter-top at the top of FORWARD and
    # OUTPUT) must come before the filter compiler's on a first apply, and the
    # planner inserts several missing hooks in the order given here.
    return Compiled(merge(nat.ruleset, filt.ruleset, raw), filt.active_ports, filt.port_chains,
                    snapshot.policy.errors + filt.errors + nat.errors +
                    tuple(oversized_sets(snapshot, filt.ruleset.ipsets)), nat.floating_ips)
