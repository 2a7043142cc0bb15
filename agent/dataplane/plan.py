"""Diff the desired tables against what the kernel holds; produce restore scripts.

Rules of this room:

1. Pure: the kernel's text in (iptables-save output) with a desired `Table`
   of typed rules, a plan out: structured operations, and the same as an
   `iptables-restore --noflush` script. The backends do the I/O.
2. Ownership is by name: chains starting with `<chain_prefix>-` are ours, and
   so are rules in built-in chains that jump to one of them. Nothing else is
   ever named in a script, so foreign chains and rules cannot be touched.
3. Smallest change: a chain is rewritten only when its rule list differs from
   the desired one (our rules render to the kernel's own canonical text, so
   the texts are compared as they are); hooks are added or removed by exact
   text; chains that are no longer wanted are flushed and deleted last, in
   the same transaction. An empty plan means the kernel already matches, and
   nothing is written.
4. Only the kernel's text is ever parsed here (`parse_save`, and the jump
   target of rules in built-in and foreign chains); our own rules are values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.vocab.rules import IptablesRule
from agent.vocab.ruleset import Hook, Table

BUILTIN_CHAINS = frozenset({"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"})
PROTO_RE = re.compile(r"(^|\s)-p (\S+)")
MAC_RE = re.compile(r"--mac-source ([0-9A-Fa-f:]{17})")
QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"')


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
    chains: dict[str, list[str]] = {}
    names: dict[str, str] = {}  # protocol word -> canonical token, memoised
    for line in text.splitlines():
        if line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if spec.startswith("-p ") or " -p " in spec:
                spec = PROTO_RE.sub(
                    lambda m: f"{m.group(1)}-p {_memo(names, m.group(2), normalise_proto)}", spec)
            if "--mac-source " in spec:
                # iptables before 1.8.8 prints MACs upper-case; ours are lower-case.
                spec = MAC_RE.sub(lambda m: f"--mac-source {m.group(1).lower()}", spec)
            rules = chains.get(chain)
            if rules is None:
                rules = chains[chain] = []
            rules.append(spec)
        elif line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), KernelTable(line[1:].strip()))
            chains = current.chains
    return tables


def _memo(cache: dict[str, str], word: str, fn: Callable[[str], str]) -> str:
    if word not in cache:
        cache[word] = fn(word)
    return cache[word]


def jump_target(spec: str) -> str | None:
    """The chain a kernel rule jumps or goes to, if any; quoted text (comments) is
    skipped. Only for rules read from the kernel: ours carry `IptablesRule.jump`."""
    tokens = QUOTED_RE.sub('""', spec).split() if '"' in spec else spec.split()
    for flag in ("-j", "-g"):
        if flag in tokens:
            i = tokens.index(flag)
            if i + 1 < len(tokens):
                return tokens[i + 1]
    return None


@dataclass(frozen=True)
class Operation:
    """One step of a table transaction: create/flush (`:`) a chain, append (`-A`)
    or insert at the top (`-I`) one of our rules, delete (`-D`) a rule the
    kernel showed (by its text), flush (`-F`) or delete (`-X`) a chain."""

    op: str
    chain: str
    rule: IptablesRule | str | None = None

    def line(self) -> str:
        if self.op == ":":
            return f":{self.chain} - [0:0]"
        words = [self.op, self.chain, *(["1"] if self.op == "-I" else [])]
        if self.rule is not None:
            words.append(self.rule if isinstance(self.rule, str) else self.rule.text)
        return " ".join(words)


@dataclass
class TablePlan:
    """The changes to one table, as structured operations and as a restore script.

    Backends either send `script()` to iptables-restore or execute the
    operations themselves (python-iptables); `apply_to` replays them on a
    KernelTable so the engine can keep its view of the kernel without a re-read.
    """

    family: int
    table: str
    rewrites: dict[str, tuple[IptablesRule, ...]] = field(default_factory=dict)  # new rules
    hook_inserts: list[Hook] = field(default_factory=list)             # at the top, in order
    hook_deletes: list[tuple[str, str]] = field(default_factory=list)  # (builtin, kernel text)
    flushes: list[str] = field(default_factory=list)                    # stale chains
    deletes: list[str] = field(default_factory=list)                    # stale, unreferenced

    @property
    def empty(self) -> bool:
        return not (self.rewrites or self.hook_inserts or self.hook_deletes or self.flushes
                    or self.deletes)

    def operations(self) -> list[Operation]:
        """The plan as one transaction's steps, in the order they must run.

        Chains to rewrite are created (or flushed) and filled; then hooks are
        deleted (a delete by spec removes the first match) and inserted at
        the top in reverse, which keeps several hooks in their given order;
        stale chains are flushed, then deleted.
        """
        out: list[Operation] = [Operation(":", name) for name in self.rewrites]
        out += [Operation("-A", name, rule) for name, rules in self.rewrites.items()
                for rule in rules]
        out += [Operation("-D", chain, spec) for chain, spec in self.hook_deletes]
        out += [Operation("-I", hook.chain, hook.rule) for hook in reversed(self.hook_inserts)]
        out += [Operation("-F", name) for name in self.flushes]
        out += [Operation("-X", name) for name in self.deletes]
        return out

    def lines(self) -> list[str]:
        """`operations()` as iptables-restore lines."""
        return [op.line() for op in self.operations()]

    def script(self) -> str:
        return "\n".join([f"*{self.table}", *self.lines(), "COMMIT", ""])

    def apply_to(self, kernel: KernelTable) -> None:
        """Replay this plan on `kernel` as the kernel itself would."""
        chains = kernel.chains
        for name, rules in self.rewrites.items():
            chains[name] = [rule.text for rule in rules]
        for chain, spec in self.hook_deletes:
            if spec in chains.get(chain, []):
                chains[chain].remove(spec)
        for hook in reversed(self.hook_inserts):
            chains.setdefault(hook.chain, []).insert(0, hook.spec)
        for name in self.flushes:
            chains[name] = []
        for name in self.deletes:
            chains.pop(name, None)


def plan_table(desired: Table | None, actual: KernelTable | None, family: int, table: str,
               owns: Callable[[str], bool], force: bool = False) -> TablePlan:
    """The changes turning `actual` into `desired`, for owned objects only.

    `force` rewrites every wanted chain even where it looks right: the way out
    when applies keep failing and the view of the kernel is suspect.
    """
    plan = TablePlan(family, table)
    want = dict(desired.chains) if desired else {}
    have = actual.chains if actual else {}
    have_owned = {name: rules for name, rules in have.items() if owns(name)}

    plan.rewrites = {name: tuple(rules) for name, rules in want.items()
                     if force or have_owned.get(name) != [rule.text for rule in rules]}
    stale = sorted(name for name in have_owned if name not in want)

    hooks = desired.hooks if desired else ()
    wanted: dict[str, list[Hook]] = {}
    for hook in hooks:
        wanted.setdefault(hook.chain, []).append(hook)
    for chain, rules in have.items():
        if chain not in BUILTIN_CHAINS:
            continue
        want = wanted.get(chain, [])
        specs = [hook.spec for hook in want]
        ours = [spec for spec in rules
                if (target := jump_target(spec)) is not None and owns(target)]
        plan.hook_deletes += [(chain, spec) for spec in ours if spec not in specs]
        kept = [spec for spec in ours if spec in specs]
        if kept != specs:
            # Missing, duplicated or out of order: our hooks in this built-in are
            # removed and put back in order, in the same transaction.
            plan.hook_deletes += [(chain, spec) for spec in kept]
            plan.hook_inserts += want
    for chain, hooks_of_chain in wanted.items():
        if chain not in have:  # a built-in the kernel has not shown yet (fresh table)
            plan.hook_inserts += hooks_of_chain

    # A stale chain still referenced from a foreign chain cannot be deleted
    # without touching that chain; leave it (emptied) rather than fail the table.
    referenced = {jump_target(spec) for name, rules in have.items()
                  if not owns(name) and name not in BUILTIN_CHAINS for spec in rules}
    plan.flushes = [name for name in stale if have_owned[name]]
    plan.deletes = [name for name in stale if name not in referenced]
    return plan


def rules_ahead_of_hooks(actual: KernelTable,
                         owns: Callable[[str], bool]) -> dict[str, list[str]]:
    """Foreign rules that come before our first hook, per built-in chain holding one.

    A packet meets them before any security group: `-I FORWARD 1 -j ACCEPT`
    by another tool lets every bridged packet through. The agent does not
    fight other tools (it puts its hooks at the top only when it writes
    them); it reports what it finds. Built-in chains without our hook are
    left out: the plan puts the hook back, at the top.
    """
    out: dict[str, list[str]] = {}
    for chain, rules in actual.chains.items():
        if chain not in BUILTIN_CHAINS:
            continue
        for position, spec in enumerate(rules):
            target = jump_target(spec)
            if target is not None and owns(target):
                if position:
                    out[chain] = rules[:position]
                break
    return out
