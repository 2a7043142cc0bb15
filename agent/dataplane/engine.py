"""The writer: reconcile the kernel with a desired Ruleset, in a safe order.

Rules of this room:

1. Called from the writer thread only (the one that entered the managed
   network namespace); every kernel read and write of the agent happens here.
2. Order per apply: ipset creates and member changes, then each table in one
   atomic transaction, then ipset destroys. A rule never references a missing
   set, and no set is destroyed while our rules still use it.
3. The engine keeps `view`, what it believes the kernel holds (the last read
   plus the plans it committed since), so an incremental apply diffs against
   memory and writes only what changed, without reading 20k rules back. A
   `refresh` re-reads the kernel first: that is how drift (a flushed chain, a
   deleted hook, a missing set member) is found, and the same diff repairs it.
4. A failed write makes the view unknown, so the next apply re-reads.
5. Reads stay off a change's critical path (work in proportion to the
   change): an apply reports what it `touched`, and `check` reads back just
   those chains and sets (`iptables -S <chain>`, `ipset save <set>`). A full
   refresh is cut into small `refresh_steps` (one table, or the sets), so the
   daemon can serve a queued change between two steps instead of waiting
   for a whole re-read of a 60k-rule node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from agent.dataplane.backend import Backend
from agent.dataplane.command import KernelWriteError
from agent.dataplane.heap import release_heap
from agent.dataplane.ipsets import (
    IpsetWriter,
    KernelSet,
    parse_ipset_save,
    plan_ipsets,
    written,
)
from agent.dataplane.plan import KernelTable, TablePlan, parse_save, plan_table
from agent.dataplane.restore_backend import normalise_proto
from agent.vocab.names import Names
from agent.vocab.ruleset import TABLE_ORDER, Ruleset

K = TypeVar("K", bound=Hashable)

LOG = logging.getLogger(__name__)

KernelView = dict[int, dict[str, KernelTable]]


@dataclass
class ApplyReport:
    """What one apply did; the daemon turns it into status, logs and metrics."""

    in_sync: bool = False
    refreshed: bool = False
    drift_repaired: bool = False
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
    # What the writes named, for `Engine.check`: (family, table) -> chains
    # (owned chains rewritten or deleted, built-ins whose hooks moved), and sets.
    touched: dict[tuple[int, str], set[str]] = field(default_factory=dict)
    sets_touched: set[str] = field(default_factory=set)

    @property
    def changed(self) -> bool:
        return bool(self.tables_written or self.ipset_members_added or
                    self.ipset_members_removed or self.ipsets_destroyed)


class Engine:
    """Reconciles owned chains, hooks and ipsets; never touches anything else."""

    def __init__(self, backend: Backend, names: Names, families: tuple[int, ...]) -> None:
        self.backend = backend
        self.names = names
        self.families = families
        self.ipsets = IpsetWriter()
        self.view: KernelView | None = None           # believed kernel tables
        self.set_view: dict[str, KernelSet] | None = None  # believed owned ipsets
        self.last_desired: Ruleset | None = None      # the ruleset of the last good apply
        self.drift_repairs = 0
        # Tables (and the sets, as None) re-read since the last apply: their view
        # is the kernel's own, so they are compared in full, and a change found
        # there is drift.
        self._reread: set[tuple[int, str] | None] = set()

    def read(self) -> KernelView:
        """The kernel's tables, per family, as iptables-save shows them."""
        return {f: parse_save(self.backend.save(f), normalise_proto) for f in self.families}

    def read_sets(self) -> dict[str, KernelSet]:
        return parse_ipset_save(self.ipsets.save(), self.names.owns_ipset)

    def adopt(self) -> KernelView:
        """Read everything once (at start): the view, and what a restart adopts."""
        self.view, self.set_view = self.read(), self.read_sets()
        self._reread = {None, *((f, t) for f in self.view for t in self.view[f])}
        return self.view

    def refresh_steps(self, desired: Ruleset | None) -> list[tuple[int, str] | None]:
        """A full re-read cut into steps: one per table that is ours or wanted, then
        the sets (None). Each step is one `*-save -t <table>` or one `ipset save`."""
        if self.view is None or self.set_view is None:
            return [None]   # `refresh_step(None)` with no view reads everything
        steps: list[tuple[int, str] | None] = []
        for family in self.families:
            have = self.view.get(family, {})
            tables = {t for (f, t) in (desired.tables if desired else {}) if f == family}
            tables |= {t for t, table in have.items()
                       if any(self.names.owns_chain(c) for c in table.chains)}
            steps += [(family, t) for t in sorted(tables, key=_table_rank)]
        return [*steps, None]

    def refresh_step(self, step: tuple[int, str] | None) -> None:
        """Re-read one table (or, for None, the sets) into the view."""
        if self.view is None or self.set_view is None:
            self.adopt()
            return
        if step is None:
            self.set_view = self.read_sets()
        else:
            family, table = step
            tables = parse_save(self.backend.save(family, table), normalise_proto)
            self.view.setdefault(family, {})[table] = tables.get(table, KernelTable(table))
        self._reread.add(step)

    def check(self, touched: Mapping[tuple[int, str], set[str]],
              sets: set[str]) -> list[str]:
        """Read back only the chains and sets a write touched; returns what differs.

        Where the kernel differs from the view, the view takes the kernel's
        content, so the next apply rewrites exactly that (and counts it as drift).
        """
        assert self.view is not None and self.set_view is not None
        differs: list[str] = []
        for (family, table), chains in sorted(touched.items()):
            have = self.view.setdefault(family, {}).setdefault(table, KernelTable(table))
            for chain in sorted(chains):
                actual = self.backend.list_chain(family, table, chain)
                rules = None if actual is None else parse_save(
                    f"*{table}\n{actual}", normalise_proto).get(table, KernelTable(table)
                                                                ).chains.get(chain, [])
                if rules != have.chains.get(chain):
                    differs.append(f"{table}/v{family} {chain}")
                    if rules is None:
                        have.chains.pop(chain, None)
                    else:
                        have.chains[chain] = rules
                    self._reread.add((family, table))
        if sets:
            actual_sets = parse_ipset_save(self.ipsets.save(*sorted(sets)), self.names.owns_ipset)
            for name in sorted(sets):
                want, got = self.set_view.get(name), actual_sets.get(name)
                if (want is None) != (got is None) or (
                        want and got and (want.members != got.members or want.kind != got.kind)):
                    differs.append(f"ipset {name}")
                    if got is None:
                        self.set_view.pop(name, None)
                    else:
                        self.set_view[name] = got
                    self._reread.add(None)
        return differs

    def plans(self, desired: Ruleset, kernel: KernelView, force: bool = False,
              settled: frozenset[tuple[int, str]] = frozenset()) -> list[TablePlan]:
        """The non-empty table plans that would make `kernel` match `desired`.

        `settled` tables are known to match already and are not compared.
        """
        out = []
        for family in self.families:
            have = kernel[family]
            names = {t for (f, t) in desired.tables if f == family}
            names |= {t for t, table in have.items()
                      if any(self.names.owns_chain(c) for c in table.chains)}
            for table in sorted(names - {t for f, t in settled if f == family},
                                key=_table_rank):
                plan = plan_table(desired.tables.get((family, table)), have.get(table),
                                  family, table, self.names.owns_chain, force)
                if not plan.empty:
                    out.append(plan)
        return out

    def apply(self, desired: Ruleset, refresh: bool = False, force: bool = False,
              verify: bool = False) -> ApplyReport:
        """Make the kernel match `desired`; raise KernelWriteError if a step fails.

        `refresh` re-reads the kernel first (drift check), `force` rewrites every
        owned chain, `verify` re-reads after writing to prove the kernel matches.
        """
        start = time.monotonic()
        report = ApplyReport()
        if refresh or force or self.view is None or self.set_view is None:
            self.adopt()
        report.refreshed = bool(self._reread)
        try:
            self._write(desired, report, force)
        except KernelWriteError:
            self.view = self.set_view = None
            raise
        if report.refreshed and report.changed and desired == self.last_desired:
            self.drift_repairs += 1
            report.drift_repaired = True
            LOG.warning("repaired drift in the kernel: %s, %d chains, ipset +%d/-%d",
                        report.tables_written, report.chains_written,
                        report.ipset_members_added, report.ipset_members_removed)
        self.last_desired = desired
        self._reread = set()
        report.in_sync = self.in_sync(desired) if verify and report.changed else True
        if report.refreshed or report.changed:
            release_heap()  # a re-read or a write dropped large temporaries
        report.seconds = time.monotonic() - start
        return report

    def _write(self, desired: Ruleset, report: ApplyReport, force: bool) -> None:
        assert self.view is not None and self.set_view is not None
        settled_tables, settled_sets = self._settled(desired, report, force)
        set_plan = plan_ipsets(desired.ipsets, self.set_view, settled_sets)
        self.ipsets.restore(set_plan.before)
        report.ipset_members_added = set_plan.added
        report.ipset_members_removed = set_plan.removed
        report.sets_touched = {line.split()[1] for line in set_plan.before}
        for name, want in desired.ipsets.items():
            if name not in settled_sets:
                self.set_view[name] = written(want, self.set_view.get(name))

        for plan in self.plans(desired, self.view, force, settled_tables):
            LOG.debug("commit %s v%d:\n%s", plan.table, plan.family, plan.script())
            self.backend.commit(plan)
            plan.apply_to(self.view[plan.family].setdefault(plan.table, KernelTable(plan.table)))
            report.tables_written.append(f"{plan.table}/v{plan.family}")
            report.chains_written += len(plan.rewrites)
            report.chains_deleted += len(plan.deletes)
            report.hook_changes += len(plan.hook_inserts) + len(plan.hook_deletes)
            report.lines_written += len(plan.lines())
            report.touched.setdefault((plan.family, plan.table), set()).update(
                plan.rewrites, plan.deletes, (hook.chain for hook in plan.hook_inserts),
                (chain for chain, _ in plan.hook_deletes))

        for line in set_plan.after:
            name = line.split()[1]
            try:
                self.ipsets.restore([line])
                report.ipsets_destroyed += 1
                self.set_view.pop(name, None)
            except KernelWriteError as exc:  # still referenced by someone else's rule
                report.warnings.append(f"could not {line} (retried next apply): {exc}")

    def _settled(self, desired: Ruleset, report: ApplyReport,
                 force: bool) -> tuple[frozenset[tuple[int, str]], frozenset[str]]:
        """Tables and sets that are the very objects of the last good apply, with
        no re-read since: (table keys, set names).

        The compiler hands back the same objects while their inputs are
        unchanged (a members-only change, say), and the view already matches
        them, so comparing their thousands of chains or members again would
        find nothing.
        """
        last = self.last_desired
        if last is None or force:
            return frozenset(), frozenset()
        tables = frozenset(k for k in _same_objects(desired.tables, last.tables)
                           if k not in self._reread)
        sets = frozenset() if None in self._reread else _same_objects(desired.ipsets,
                                                                       last.ipsets)
        return tables, sets

    def in_sync(self, desired: Ruleset) -> bool:
        """True when a fresh read of the kernel needs no change at all."""
        sets = self.read_sets()
        set_plan = plan_ipsets(desired.ipsets, sets)
        return not set_plan.before and not self.plans(desired, self.read())


def _same_objects(desired: Mapping[K, object], last: Mapping[K, object]) -> frozenset[K]:
    return frozenset(key for key, value in desired.items() if last.get(key) is value)


def _table_rank(name: str) -> int:
    return TABLE_ORDER.index(name) if name in TABLE_ORDER else len(TABLE_ORDER)
