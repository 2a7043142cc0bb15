"""ipset reconciler: member deltas in one `ipset restore` session.

Rules of this room: `plan_ipsets` is pure (desired sets + `ipset save` text ->
two restore scripts); `IpsetWriter` runs them. Sets are created and filled
*before* the iptables tables are written (a rule may not reference a set that
does not exist) and destroyed *after* (a set still referenced cannot go).
Only sets whose names start with the ipset prefix are read or written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.dataplane.command import KernelWriteError, run
from agent.dataplane.ruleset import IpSet

FAMILY_WORD = {4: "inet", 6: "inet6"}


@dataclass
class KernelSet:
    name: str
    family: int
    kind: str
    members: set[str] = field(default_factory=set)


def parse_ipset_save(text: str, owns: Callable[[str], bool]) -> dict[str, KernelSet]:
    """Owned sets from `ipset save` output; members normalised to network form."""
    sets: dict[str, KernelSet] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not owns(parts[1]):
            continue
        if parts[0] == "create":
            family = 6 if "inet6" in parts else 4
            sets[parts[1]] = KernelSet(parts[1], family, parts[2])
        elif parts[0] == "add" and parts[1] in sets:
            sets[parts[1]].members.add(str(ipaddress.ip_network(parts[2], strict=False)))
    return sets


@dataclass
class IpsetPlan:
    before: list[str] = field(default_factory=list)   # creates, adds, deletes of members
    after: list[str] = field(default_factory=list)    # destroys of unwanted sets
    added: int = 0
    removed: int = 0

    @property
    def empty(self) -> bool:
        return not self.before and not self.after


def plan_ipsets(desired: Mapping[str, IpSet], actual: Mapping[str, KernelSet],
                settled: frozenset[str] = frozenset()) -> IpsetPlan:
    """The restore lines turning `actual` into `desired`; `settled` sets are known to match."""
    plan = IpsetPlan()
    for name, want in sorted(desired.items()):
        if name in settled:
            continue
        have = actual.get(name)
        if have and (have.kind != want.kind or have.family != want.family):
            # Names carry the family and the kind never changes, so this is drift
            # by hand. The kernel swaps only sets of one type and family, so the
            # set is destroyed and made again; while a foreign rule still uses it
            # the destroy fails, and the error names the set (nothing else moves).
            plan.before.append(f"destroy {name}")
            have = None
        if have is None:
            plan.before.append(f"create {name} {want.kind} family {FAMILY_WORD[want.family]}")
        current = have.members if have else set()
        adds = sorted(want.members - current)
        dels = sorted(current - want.members)
        plan.before += [f"add {name} {m}" for m in adds]
        plan.before += [f"del {name} {m}" for m in dels]
        plan.added += len(adds)
        plan.removed += len(dels)
    plan.after = [f"destroy {name}" for name in sorted(actual) if name not in desired]
    return plan


class IpsetWriter:
    """Runs `ipset` in the caller's network namespace (the writer thread's)."""

    def save(self, *names: str) -> str:
        """Every set, or only `names` (each read alone; a missing one is left out)."""
        if not names:
            return run(["ipset", "save"])
        out = []
        for name in names:
            try:
                out.append(run(["ipset", "save", name]))
            except KernelWriteError as exc:
                if "does not exist" not in str(exc):
                    raise
        return "".join(out)

    def restore(self, lines: list[str]) -> None:
        if lines:
            run(["ipset", "restore"], "\n".join(lines) + "\n")
