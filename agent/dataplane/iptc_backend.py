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
   run the plan's operations (`TablePlan.operations()`, the steps
   iptables-restore would run) one by one on that copy, commit once. Any error discards the copy
   (nothing reaches the kernel) and raises KernelWriteError naming the chain
   and the rule. Rules are built before the xtables lock is taken, so it is
   held for read-modify-commit only.
4. Generic translation. Our rules are typed values (agent/vocab/rules.py):
   the header fields go to the entry, and each match's and the target's
   options are handed to that extension's own parser in libxtables, as
   iptables does. No extension is special-cased here, so any match or target
   iptables-restore accepts works, byte for byte the same. A rule recurs on
   many ports, so each distinct rule, and each distinct match or target in
   it, is translated once and its bytes reused. The one text still read is
   a stale hook the kernel showed (`-D`), as a value (agent/vocab/rule_text.py),
   to be deleted by exact match.
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
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import iptc
from iptc.xtables import XT_INV_PROTO, xt_align, xtables

from agent.dataplane.command import KernelWriteError, run
from agent.dataplane.plan import Operation, TablePlan
from agent.dataplane.restore_backend import BINARIES, list_chain
from agent.dataplane.xtables_lock import xtables_lock
from agent.vocab import protocols
from agent.vocab.rule_text import parse_rule_text
from agent.vocab.rules import IptablesRule

# Serialises every use of python-iptables in this process (rule 1).
_IPTC_LOCK = threading.Lock()


VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
# The python-iptables attribute of each header flag.
HEADER_FIELDS = {"-s": "src", "-d": "dst", "-i": "in_interface", "-o": "out_interface",
                 "-p": "protocol"}
# Extensions whose parser resolves a name in the kernel (an ipset's index), so
# their bytes are valid only while that object lives: never reused across commits.
KERNEL_RESOLVED = frozenset({"set", "SET"})
# getopt's has_arg values, libxtables' option type that takes no argument, and
# the most values an old-style extension parser is given for one option.
NO_ARGUMENT, REQUIRED_ARGUMENT = 0, 1
XTTYPE_NONE = 0
MAX_VALUES = 2
# getopt's index into argv, which an old-style parser advances past extra values.
OPTIND = ctypes.c_int.in_dll(ctypes.CDLL(None), "optind")
# Distinct rules (or blobs, or names) a builder keeps after a commit. Most
# rules are port-specific (spoof pairs, dispatch), so a larger cache buys
# little and costs about 1 KB a rule in RSS.
MAX_CACHED_SPECS = 5_000


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


@dataclass(frozen=True)
class Segment:
    """One `-m NAME` match or `-j`/`-g NAME` target of a spec, with its options."""

    flag: str                                         # "-m", "-j" or "-g"
    name: str
    options: tuple[tuple[bool, str, tuple[str, ...]], ...] = ()  # (negated, --opt, values)


@dataclass(frozen=True)
class Blob:
    """An extension's part of an entry: its bytes and how many of them a delete compares."""

    data: bytes
    usersize: int


@dataclass(frozen=True)
class Built:
    """One translated rule: the entry libiptc copies, and what must hold at commit."""

    entry: ctypes.Array[ctypes.c_ubyte]
    mask: ctypes.Array[ctypes.c_ubyte]  # the bytes a delete by exact match compares
    jump: str | None                    # the user chain it jumps or goes to


def segments_of(rule: IptablesRule) -> tuple[list[tuple[str, bool, str]], list[Segment]]:
    """One of our rules as header options [(field, negated, value)] and segments."""
    header = [(HEADER_FIELDS[flag], negated, value) for flag, value, negated in rule.header()]
    segments = [Segment("-m", "comment", ((False, "--comment", (rule.comment,)),))] \
        if rule.comment else []
    segments += [Segment("-m", m.module, tuple((o.negated, o.flag, o.values)
                                               for o in m.options)) for m in rule.matches]
    target = rule.target
    segments.append(Segment("-g" if target.goto else "-j", target.name,
                            tuple((o.negated, o.flag, o.values) for o in target.options)))
    return header, segments


def protocol_number(word: str) -> int:
    """A `-p` token of our rules (`protocols.token`) as its number."""
    number = protocols.token_number(word)
    if number is None:
        raise SpecError(f"unknown protocol {word!r}")
    return number


class RuleBuilder:
    """Translates rules of one family into libiptc entries.

    An entry is the ip header, one blob per match and one for the target.
    Each blob is made by the extension's own parser once per distinct
    (protocol, segment) and reused: the protocol is the only header field an
    extension parser reads (tcp, multiport, DNAT check it). Blobs of
    `KERNEL_RESOLVED` extensions hold a kernel object's index, so they live
    for one commit only (`begin`). One scratch rule and one Match/Target per
    extension are reused (`reset()` between uses), because creating them is
    most of python-iptables' cost.
    Use only under `_IPTC_LOCK` (libxtables keeps parser state in globals).
    """

    def __init__(self, family: int) -> None:
        self.family = family
        self._rule: iptc.Rule = _Rule4() if family == 4 else _Rule6()
        self._goto_flag = (iptc.ip4tc.ipt_ip.IPT_F_GOTO if family == 4
                           else iptc.ip6tc.ip6t_ip6.IP6T_F_GOTO)
        self._xt = xtables(iptc.ip4tc.NFPROTO_IPV4 if family == 4 else iptc.ip6tc.NFPROTO_IPV6)
        self._standard_target = iptc.Target(self._rule, "")
        self._modules: dict[tuple[str, str], iptc.Match | iptc.Target] = {}
        self._is_extension: dict[str, bool] = {}
        self._arity: dict[tuple[str, str, str], tuple[int, int] | None] = {}
        self._blobs: dict[tuple[int, int, Segment], Blob] = {}
        self._volatile: dict[tuple[int, int, Segment], Blob] = {}
        self._specs: dict[IptablesRule, Built] = {}

    def begin(self) -> None:
        """Start a commit: forget kernel-resolved blobs."""
        self._volatile.clear()

    def end(self) -> None:
        """End a commit: bound the caches, so a cold apply's tens of thousands of
        specs (about 1 KB each with their ctypes buffers) are not kept."""
        self._volatile.clear()
        caches = (self._specs, self._blobs, self._is_extension)
        if max(len(cache) for cache in caches) > MAX_CACHED_SPECS:
            for cache in caches:
                cache.clear()

    def build(self, spec: IptablesRule, chains: Collection[str] = ()) -> Built:
        """Translate `spec`; raise SpecError naming the offending part.

        `chains` are names known to be user chains (the plan's own): a jump to
        one needs no search for a target extension of that name, which costs a
        failed dlopen (~0.3 ms) per name. The answer is the same either way,
        since iptables refuses to create a chain named like a target.
        """
        built = self._specs.get(spec)
        if built is None:
            try:
                built, reusable = self._build(spec, chains)
            except SpecError:
                raise
            except (iptc.XTablesError, iptc.IPTCError, ValueError, AttributeError,
                    TypeError, LookupError) as exc:
                raise SpecError(str(exc) or type(exc).__name__) from exc
            if reusable:
                self._specs[spec] = built
        return built

    def _build(self, spec: IptablesRule, chains: Collection[str]) -> tuple[Built, bool]:
        header, segments = segments_of(spec)
        rule = self._rule
        rule.rule = None  # a fresh, zeroed entry header
        for field, negate, word in header:
            self._set_header(rule, field, word, negate)
        ip = rule.get_ip()
        target = segments.pop() if segments and segments[-1].flag != "-m" else None
        if target is not None and target.flag == "-g":
            ip.flags |= self._goto_flag
        blobs = [self._blob(segment) for segment in segments]
        jump = None
        if target is None:  # a rule without -j only counts packets
            blobs.append(self._standard(""))
        elif self._is_standard(target, chains):
            blobs.append(self._standard(target.name))
            jump = None if target.name in VERDICTS else target.name
        else:
            blobs.append(self._blob(target))
        entry = rule.entry
        entry_size = xt_align(ctypes.sizeof(entry))
        entry.target_offset = entry_size + sum(len(b.data) for b in blobs[:-1])
        entry.next_offset = entry.target_offset + len(blobs[-1].data)
        data = ctypes.string_at(ctypes.addressof(entry), entry_size)
        mask = b"\xff" * entry_size
        for blob in blobs:
            data += blob.data
            mask += b"\xff" * blob.usersize + b"\0" * (len(blob.data) - blob.usersize)
        array = ctypes.c_ubyte * len(data)
        reusable = not any(s.name in KERNEL_RESOLVED for s in segments) and not (
            target and target.name in KERNEL_RESOLVED)
        return Built(array.from_buffer_copy(data), array.from_buffer_copy(mask), jump), reusable

    def _set_header(self, rule: iptc.Rule, field: str, word: str, negate: bool) -> None:
        """-s/-d/-i/-o through python-iptables' setters; -p as iptables sets it."""
        if field != "protocol":
            setattr(rule, field, ("!" if negate else "") + word)
            return
        ip = rule.get_ip()
        ip.proto = protocol_number(word)
        if negate:
            ip.invflags |= XT_INV_PROTO
        if self.family == 6:
            # ip6tables flags the protocol as set even when negated; python-iptables does not.
            ip.flags |= iptc.ip6tc.ip6t_ip6.IP6T_F_PROTO

    def _blob(self, segment: Segment) -> Blob:
        """The bytes of one match or extension target, as the extension parses them."""
        ip = self._rule.get_ip()
        key = (ip.proto, ip.invflags & XT_INV_PROTO, segment)
        cache = self._volatile if segment.name in KERNEL_RESOLVED else self._blobs
        blob = cache.get(key)
        if blob is not None:
            return blob
        module = self._modules.get((segment.flag, segment.name))
        if module is None:
            module = self._modules[(segment.flag, segment.name)] = (
                iptc.Match(self._rule, segment.name) if segment.flag == "-m"
                else iptc.Target(self._rule, segment.name))
        else:
            module.reset()
        for negate, option, values in segment.options:
            what = f"{segment.name}: {'! ' * negate}{option} {' '.join(values)}".rstrip()
            arity_key = (segment.flag, segment.name, option)
            if arity_key not in self._arity:
                self._arity[arity_key] = _option_arity(module, option[2:])
            arity = self._arity[arity_key]
            if arity is None:
                raise SpecError(f"{what}: {segment.name} has no option {option}")
            if not arity[0] <= len(values) <= arity[1]:
                raise SpecError(f"{what}: takes {arity[0]} to {arity[1]} values")
            try:
                module.set_parameter(option[2:], ["!", *values] if negate else list(values))
            except (iptc.XTablesError, ValueError, AttributeError, LookupError) as exc:
                raise SpecError(f"{what}: {exc}") from exc
            # python-iptables points optind at the last value; a parser reading a
            # second value moves it one further. Any other count was not all read.
            if OPTIND.value != len(values) + (len(values) > 1):
                raise SpecError(f"{what}: {segment.name} reads "
                                f"{'two values' if len(values) < 2 else 'one value'} here")
        self._final_check(module)
        struct = module.match if isinstance(module, iptc.Match) else module.target
        blob = cache[key] = Blob(ctypes.string_at(ctypes.addressof(struct), module.size),
                                 module.usersize)
        return blob

    def _standard(self, name: str) -> Blob:
        """The standard target: a verdict, a chain to jump or go to, or "" (none)."""
        key = (0, 0, Segment("-j", name))
        blob = self._blobs.get(key)
        if blob is None:
            target = self._standard_target
            target.target.u.user.name = name.encode()
            blob = self._blobs[key] = Blob(
                ctypes.string_at(ctypes.addressof(target.target), target.size), target.usersize)
        return blob

    def _is_standard(self, target: Segment, chains: Collection[str]) -> bool:
        """Whether the target is a verdict or a chain: iptables' order, extensions first."""
        if target.flag == "-g" or target.name in VERDICTS:
            if target.options:
                raise SpecError(f"{target.flag} {target.name} takes no options")
            return True
        if target.options:  # only an extension takes options
            return False
        if target.name in chains:
            return True
        if target.name not in self._is_extension:
            self._is_extension[target.name] = bool(self._xt.find_target(target.name))
        return not self._is_extension[target.name]

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


def _option_arity(module: iptc.Match | iptc.Target, option: str) -> tuple[int, int] | None:
    """How many values the extension's `--option` takes, (least, most); None: no such option.

    iptables asks getopt, which reads the extension's option table. python-
    iptables does not: it hands the extension a NULL argument for an option
    given without one (an extension expecting one then crashes the process)
    and silently drops values a parser does not read. So read the same table
    first (python-iptables 1.2 keeps the extension in `_module`, an alias's
    own options in `_orig_options`). Guided (x6) options take one value at
    most; an old-style parser may read more (`--match-set NAME src`).
    """
    name = option.encode()
    ext = module._module
    table = module._orig_options or (getattr(ext, "x6_options", None)
                                     if getattr(ext, "x6_parse", None) else None)
    i = 0
    while table and table[i].name:
        if table[i].name == name:
            return (0, 0) if table[i].type == XTTYPE_NONE else (1, 1)
        i += 1
    opts = None if table else ext.extra_opts
    i = 0
    while opts and opts[i].name:
        if opts[i].name == name:
            return {NO_ARGUMENT: (0, 0), REQUIRED_ARGUMENT: (1, MAX_VALUES)}.get(
                opts[i].has_arg, (0, MAX_VALUES))
        i += 1
    return None


class IptcBackend:
    """The `iptc` backend: libiptc through python-iptables, legacy tables only."""

    mode = "iptc"

    def __init__(self, lock_timeout: float = 5.0) -> None:
        self.lock_timeout = lock_timeout
        with _IPTC_LOCK:
            self._builders = {4: RuleBuilder(4), 6: RuleBuilder(6)}

    def save(self, family: int, table: str | None = None) -> str:
        return run([BINARIES[("iptables-legacy", family)] + "-save",
                    *(["-t", table] if table else [])])

    def list_chain(self, family: int, table: str, chain: str) -> str | None:
        return list_chain(BINARIES[("iptables-legacy", family)], table, chain)

    def commit(self, plan: TablePlan) -> None:
        """One atomic transaction for one table: the whole plan or nothing."""
        with _IPTC_LOCK:
            built = self._build_all(plan)
            with xtables_lock(self.lock_timeout):
                table = None
                try:
                    table = (iptc.Table if plan.family == 4 else iptc.Table6)(
                        plan.table, autocommit=False)  # a process-wide singleton
                    table.refresh()  # read the table through this thread's namespace
                    _Replay(table, plan, built).run()
                    table.commit()
                except iptc.IPTCError as exc:  # reading or committing the whole table
                    chains = ", ".join(list(plan.rewrites)[:8]) or "none"
                    raise KernelWriteError(f"{plan.table} v{plan.family}: {exc} (chains "
                                           f"rewritten in this transaction: {chains})") from exc
                finally:
                    if table is not None:
                        table.close()  # frees the copy; uncommitted changes are dropped
                    self._builders[plan.family].end()

    def _build_all(self, plan: TablePlan) -> dict[IptablesRule | str, Built]:
        """Every rule the plan appends, inserts or deletes, translated before the lock."""
        builder = self._builders[plan.family]
        builder.begin()
        built: dict[IptablesRule | str, Built] = {}
        for op in plan.operations():
            if op.rule is not None and op.rule not in built:
                try:
                    rule = parse_rule_text(op.rule) if isinstance(op.rule, str) else op.rule
                    built[op.rule] = builder.build(rule, plan.rewrites.keys())
                except (SpecError, ValueError) as exc:
                    raise KernelWriteError(f"{plan.table} v{plan.family}: chain {op.chain}: "
                                           f"rule {_text(op.rule)!r}: {exc}") from exc
        return built


def _text(rule: IptablesRule | str) -> str:
    return rule if isinstance(rule, str) else rule.text


class _Replay:
    """The plan's operations, `TablePlan.operations()`, run one by one on one table handle.

    Replaying the very steps iptables-restore would run keeps the two backends'
    order of operations the same, whatever plan.py decides it should be.
    """

    def __init__(self, table: iptc.Table, plan: TablePlan,
                 built: dict[IptablesRule | str, Built]) -> None:
        self.table = table
        self.plan = plan
        self.built = built
        self.chains_known: set[str] = set()

    def run(self) -> None:
        table = self.table
        for op in self.plan.operations():
            chain = op.chain
            if op.op == ":":  # create, or flush if it exists
                self._do(op, table.flush_entries if table.is_chain(chain)
                         else table.create_chain, chain)
            elif op.op == "-A":
                self._do(op, table.append_entry, chain, self._checked(op).entry)
            elif op.op == "-I":
                self._do(op, table.insert_entry, chain, self._checked(op).entry, 0)
            elif op.op == "-D":
                built = self._checked(op)
                self._do(op, table.delete_entry, chain, built.entry, built.mask)
            elif op.op == "-F":
                self._do(op, table.flush_entries, chain)
            elif op.op == "-X":
                self._do(op, table.delete_chain, chain)
            else:
                raise KernelWriteError(f"{self.plan.table} v{self.plan.family}: the iptc "
                                       f"backend cannot run {op.line()!r}")

    def _checked(self, op: Operation) -> Built:
        """The operation's entry, once its jump target is known to be a user chain here.

        libiptc would take an unknown name for a target extension and the
        kernel would refuse the whole table without saying which rule.
        """
        assert op.rule is not None
        built = self.built[op.rule]
        if built.jump and built.jump not in self.chains_known:
            if not self.table.is_chain(built.jump) or self.table.builtin_chain(built.jump):
                raise KernelWriteError(
                    f"{self.plan.table} v{self.plan.family}: chain {op.chain}: rule "
                    f"{_text(op.rule)!r} jumps to {built.jump!r}, which is neither a user "
                    f"chain of this table nor a target extension python-iptables can load "
                    f"for IPv{self.plan.family}")
            self.chains_known.add(built.jump)
        return built

    def _do(self, op: Operation, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except iptc.IPTCError as exc:
            what = f"rule {_text(op.rule)!r}" if op.rule is not None else "the chain"
            raise KernelWriteError(f"{self.plan.table} v{self.plan.family}: chain {op.chain}: "
                                   f"{what}: {exc}") from exc
