"""Conntrack after each apply: cut what the policy stopped allowing, and keep trying.

Rules of this room: called on the writer thread only (it runs inside the
managed namespace, where ctnetlink speaks for the node). The decisions are
pure (`agent.compiler.flows`, `agent.compiler.stale_flows`); this class keeps
the little state between applies that makes cuts reliable:

- the last snapshot and floating IPs, so a change cuts what it revoked;
- cuts whose delete failed or whose dump stopped short (bounded by
  `flowcut.Limits`), passed again with the next apply, so a flow revoked
  once is never left established for good;
- the start audit: a restarted agent has no previous snapshot, so once the
  first policy is applied it sweeps the conntrack table for entries the
  policy no longer allows (what it can decide for sure; see FlowAudit).
Every sweep feeds `progress` (the systemd watchdog) as it goes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.compiler import Compiled, Snapshot
from agent.compiler.flows import floating_ip_cuts, flows_to_cut
from agent.compiler.stale_flows import FlowAudit
from agent.dataplane import flowcut
from agent.vocab.flows import FlowCut

LOG = logging.getLogger(__name__)


class FlowKeeper:
    """Cuts revoked flows after each apply; retries; audits once after a start."""

    def __init__(self, families: tuple[int, ...], progress: Callable[[], None]) -> None:
        self.families = families
        self.progress = progress
        self.last_snapshot: Snapshot | None = None
        self.floating_ips: dict[str, str] = {}   # floating -> fixed IP, as last applied
        self.pending: list[FlowCut] = []          # to pass again with the next apply
        self.audit_due = True

    def after_apply(self, snapshot: Snapshot, compiled: Compiled, has_policy: bool) -> list[str]:
        """Cut what this apply revoked (and what is pending); returns the errors."""
        cuts = flows_to_cut(self.last_snapshot, snapshot) + \
            floating_ip_cuts(self.floating_ips, compiled.floating_ips) + self.pending
        self.last_snapshot = snapshot
        self.floating_ips = dict(compiled.floating_ips)
        done = flowcut.cut(cuts, progress=self.progress)
        self.pending = done.retry
        errors = list(done.errors)
        if self.audit_due and has_policy:
            errors += self._audit(snapshot)
        if self.pending:
            LOG.info("%d conntrack cuts are passed again with the next apply", len(self.pending))
        return errors

    def _audit(self, snapshot: Snapshot) -> list[str]:
        try:
            node = flowcut.node_addresses()
        except OSError as exc:   # netlink trouble: audit with the next apply
            return [f"conntrack audit postponed: cannot list the node's addresses: {exc}"]
        report = flowcut.audit(FlowAudit(snapshot, node).verdict, self.families,
                               progress=self.progress)
        self.pending += report.retry
        self.audit_due = not report.complete
        if report.deleted:
            LOG.warning("start audit: cut %d conntrack entries the policy no longer allows",
                        report.deleted)
        return list(report.errors)
