"""Can the rules we wrote see the traffic? The node-wide conditions besides our chains.

Rules of this room: called on the writer thread (inside the managed
namespace). Two checks, both reported and neither fought by default:

- the bridge netfilter hook (`net.bridge.bridge-nf-call-ip{,6}tables`): at 0
  no rule sees bridged traffic, so the agent is not ready and says why; it
  sets the sysctl only when `[firewall] manage_bridge_nf_call` allows;
- foreign rules ahead of our hooks in the built-in chains, found in the
  engine's view after every kernel re-read: an ACCEPT there passes traffic
  before any security group. Reported as warnings and a metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.dataplane import brnf
from agent.dataplane.engine import KernelView
from agent.dataplane.plan import rules_ahead_of_hooks
from agent.metrics import Observer

LOG = logging.getLogger(__name__)
BRIDGE_CHECK_EVERY = 1.0   # seconds; two sysctl reads each


class EnforcementCheck:
    """Keeps the bridge hook's problems and the foreign-rule warnings current."""

    def __init__(self, families: tuple[int, ...], manage_bridge_nf: bool,
                 owns_chain: Callable[[str], bool], metrics: Observer) -> None:
        self.families = families
        self.manage = manage_bridge_nf
        self.owns_chain = owns_chain
        self.metrics = metrics
        self.problems: tuple[str, ...] = ()
        self.warnings: tuple[str, ...] = ()
        self._checked_at = float("-inf")

    def bridge(self, now: float) -> bool:
        """Check the hook at most every BRIDGE_CHECK_EVERY s; True when problems changed."""
        if now - self._checked_at < BRIDGE_CHECK_EVERY:
            return False
        self._checked_at = now
        state = brnf.check(self.families, self.manage)
        for name in state.changed:
            LOG.warning("set %s to 1 ([firewall] manage_bridge_nf_call)", name)
        self.metrics.bridge_nf_checked(state.ok, state.problems)
        if state.problems == self.problems:
            return False
        for problem in state.problems:
            LOG.error("not enforcing: %s", problem)
        if self.problems and not state.problems:
            LOG.info("the bridge netfilter hook is back: enforcing")
        self.problems = state.problems
        return True

    def foreign(self, view: KernelView) -> None:
        """Foreign rules ahead of our hooks, as the last kernel read showed them."""
        ahead = {(family, table, chain): rules
                 for family, tables in view.items() for table, kernel in tables.items()
                 for chain, rules in rules_ahead_of_hooks(kernel, self.owns_chain).items()}
        self.metrics.foreign_rules_ahead({key: len(rules) for key, rules in ahead.items()})
        warnings = tuple(
            f"{len(rules)} foreign rule{'s' if len(rules) > 1 else ''} ahead of the hook in "
            f"{table} {chain} (IPv{family}), first {rules[0]!r}"
            for (family, table, chain), rules in sorted(ahead.items()))
        if warnings != self.warnings:
            for warning in warnings:
                LOG.warning("%s", warning)
        self.warnings = warnings
