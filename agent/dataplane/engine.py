"""The writer: reconcile the kernel with a desired Ruleset, in a safe order.

Rules of this room:

1. Called from the writer thread only (the one that entered the managed
   network namespace); every kernel read and write of the agent happens here.
2. Order per apply: ipset creates and member changes, then each table in one
   atomic restore transaction, then ipset destroys. A rule never references a
   missing set, and no set is destroyed while our rules still use it.
3. Every apply starts from a fresh read of the kernel, so drift (a flushed
   chain, a deleted hook, a missing set member) is repaired by the same code
   path as a policy change, and a no-op apply writes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from agent.compiler.names import Names
from agent.dataplane.command import KernelWriteError
from agent.dataplane.ipsets import IpsetWriter, parse_ipset_save, plan_ipsets
from agent.dataplane.plan import KernelTable, TablePlan, parse_save, plan_table
from agent.dataplane.restore_backend import RestoreBackend, normalise_proto
from agent.dataplane.ruleset import TABLE_ORDER, Ruleset

LOG = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    """What one apply did; the daemon turns it into status and logs."""

    in_sync: bool = False
    tables_written: list[str] = field(default_factory=list)
    chains_written: int = 0
    chains_deleted: int = 0
    hook_changes: int = 0
    lines_written: int = 0
    ipset_members_added: int = 0
    ipset_members_removed: int = 0
    ipsets_destroyed: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.tables_written or self.ipset_members_added or
                    self.ipset_members_removed or self.ipsets_destroyed)


class Engine:
    """Reconciles owned chains, hooks and ipsets; never touches anything else."""

    def __init__(self, backend: RestoreBackend, names: Names, families: tuple[int, ...]) -> None:
        self.backend = backend
        self.names = names
        self.families = families
        self.ipsets = IpsetWriter()

    def read(self) -> dict[int, dict[str, KernelTable]]:
        """The kernel's tables, per family, as iptables-save shows them."""
        return {f: parse_save(self.backend.save(f), normalise_proto) for f in self.families}

    def plans(self, desired: Ruleset,
              kernel: dict[int, dict[str, KernelTable]]) -> list[TablePlan]:
        """The non-empty table plans that would make the kernel match `desired`."""
        out = []
        for family in self.families:
            have = kernel[family]
            names = {t for (f, t) in desired.tables if f == family}
            names |= {t for t, table in have.items()
                      if any(self.names.owns_chain(c) for c in table.chains)}
            for table in sorted(names, key=_table_rank):
                plan = plan_table(desired.tables.get((family, table)), have.get(table),
                                  family, table, self.names.owns_chain)
                if not plan.empty:
                    out.append(plan)
        return out

    def apply(self, desired: Ruleset) -> ApplyReport:
        """Make the kernel match `desired`; raise KernelWriteError if a step fails."""
        start = time.monotonic()
        report = ApplyReport()
        sets = parse_ipset_save(self.ipsets.save(), self.names.owns_ipset)
        set_plan = plan_ipsets(desired.ipsets, sets)
        self.ipsets.restore(set_plan.before)
        report.ipset_members_added = set_plan.added
        report.ipset_members_removed = set_plan.removed

        plans = self.plans(desired, self.read())
        for plan in plans:
            LOG.debug("restore %s v%d:\n%s", plan.table, plan.family, plan.script())
            self.backend.restore(plan.family, plan.script())
            report.tables_written.append(f"{plan.table}/v{plan.family}")
            report.chains_written += len(plan.written_chains)
            report.chains_deleted += len(plan.deleted_chains)
            report.hook_changes += len(plan.hook_changes)
            report.lines_written += len(plan.lines)
        for line in set_plan.after:
            try:
                self.ipsets.restore([line])
                report.ipsets_destroyed += 1
            except KernelWriteError as exc:  # still referenced by someone else's rule
                report.warnings.append(f"could not {line}: {exc}")
        report.in_sync = not plans or self.in_sync(desired)
        report.seconds = time.monotonic() - start
        return report

    def in_sync(self, desired: Ruleset) -> bool:
        """True when a fresh read of the kernel needs no change at all."""
        sets = parse_ipset_save(self.ipsets.save(), self.names.owns_ipset)
        set_plan = plan_ipsets(desired.ipsets, sets)
        return not set_plan.before and not self.plans(desired, self.read())


def _table_rank(name: str) -> int:
    return TABLE_ORDER.index(name) if name in TABLE_ORDER else len(TABLE_ORDER)
