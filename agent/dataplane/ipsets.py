"""ipset reconciler: member deltas in one `ipset restore` session.

Rules of this room: `plan_ipsets` is pure (desired sets + `ipset save` text ->
two restore scripts); `IpsetWriter` runs them. Sets are created and filled
*before* the iptables tables are written (a rule may not reference a set that
does not exist) and destroyed *after* (a set still referenced cannot go).
Only sets the names say are ours (`Names.owns_ipset`) are read or written;
whatever another tool keeps in a set, of whatever type, is never parsed.

Sets are sized for their members: `maxelem` is the kernel's default (65,536)
or, for bigger sets, a power of two with room to double. A set that must
grow past its `maxelem` is rebuilt under a temporary name and swapped in
(`ipset swap` keeps the rules that reference it), because the kernel cannot
change `maxelem` in place. The compiler refuses a set over its limit before
it gets here (agent/compiler/rules.py), so one huge group cannot make the
one restore session, and with it every other change, fail.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.dataplane.command import KernelWriteError, run
from agent.vocab.ruleset import IpSet

FAMILY_WORD = {4: "inet", 6: "inet6"}
DEFAULT_MAXELEM = 65536  # the kernel's, when `create` names none
MAX_IPSET_NAME = 31


@dataclass
class KernelSet:
    name: str
    family: int
    kind: str
    members: set[str] = field(default_factory=set)
    maxelem: int = 0  # 0: not read from the kernel (see `capacity`)

    @property
    def capacity(self) -> int:
        """What the set surely holds: its `maxelem` as read, or else the least
        size `plan_ipsets` could have given a set of these members."""
        if self.maxelem:
            return self.maxelem
        return max(DEFAULT_MAXELEM, 1 << max(len(self.members) - 1, 0).bit_length())


def maxelem_for(count: int) -> int:
    """`maxelem` for a set of `count` members: the default, or room to double."""
    return max(DEFAULT_MAXELEM, 1 << max(2 * count - 1, 0).bit_length())


def temporary_name(name: str) -> str:
    """The name a set is rebuilt under. It keeps the head of `name` (so it is
    owned too, and a crash leaves a set the next apply destroys) and puts `~`
    where no name from agent/vocab/names.py has it."""
    digest = hashlib.sha256(f"{name} resize".encode()).hexdigest()[:7]
    return name[:MAX_IPSET_NAME - 8] + "~" + digest


def parse_ipset_save(text: str, owns: Callable[[str], bool]) -> dict[str, KernelSet]:
    """Owned sets from `ipset save` output; members normalised to network form.

    A member that is not a network (a set of ours rebuilt by hand as another
    type) is kept as written: the planner then replaces the set, and nothing
    raises on the writer thread.
    """
    sets: dict[str, KernelSet] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not owns(parts[1]):
            continue
        if parts[0] == "create":
            family = 6 if "inet6" in parts else 4
            sets[parts[1]] = KernelSet(parts[1], family, parts[2],
                                       maxelem=_option(parts, "maxelem", DEFAULT_MAXELEM))
        elif parts[0] == "add" and parts[1] in sets:
            sets[parts[1]].members.add(_member(parts[2]))
    return sets


def _option(parts: list[str], key: str, default: int) -> int:
    for i, word in enumerate(parts[:-1]):
        if word == key and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return default


def _member(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return text


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
    temporaries = set()
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
            plan.before.append(_create(name, want))
        elif len(want.members) > have.capacity:
            temp = temporary_name(name)
            temporaries.add(temp)
            if temp in actual:  # left by an apply that died half-way
                plan.before.append(f"destroy {temp}")
            plan.before += _rebuild(name, temp, want)
            plan.added += len(want.members - have.members)
            plan.removed += len(have.members - want.members)
            continue
        current = have.members if have else set()
        adds = sorted(want.members - current)
        dels = sorted(current - want.members)
        plan.before += [f"add {name} {m}" for m in adds]
        plan.before += [f"del {name} {m}" for m in dels]
        plan.added += len(adds)
        plan.removed += len(dels)
    plan.after = [f"destroy {name}" for name in sorted(actual)
                  if name not in desired and name not in temporaries]
    return plan


def written(want: IpSet, before: KernelSet | None) -> KernelSet:
    """The kernel's set once a plan made it `want`, for the writer's view.

    It keeps the `maxelem` read from the kernel while the plan only changed
    members, and takes the planner's size when the plan created or rebuilt
    the set, so the next plan needs no re-read to know when to grow.
    """
    kept = before is not None and before.kind == want.kind and \
        before.family == want.family and len(want.members) <= before.capacity
    maxelem = before.maxelem if kept and before else maxelem_for(len(want.members))
    return KernelSet(want.name, want.family, want.kind, set(want.members), maxelem)


def _create(name: str, want: IpSet) -> str:
    return (f"create {name} {want.kind} family {FAMILY_WORD[want.family]} "
            f"maxelem {maxelem_for(len(want.members))}")


def _rebuild(name: str, temp: str, want: IpSet) -> list[str]:
    """Lines that give `name` a bigger `maxelem` and exactly `want`'s members."""
    return [_create(temp, want), *(f"add {temp} {m}" for m in sorted(want.members)),
            f"swap {temp} {name}", f"destroy {temp}"]


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
