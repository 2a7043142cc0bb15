"""Dispatch trees: find a device's chain in O(log n) rules, not 2n.

Rules of this room: pure. A dispatch tree maps interface names to actions
(`-g <port chain>`, `-j RETURN`, `-j CT --zone 4097`) through chains keyed on
name prefixes, each matching `--physdev-in tapab+` (or `--physdev-out`, or
`-i`/`-o` for the raw table's bridges) and going to the next level, as Felix
does for workload interfaces. Every chain of the tree ends in the unknown
verdict, so a managed device nobody knows never passes.

Because each level *goes to* (`-g`) the next, a port chain's RETURN comes back
to whoever *jumped* into the root, whatever the depth.

Rules a packet walks carry no comment: a comment is a match the kernel runs
for every rule walked, on legacy and on iptables-nft alike (measured at 1,000
ports: a tree rule costs ~100 ns with its comment and ~45 ns without on
legacy, ~147 and ~81 ns on nft), and the targets already say where a rule
goes (`-g hostfw-oab12`, `-g hostfw-from-ab`). Only leaves whose target does
not name the port (RETURN for a port without port security, a CT zone) and
each chain's final unknown verdict keep one.

Subtrees are memoised on their entries: adding one port re-renders only the
chains on the path to its leaf, which keeps a one-port apply cheap at 1,000
ports.

Fan-out against depth, measured on 1,000 ports of the peer workload (Neutron
tap names, hex): a lookup evaluates 19 rules on average and 36 at most for
any FANOUT from 4 to 32, because a split branches on every next character
present (17 for hex and `-`), not on FANOUT; 64 keeps one flat level (31 on
average, chains of 65 rules). A level cannot be narrower than the characters
present, since physdev matches only a name or a prefix: mixed-case names
branch up to 62 ways (40 rules on average). Such a node is cut into linked
pieces (`_linked`): that bounds the chains' length, and so what one port's
change rewrites, not the rules a packet walks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from agent.vocab.names import Names
from agent.vocab.rules import IptablesRule, Target, goto, physdev

FANOUT = 16  # a node with more entries than this splits by the next character
LONGEST = 2 * FANOUT + 2  # a longer chain is cut into linked pieces of at most this

Entry = tuple[str, Target, str]   # (name, action, comment), sorted by name
Chains = dict[str, tuple[IptablesRule, ...]]


@dataclass(frozen=True)
class Key:
    """What a tree matches names on, and the prefix every name of it starts with.

    `field` is `physdev-in` (from a VM), `physdev-out` (to a VM, bridged),
    `in` or `out` (`-i`/`-o`: a bridge, in the raw table). Chains below the
    root are named after the name prefix they hold, less `start`; `noun` is
    what the comments call a name.
    """

    field: str
    start: str = ""
    noun: str = "device"

    def rule(self, name: str, target: Target, comment: str) -> IptablesRule:
        """The rule matching `name`; a goto names its chain, so it needs no comment."""
        if target.goto:
            comment = ""
        if self.field == "physdev-in":
            return IptablesRule(target, matches=(physdev(in_dev=name),), comment=comment)
        if self.field == "physdev-out":
            return IptablesRule(target, matches=(physdev(out_dev=name, bridged=True),),
                                comment=comment)
        if self.field == "in":
            return IptablesRule(target, in_iface=name, comment=comment)
        return IptablesRule(target, out_iface=name, comment=comment)


def build_tree(root: str, entries: tuple[Entry, ...], key: Key, unknown: Target,
               names: Names) -> Chains:
    """The chains of the tree rooted at shared chain `root` (e.g. "from").

    `key` says what the rules match; `unknown` is the final verdict of every
    chain.
    """
    chains: Chains = {}
    _collect(names.chain(root), root, key.start, entries, key, unknown, names, chains)
    return chains


def _collect(chain: str, root: str, prefix: str, entries: tuple[Entry, ...], key: Key,
             unknown: Target, names: Names, out: Chains) -> None:
    rules, children = _node(root, prefix, entries, key, unknown, names)
    if len(rules) <= LONGEST:
        out[chain] = rules
    else:
        out.update(_linked(chain, root, prefix[len(key.start):], rules, names))
    for child, child_prefix, child_entries in children:
        _collect(child, root, child_prefix, child_entries, key, unknown, names, out)


@lru_cache(maxsize=1 << 13)
def _node(root: str, prefix: str, entries: tuple[Entry, ...], key: Key, unknown: Target,
          names: Names) -> tuple[tuple[IptablesRule, ...],
                                 tuple[tuple[str, str, tuple[Entry, ...]], ...]]:
    """One chain's rules, and its children as (chain, prefix, entries)."""
    rules: list[IptablesRule] = []
    children: list[tuple[str, str, tuple[Entry, ...]]] = []
    if len(entries) <= FANOUT:
        rules += [key.rule(dev, action, note) for dev, action, note in entries]
    else:
        # Skip levels every device shares: they would be chains of one rule.
        depth = max(len(prefix), len(os.path.commonprefix([e[0] for e in entries])))
        rules += [key.rule(dev, action, note) for dev, action, note in entries
                  if len(dev) == depth]
        branches: dict[str, list[Entry]] = {}
        for entry in entries:
            if len(entry[0]) > depth:
                branches.setdefault(entry[0][: depth + 1], []).append(entry)
        for sub_prefix, sub in sorted(branches.items()):
            if len(sub) == 1:
                dev, action, note = sub[0]
                rules.append(key.rule(dev, action, note))
                continue
            child = names.tree_chain(root, sub_prefix[len(key.start):])
            rules.append(key.rule(sub_prefix + "+", goto(child), f"{key.noun}s {sub_prefix}+"))
            children.append((child, sub_prefix, tuple(sub)))
    rules.append(IptablesRule(unknown, comment=f"unknown {key.noun}"))
    return tuple(rules), tuple(children)


@lru_cache(maxsize=1 << 10)
def _linked(chain: str, root: str, suffix: str, rules: tuple[IptablesRule, ...],
            names: Names) -> Chains:
    """A node too wide for one chain (e.g. mixed-case names), cut into linked pieces.

    Each piece but the last ends by going to the next, named after the node's
    prefix plus `~<n>` (`~` never occurs in a device name), so no chain is
    longer than LONGEST and a change rewrites one short piece; a packet walks
    the same rules plus one jump per piece.
    """
    step = LONGEST - 1
    pieces = [rules[i:i + step] for i in range(0, len(rules), step)]
    piece_names = [chain] + [names.tree_chain(root, f"{suffix}~{n}")
                             for n in range(1, len(pieces))]
    out = {}
    for n, piece in enumerate(pieces):
        if n + 1 < len(pieces):
            piece = (*piece, IptablesRule(goto(piece_names[n + 1]), comment="more devices"))
        out[piece_names[n]] = piece
    return out
