"""Rules as typed values: header fields, matches and a target, rendered once.

Rules of this room:

1. The compiler builds `Rule` values; nothing downstream parses our rules'
   text back. The planner compares, the iptc backend builds libiptc entries
   and `agent-ctl trace` walks packets from these fields. Only the kernel's
   own output (iptables-save) is ever read as text, by the dataplane.
2. `IptablesRule.text` is the one rendering: exactly what `iptables-save` prints
   after `-A <chain> ` (addresses, interfaces and protocol first, then the
   comment, then the matches in the order given, then the target), so the
   text we write equals the text the kernel shows and a resync compares
   them as they are. It is computed on first use and kept on the value.
3. Two rules are equal when their texts are: the rendering is a function of
   every field, so this is value equality, at the cost of one string compare.
4. No content hash: ownership is by chain name, and comparing canonical
   texts already finds every change. A rule carries a comment only where a
   reader of `iptables -S` needs one; each comment costs a match per packet
   on the legacy backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

COMMENT_RE = re.compile(r"^[A-Za-z0-9 _.,:/=+-]{0,200}$")


@dataclass(frozen=True)
class Option:
    """One option of a match or target: `--dport 80`, `! --ctstate DNAT`, `--notrack`."""

    flag: str
    values: tuple[str, ...] = ()
    negated: bool = False

    def render(self) -> str:
        words = [self.flag, *self.values]
        return " ".join(["!", *words] if self.negated else words)


@dataclass(frozen=True)
class Match:
    """A match extension and its options: `-m physdev --physdev-in tap1`."""

    module: str
    options: tuple[Option, ...] = ()

    def render(self) -> str:
        return " ".join(["-m", self.module, *(o.render() for o in self.options)])

    def option(self, flag: str) -> Option | None:
        """The option named `flag`, if the match has it."""
        return next((o for o in self.options if o.flag == flag), None)


@dataclass(frozen=True)
class Target:
    """Where a matching packet goes: a verdict, a target extension or a chain.

    `chain` says the name is a chain (built with `call` or `goto`); `goto`
    renders `-g`, so the chain's RETURN goes back past this one. Only
    extensions (`MARK`, `CT`, `SNAT`) carry options.
    """

    name: str
    goto: bool = False
    options: tuple[Option, ...] = ()
    chain: bool = False

    def render(self) -> str:
        return " ".join(["-g" if self.goto else "-j", self.name,
                         *(o.render() for o in self.options)])


@dataclass(frozen=True, eq=False)
class IptablesRule:
    """One iptables rule of an owned chain, as a value."""

    target: Target
    src: str | None = None
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    proto: str | None = None
    matches: tuple[Match, ...] = ()
    comment: str = ""
    negated: frozenset[str] = frozenset()   # header flags written with `!` (`-s`)

    def __post_init__(self) -> None:
        if not COMMENT_RE.match(self.comment):
            raise ValueError(f"comment {self.comment!r} has characters outside the whitelist")

    @cached_property
    def text(self) -> str:
        """The rule as iptables-save prints it after `-A <chain> `."""
        words = []
        for flag, value, negated in self.header():
            words += ["!", flag, value] if negated else [flag, value]
        if self.comment:
            quoted = f'"{self.comment}"' if " " in self.comment else self.comment
            words += ["-m comment --comment", quoted]
        words += [m.render() for m in self.matches]
        words.append(self.target.render())
        return " ".join(words)

    @property
    def jump(self) -> str | None:
        """The chain this rule jumps or goes to, if its target is a chain."""
        return self.target.name if self.target.chain else None

    def header(self) -> list[tuple[str, str, bool]]:
        """The set header fields as (flag, value, negated), in iptables-save order."""
        return [(flag, value, flag in self.negated) for flag, value in (
            ("-s", self.src), ("-d", self.dst), ("-i", self.in_iface),
            ("-o", self.out_iface), ("-p", self.proto)) if value]

    def match(self, module: str) -> Match | None:
        """The rule's first match of `module`, if it has one."""
        return next((m for m in self.matches if m.module == module), None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IptablesRule) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"IptablesRule({self.text!r})"


# ------------------------------------------------------- building blocks

def opt(flag: str, *values: str | int, negated: bool = False) -> Option:
    return Option(flag, tuple(str(v) for v in values), negated)


def match(module: str, *options: Option) -> Match:
    return Match(module, options)


def jump(name: str, *options: Option) -> Target:
    """`-j name [options]`: a verdict (`DROP`) or a target extension (`CT --notrack`)."""
    return Target(name, False, options)


def call(chain: str) -> Target:
    """`-j chain`: the chain's RETURN comes back here."""
    return Target(chain, False, (), True)


def goto(chain: str) -> Target:
    """`-g chain`: the chain's RETURN goes back to whoever jumped to this one."""
    return Target(chain, True, (), True)


def physdev(*, in_dev: str | None = None, out_dev: str | None = None,
            bridged: bool | None = None) -> Match:
    """`-m physdev`: the bridge ports a bridged packet came in or goes out by.

    `bridged` True adds `--physdev-is-bridged`, False `! --physdev-is-bridged`.
    """
    options = []
    if in_dev:
        options.append(opt("--physdev-in", in_dev))
    if out_dev:
        options.append(opt("--physdev-out", out_dev))
    if bridged is not None:
        options.append(Option("--physdev-is-bridged", (), not bridged))
    return Match("physdev", tuple(options))


def ctstate(states: str, negated: bool = False) -> Match:
    """`-m conntrack --ctstate RELATED,ESTABLISHED` (states comma-separated, kernel order)."""
    return Match("conntrack", (opt("--ctstate", states, negated=negated),))


def mark(value: int, mask: int) -> Match:
    return Match("mark", (opt("--mark", f"{value:#x}/{mask:#x}"),))


def mac_source(mac: str) -> Match:
    return Match("mac", (opt("--mac-source", mac),))


def ports(module: str, sport: str | int | None = None, dport: str | int | None = None) -> Match:
    """`-m tcp --sport 68 --dport 67` (the protocol's own module)."""
    options = []
    if sport is not None:
        options.append(opt("--sport", sport))
    if dport is not None:
        options.append(opt("--dport", dport))
    return Match(module, tuple(options))


def multiport(flag: str, span: str) -> Match:
    """`-m multiport --dports 1000:2000` (`flag` is `--sports` or `--dports`)."""
    return Match("multiport", (opt(flag, span),))


def icmp(family: int, kind: str | int) -> Match:
    """`-m icmp --icmp-type 8/0` or `-m icmp6 --icmpv6-type 135`."""
    if family == 4:
        return Match("icmp", (opt("--icmp-type", kind),))
    return Match("icmp6", (opt("--icmpv6-type", kind),))


def match_set(name: str, direction: str) -> Match:
    """`-m set --match-set <name> src|dst`."""
    return Match("set", (opt("--match-set", name, direction),))
