"""The desired kernel state as a value: tables of chains of rules, and ipsets.

Rules of this room:

1. A `Ruleset` is what the compiler returns and what the reconciler consumes.
   It is immutable and holds no kernel handles, so two rulesets compare with
   `==` and a test can assert on one without a kernel.
2. A chain is a tuple of typed `IptablesRule` values (agent/vocab/rules.py), rendered
   to text only where a backend or a reader needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from agent.vocab.rules import IptablesRule, call

FAMILIES = (4, 6)
TABLE_ORDER = ("raw", "mangle", "nat", "filter")


@dataclass(frozen=True)
class Hook:
    """A jump the agent keeps in a built-in chain (`-A FORWARD -j hostfw-FORWARD`).

    Hooks live among other tools' rules, so they are found and fixed by their
    exact text, `spec`.
    """

    chain: str      # the built-in chain
    target: str     # the owned chain it jumps to

    @cached_property
    def rule(self) -> IptablesRule:
        return IptablesRule(call(self.target))

    @property
    def spec(self) -> str:
        return self.rule.text


@dataclass(frozen=True)
class Table:
    """The owned part of one (family, table): owned chains and hooks into built-ins."""

    family: int
    name: str
    chains: Mapping[str, tuple[IptablesRule, ...]] = field(default_factory=dict)
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
        self.chains: dict[str, list[IptablesRule] | tuple[IptablesRule, ...]] = {}
        self.hooks: list[Hook] = []

    def chain(self, name: str) -> list[IptablesRule]:
        """The rule list of chain `name`, created empty on first use."""
        rules = self.chains.setdefault(name, [])
        if isinstance(rules, tuple):
            rules = self.chains[name] = list(rules)
        return rules

    def hook(self, builtin: str, target_chain: str) -> None:
        self.hooks.append(Hook(builtin, target_chain))

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
