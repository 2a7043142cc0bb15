"""Diff the desired tables against what the kernel holds; produce restore scripts.

Rules of this room:

1. Pure: text in (iptables-save output, a desired `Table`), text out (an
   `iptables-restore --noflush` script). The backends do the I/O.
2. Ownership is by name: chains starting with `<chain_prefix>-` are ours, and
   so are rules in built-in chains that jump to one of them. Nothing else is
   ever named in a script, so foreign chains and rules cannot be touched.
3. Smallest change: a chain is rewritten only when its rule list differs from
   the desired one; hooks are added or removed by exact text; chains that are
   no longer wanted are flushed and deleted last, in the same transaction.
   An empty plan means the kernel already matches, and nothing is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.dataplane.ruleset import Table

BUILTIN_CHAINS = frozenset({"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"})
PROTO_RE = re.compile(r"(^|\s)-p (\S+)")


@dataclass
class KernelTable:
    """One table as iptables-save printed it: chain -> rule specs, in order."""

    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)


def parse_save(text: str,
               normalise_proto: Callable[[str], str] = lambda p: p) -> dict[str, KernelTable]:
    """Parse iptables-save output (all tables) into KernelTables."""
    tables: dict[str, KernelTable] = {}
    current: KernelTable | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), KernelTable(line[1:].strip()))
        elif current is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current.chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            spec = PROTO_RE.sub(lambda m: f"{m.group(1)}-p {normalise_proto(m.group(2))}", spec)
            current.chains.setdefault(chain, []).append(spec)
    return tables


def jump_target(spec: str) -> str | None:
    """The chain a rule jumps or goes to, if any."""
    tokens = spec.split()
    for flag in ("-j", "-g"):
        if flag in tokens:
            i = tokens.index(flag)
            if i + 1 < len(tokens):
                return tokens[i + 1]
    return None


@dataclass
class TablePlan:
    """What one restore transaction changes, and the script that does it."""

    family: int
    table: str
    written_chains: list[str] = field(default_factory=list)
    deleted_chains: list[str] = field(default_factory=list)
    hook_changes: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.lines

    def script(self) -> str:
        return "\n".join([f"*{self.table}", *self.lines, "COMMIT", ""])


def plan_table(desired: Table | None, actual: KernelTable | None, family: int, table: str,
               owns: Callable[[str], bool]) -> TablePlan:
    """The restore script turning `actual` into `desired` for owned objects only."""
    plan = TablePlan(family, table)
    want = dict(desired.chains) if desired else {}
    have = actual.chains if actual else {}
    have_owned = {name: rules for name, rules in have.items() if owns(name)}

    rewrite = [name for name, rules in want.items() if have_owned.get(name) != list(rules)]
    stale = sorted(name for name in have_owned if name not in want)
    plan.written_chains = rewrite
    declare = [f":{name} - [0:0]" for name in rewrite]
    appends = [f"-A {name} {spec}" for name in rewrite for spec in want[name]]

    hook_lines = []
    hooks = desired.hooks if desired else ()
    wanted_hooks = {(h.chain, h.spec) for h in hooks}
    # Missing hooks go to the top; inserting in reverse keeps their given order.
    for hook in reversed(hooks):
        count = have.get(hook.chain, []).count(hook.spec)
        if count == 0:
            hook_lines.append(f"-I {hook.chain} 1 {hook.spec}")
        hook_lines += [f"-D {hook.chain} {hook.spec}"] * max(0, count - 1)
    for chain, rules in have.items():
        if chain not in BUILTIN_CHAINS:
            continue
        for spec in rules:
            target = jump_target(spec)
            if target and owns(target) and (chain, spec) not in wanted_hooks:
                hook_lines.append(f"-D {chain} {spec}")
    plan.hook_changes = hook_lines

    # A stale chain still referenced from a foreign chain cannot be deleted
    # without touching that chain; leave it (emptied) rather than fail the table.
    referenced = {jump_target(spec) for name, rules in have.items()
                  if not owns(name) and name not in BUILTIN_CHAINS for spec in rules}
    deletable = [name for name in stale if name not in referenced]
    plan.deleted_chains = deletable
    removal = [f"-F {name}" for name in stale] + [f"-X {name}" for name in deletable]
    plan.lines = declare + appends + hook_lines + removal
    return plan

