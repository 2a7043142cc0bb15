"""python-iptables (libiptc) backend: commit a TablePlan in process, without a fork.

Rules of this room:

1. One thread at a time. python-iptables is not thread-safe at all (process-
   wide Table singletons, libxtables globals, a static jmp_buf), so every call
   into it happens under `_IPTC_LOCK`; the daemon calls it from the writer
   thread only.
2. The namespace is the calling thread's. libiptc opens its socket when a
   table is read (`Table.refresh`) and commits through that socket, so each
   commit re-reads the table on the calling thread (the writer, which entered
   `[agent] netns`) and closes the handle when done: no handle outlives a
   commit or can carry one namespace's table into another.
3. One transaction per table, under the host's xtables lock: read the table,
   replay the plan's operations in the order of `TablePlan.lines()`, commit
   once. Any error discards the private copy (nothing reaches the kernel) and
   raises KernelWriteError naming the chain and the rule. Rules are built
   before the lock is taken, so the lock is held for read-modify-commit only.
4. Generic translation. A rule spec is the canonical iptables-save text. It is
   read the way iptables reads it: header options (-s -d -i -o -p, with `!`),
   `-m NAME` followed by options handed to that extension's own parser in
   libxtables, then `-j`/`-g`. No extension is special-cased here, so any
   match or target iptables-restore accepts works, byte for byte the same.
   A spec recurs on many ports, so each distinct spec is built once per commit.
5. stdout is never redirected. python-iptables reads parameters back by
   dup2-ing fd 1 to a pipe while an extension prints (`Rule.final_check`,
   attribute reads); another thread's output would be lost or, worse, parsed
   as part of a rule. This module calls the extensions' final checks directly
   and never reads a parameter back.
6. Reading is iptables-legacy-save (libiptc is legacy-only), never Rule
   objects (~180 us per rule).
"""

from __future__ import annotations

import ctypes
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any

import iptc
from iptc.xtables import xtables

from agent import protocols
from agent.dataplane.command import KernelWriteError, run
from agent.dataplane.plan import TablePlan
from agent.dataplane.restore_backend import BINARIES
from agent.dataplane.xtables_lock import xtables_lock

# Serialises every use of python-iptables in this process (rule 1).
_IPTC_LOCK = threading.Lock()

# iptables-save quoting: a double-quoted token with backslash escapes, or a bare word.
TOKEN_RE = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
UNESCAPE_RE = re.compile(r"\\(.)")

VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
HEADER_OPTIONS = {"-s": "src", "--source": "src", "-d": "dst", "--destination": "dst",
                  "-i": "in_interface", "--in-interface": "in_interface",
                  "-o": "out_interface", "--out-interface": "out_interface",
                  "-p": "protocol", "--protocol": "protocol"}
MATCH_OPTIONS = ("-m", "--match")
JUMP_OPTIONS = ("-j", "--jump")
GOTO_OPTIONS = ("-g", "--goto")
# Extensions whose parser resolves a name in the kernel (an ipset's index), so
# their bytes are valid only while that object lives: never reused across commits.
KERNEL_RESOLVED = frozenset({"set", "SET"})


class SpecError(ValueError):
    """A rule spec that cannot be translated; the message says which token and why."""


class _Rule4(iptc.Rule):
    """An IPv4 rule that never probes other tables.

    python-iptables decides whether a target name is a chain by opening every
    table of the family (`Rule.tables`), which creates missing tables (nat
    pulls in conntrack hooks) with autocommit on. This backend resolves chain
    jumps itself, so the probe is switched off.
    """

    tables: list[Any] = []  # shadows the probing property


class _Rule6(iptc.Rule6):
    """The IPv6 counterpart of `_Rule4`."""

    tables: list[Any] = []  # shadows the probing property


@dataclass
class Built:
    """One translated rule: the entry libiptc copies, and what must hold at commit."""

    entry: ctypes.Array[ctypes.c_ubyte]
    jump: str | None          # the user chain it jumps or goes to, checked to exist
    reusable: bool            # False when its bytes hold kernel-resolved indexes
    mask: ctypes.Array[ctypes.c_ubyte] | None = None  # which bytes a delete compares


def tokenize(spec: str) -> list[tuple[str, bool]]:
    """Split a spec as iptables-save quotes it: (text, was_quoted) pairs.

    Quotedness matters: a quoted token is always a value, even one that starts
    with `-` or is `!`. (shlex loses that, and keeps the backslash of the `\\'`
    iptables-save writes for a quote inside a comment.)
    """
    out = []
    for match in TOKEN_RE.finditer(spec):
        quoted, bare = match.groups()
        if quoted is not None:
            out.append((UNESCAPE_RE.sub(r"\1", quoted), True))
        else:
            out.append((bare, False))
    return out


def _is_value(token: tuple[str, bool]) -> bool:
    text, quoted = token
    return quoted or not (text.startswith("-") or text == "!")


def protocol_number(word: str) -> int:
    """A `-p` argument as a number, the way iptables resolves it."""
    if word.isdigit():
        return int(word)
    if word in ("all", "any"):
        return 0
    if word in protocols.NAME_TO_NUMBER:
        return protocols.NAME_TO_NUMBER[word]
    try:
        return socket.getprotobyname(word)
    except OSError:
        raise SpecError(f"unknown protocol {word!r}") from None


class RuleBuilder:
    """Translates canonical rule specs of one family into libiptc entries.

    Use only under `_IPTC_LOCK` (libxtables keeps parser state in globals).
    """

    def __init__(self, family: int) -> None:
        self.family = family
        self._rule_class = _Rule4 if family == 4 else _Rule6
        self._xt = xtables(iptc.ip4tc.NFPROTO_IPV4 if family == 4 else iptc.ip6tc.NFPROTO_IPV6)
        self._is_extension: dict[str, bool] = {}

    def build(self, spec: str) -> tuple[iptc.Rule, Built]:
        """Translate `spec`; raise SpecError naming the offending token."""
        try:
            return self._build(spec)
        except SpecError:
            raise
        except (iptc.XTablesError, iptc.IPTCError, ValueError, AttributeError,
                TypeError) as exc:
            raise SpecError(str(exc) or type(exc).__name__) from exc

    def _build(self, spec: str) -> tuple[iptc.Rule, Built]:
        tokens = tokenize(spec)
        rule = self._rule_class()
        module: iptc.Match | iptc.Target | None = None   # receives --options
        jump: str | None = None
        reusable = True
        negate = False
        i = 0
        while i < len(tokens):
            text, quoted = tokens[i]
            if quoted:
                raise SpecError(f"unexpected value {text!r}")
            if text == "!":
                if negate:
                    raise SpecError("two '!' in a row")
                negate = True
                i += 1
                continue
            values = []
            i += 1
            while i < len(tokens) and _is_value(tokens[i]):
                values.append(tokens[i][0])
                i += 1
            if text.startswith("--") and text not in HEADER_OPTIONS and text not in (
                    *MATCH_OPTIONS, *JUMP_OPTIONS, *GOTO_OPTIONS):
                if module is None:
                    raise SpecError(f"option {text} outside a -m match or -j target")
                try:
                    module.set_parameter(text[2:], ["!", *values] if negate else values)
                except (iptc.XTablesError, ValueError, AttributeError) as exc:
                    raise SpecError(f"{module.name} {'! ' * negate}{text} "
                                    f"{' '.join(values)}: {exc}") from exc
                negate = False
                continue
            if module is not None:
                self._final_check(module)
                module = None
            if len(values) != 1:
                raise SpecError(f"{text} takes one argument, got {values}")
            word = values[0]
            if text in HEADER_OPTIONS:
                self._set_header(rule, HEADER_OPTIONS[text], word, negate)
            elif negate:
                raise SpecError(f"'!' cannot negate {text}")
            elif text in MATCH_OPTIONS:
                module = rule.create_match(word)
                reusable &= word not in KERNEL_RESOLVED
            elif text in JUMP_OPTIONS or text in GOTO_OPTIONS:
                if rule.target is not None:
                    raise SpecError("more than one -j/-g")
                module, jump = self._target(rule, word, goto=text in GOTO_OPTIONS)
                reusable &= word not in KERNEL_RESOLVED
            else:
                raise SpecError(f"unsupported option {text}")
            negate = False
        if negate:
            raise SpecError("'!' at the end")
        if module is not None:
            self._final_check(module)
        if rule.target is None:  # a rule without -j only counts packets
            rule.target = iptc.Target(rule, "")
        return rule, Built(rule.rule, jump, reusable)

    def _set_header(self, rule: iptc.Rule, field: str, word: str, negate: bool) -> None:
        """-s/-d/-i/-o through python-iptables' setters; -p as iptables sets it."""
        if field != "protocol":
            setattr(rule, field, ("!" if negate else "") + word)
            return
        ip = rule.get_ip()
        ip.proto = protocol_number(word)
        if negate:
            ip.invflags |= iptc.xtables.XT_INV_PROTO
        if self.family == 6:
            # ip6tables flags the protocol as set even when negated; python-iptables does not.
            ip.flags |= iptc.ip6tc.ip6t_ip6.IP6T_F_PROTO

    def _target(self, rule: iptc.Rule, name: str,
                goto: bool) -> tuple[iptc.Target | None, str | None]:
        """The target for `-j name`/`-g name`: (module taking options, chain jumped to).

        Like iptables: an extension of that name wins, else it is a chain (whose
        existence is checked in the table at commit time, where it may be created).
        """
        if name in VERDICTS:
            rule.target = iptc.Target(rule, name, goto=goto)
            return None, None
        if not goto and self._extension_exists(name):
            target = iptc.Target(rule, name, goto=False)
            rule.target = target
            return target, None
        target = iptc.Target(rule, "", goto=goto)  # the standard target...
        target.standard_target = name              # ...naming the chain
        rule.target = target
        return None, name

    def _extension_exists(self, name: str) -> bool:
        if name not in self._is_extension:
            self._is_extension[name] = bool(self._xt.find_target(name))
        return self._is_extension[name]

    @staticmethod
    def _final_check(module: iptc.Match | iptc.Target) -> None:
        """The extension's own final check, as iptables runs it after parsing.

        python-iptables' public `final_check()` first re-reads every parameter
        by capturing the extension's save() output on fd 1 (rule 5), which is
        also the slowest part of building a rule; the check itself is this call.
        """
        try:
            module._final_check()
        except iptc.XTablesError as exc:
            raise SpecError(f"{module.name}: {exc}") from exc


class IptcBackend:
    """The `iptc` backend: libiptc through python-iptables, legacy tables only."""

    mode = "iptc"

    def __init__(self, lock_timeout: float = 5.0) -> None:
        self.lock_timeout = lock_timeout
        self._builders = {4: RuleBuilder(4), 6: RuleBuilder(6)}
        self._reusable: dict[tuple[int, str], Built] = {}  # spec -> entry, across commits

    def save(self, family: int) -> str:
        return run([BINARIES[("iptables-legacy", family)] + "-save"])

    def commit(self, plan: TablePlan) -> None:
        """One atomic transaction for one table: the whole plan or nothing."""
        with _IPTC_LOCK:
            built = self._build_all(plan)
            with xtables_lock(self.lock_timeout):
                table = (iptc.Table if plan.family == 4 else iptc.Table6)(
                    plan.table, autocommit=False)
                try:
                    table.refresh()
                    _Replay(table, plan, built).run()
                    table.commit()
                except iptc.IPTCError as exc:
                    raise KernelWriteError(f"{plan.table} v{plan.family}: {exc}") from exc
                finally:
                    table.close()  # frees the copy; uncommitted changes are dropped

    def _build_all(self, plan: TablePlan) -> dict[str, Built]:
        """Every spec the plan appends, inserts or deletes, each translated once."""
        builder = self._builders[plan.family]
        specs = [(chain, spec) for chain, rules in plan.rewrites.items() for spec in rules]
        built: dict[str, Built] = {}
        for chain, spec in specs + plan.hook_inserts:
            if spec not in built:
                built[spec] = self._reusable.get((plan.family, spec)) or \
                    self._translate(builder, plan, chain, spec)[1]
                if built[spec].reusable:
                    self._reusable[(plan.family, spec)] = built[spec]
        for chain, spec in plan.hook_deletes:  # rare: built afresh, with a compare mask
            rule, fresh = self._translate(builder, plan, chain, spec)
            fresh.mask = rule.mask
            built[spec] = fresh
        return built

    @staticmethod
    def _translate(builder: RuleBuilder, plan: TablePlan, chain: str,
                   spec: str) -> tuple[iptc.Rule, Built]:
        try:
            return builder.build(spec)
        except SpecError as exc:
            raise KernelWriteError(f"{plan.table} v{plan.family}: chain {chain}: "
                                   f"rule {spec!r}: {exc}") from exc


class _Replay:
    """The plan's operations on one table handle, in `TablePlan.lines()` order."""

    def __init__(self, table: iptc.Table, plan: TablePlan, built: dict[str, Built]) -> None:
        self.table = table
        self.plan = plan
        self.built = built
        self.chains_known: set[str] = set()

    def run(self) -> None:
        table, plan = self.table, self.plan
        for name in plan.rewrites:  # ":name - [0:0]": create, or flush if it exists
            self._do(name, None, table.flush_entries if table.is_chain(name)
                     else table.create_chain, name)
        for name, rules in plan.rewrites.items():
            for spec in rules:
                self._do(name, spec, table.append_entry, name, self._entry(name, spec))
        for chain, spec in reversed(plan.hook_inserts):
            self._do(chain, spec, table.insert_entry, chain, self._entry(chain, spec), 0)
        for chain, spec in plan.hook_deletes:
            entry = self._entry(chain, spec)
            self._do(chain, spec, table.delete_entry, chain, entry, self.built[spec].mask)
        for name in plan.flushes:
            self._do(name, None, table.flush_entries, name)
        for name in plan.deletes:
            self._do(name, None, table.delete_chain, name)

    def _entry(self, chain: str, spec: str) -> ctypes.Array[ctypes.c_ubyte]:
        built = self.built[spec]
        if built.jump and built.jump not in self.chains_known:
            if not self.table.is_chain(built.jump) or self.table.builtin_chain(built.jump):
                raise KernelWriteError(
                    f"{self.plan.table} v{self.plan.family}: chain {chain}: rule {spec!r} "
                    f"jumps to {built.jump!r}, which is not a user chain of this table")
            self.chains_known.add(built.jump)
        return built.entry

    def _do(self, chain: str, spec: str | None, op: Any, *args: Any) -> None:
        try:
            op(*args)
        except iptc.IPTCError as exc:
            what = f"rule {spec!r}" if spec else "the chain"
            raise KernelWriteError(f"{self.plan.table} v{self.plan.family}: chain {chain}: "
                                   f"{what}: {exc}") from exc
