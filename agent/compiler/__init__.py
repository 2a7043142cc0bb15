"""The pure compiler: a node snapshot in, a desired Ruleset out.

Rules of this room: nothing under `agent/compiler/` imports anything that
touches the kernel, the network, files or the clock. Each part compiles one
concern (filter, nat) and `compile_ruleset` merges them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.compiler.filter import compile_filter
from agent.compiler.inputs import Settings, Snapshot
from agent.dataplane.ruleset import Ruleset

__all__ = ["Compiled", "Settings", "Snapshot", "compile_ruleset"]


@dataclass(frozen=True)
class Compiled:
    """A compiled ruleset plus what the operator needs to know about it."""

    ruleset: Ruleset
    active_ports: tuple[str, ...]
    port_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


def compile_ruleset(snapshot: Snapshot) -> Compiled:
    filt = compile_filter(snapshot)
    return Compiled(filt.ruleset, filt.active_ports, filt.port_chains,
                    snapshot.policy.errors + filt.errors)
