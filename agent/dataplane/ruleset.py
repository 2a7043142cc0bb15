"""The desired kernel state as a value: tables of chains of rule texts, and ipsets.

Rules of this room:

1. A `Ruleset` is what the compiler returns and what the reconciler consumes.
   It is immutable and holds no kernel handles, so two rulesets compare with
   `==` and a test can assert on one without a kernel.
2. A rule is its canonical text: exactly what `iptables-save` prints after
   `-A <chain> ` (addresses and protocol first, then matches in the order
   given, then the target). If the text we write differs from the text the
   kernel prints, every resync rewrites everything, so `render_rule` is the
   one place that orders the tokens.
3. Every owned rule's first match is a comment holding a short hash of the
   rule's content, so a reader can tell our rules apart and see at a glance
   which ones changed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

COMMENT_RE = re.compile(r"^[A-Za-z0-9 _.,:/=+-]{0,200}$")
FAMILIES = (4, 6)
TABLE_ORDER = ("raw", "mangle", "nat", "filter")


def render_rule(target: str, *, src: str | None = None, dst: str | None = None,
                in_iface: str | None = None, out_iface: str | None = None,
                proto: str | None = None, matches: Iterable[str] = (),
                comment: str = "") -> str:
    """Render one rule in iptables-save order, with a hash-bearing comment first.

    `target` is the text after `-j`/`-g` included (e.g. `-j RETURN`, `-g chain`).
    `comment` must pass COMMENT_RE: it is written into the kernel verbatim.
    Most rules of a large ruleset are repeats (every port's heads and tails),
    so renders are cached.
    """
    return _render(target, src, dst, in_iface, out_iface, proto, tuple(matches), comment)


@lru_cache(maxsize=1 << 16)
def _render(target: str, src: str | None, dst: str | None, in_iface: str | None,
            out_iface: str | None, proto: str | None, matches: tuple[str, ...],
            comment: str) -> str:
    if not COMMENT_RE.match(comment):
        raise ValueError(f"comment {comment!r} has characters outside the whitelist")
    head = []
    if src:
        head += ["-s", src]
    if dst:
        head += ["-d", dst]
    if in_iface:
        head += ["-i", in_iface]
    if out_iface:
        head += ["-o", out_iface]
    if proto:
        head += ["-p", proto]
    body = " ".join([*head, *matches, target])
    digest = rule_hash(body)
    text = f"{digest} {comment}".strip()
    quoted = f'"{text}"' if " " in text else text
    return " ".join([*head, "-m comment --comment", quoted, *matches, target])


def rule_hash(body: str) -> str:
    """A short content hash; 8 hex digits are plenty inside one chain."""
    return hashlib.sha256(body.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Hook:
    """A rule the agent keeps in a built-in chain, found and fixed by exact text."""

    chain: str
    spec: str


@dataclass(frozen=True)
class Table:
    """The owned part of one (family, table): owned chains and hooks into built-ins."""

    family: int
    name: str
    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hooks: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class IpSet:
    """An owned ipset: a hash:net set of networks of one family."""

    name: str
    family: int
    members: frozenset[str] = frozenset()
    kind: str = "hash:net"


@dataclass(frozen=True)
class Ruleset:
    tables: Mapping[tuple[int, str], Table] = field(default_factory=dict)
    ipsets: Mapping[str, IpSet] = field(default_factory=dict)

    def rule_count(self) -> int:
        return sum(len(rules) for t in self.tables.values() for rules in t.chains.values())


class TableBuilder:
    """Collects chains and hooks for one table while the compiler walks the ports."""

    def __init__(self, family: int, name: str) -> None:
        self.family = family
        self.name = name
        # Lists while being appended to; whole chains from memo caches are tuples.
        self.chains: dict[str, list[str] | tuple[str, ...]] = {}
        self.hooks: list[Hook] = []

    def chain(self, name: str) -> list[str]:
        """The rule list of chain `name`, created empty on first use."""
        rules = self.chains.setdefault(name, [])
        if isinstance(rules, tuple):
            rules = self.chains[name] = list(rules)
        return rules

    def hook(self, builtin: str, target_chain: str) -> None:
        self.hooks.append(Hook(builtin, f"-j {target_chain}"))

    def build(self) -> Table:
        return Table(self.family, self.name,
                     {name: tuple(rules) for name, rules in self.chains.items()},
                     tuple(self.hooks))


def merge(*rulesets: Ruleset) -> Ruleset:
    """Combine rulesets built by separate compilers (filter, nat) into one."""
    tables: dict[tuple[int, str], Table] = {}
    ipsets: dict[str, IpSet] = {}
    for rs in rulesets:
        for key, table in rs.tables.items():
            if key in tables:
                old = tables[key]
                clash = set(old.chains) & set(table.chains)
                if clash:
                    raise ValueError(f"chains {sorted(clash)} defined twice in {key}")
                table = Table(table.family, table.name, {**old.chains, **table.chains},
                              old.hooks + table.hooks)
            tables[key] = table
        ipsets.update(rs.ipsets)
    return Ruleset(tables, ipsets)
