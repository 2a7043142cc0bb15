"""Dispatch trees: find a device's chain in O(log n) rules, not 2n.

Rules of this room: pure. A dispatch tree maps device names to actions
(`-g <port chain>` or `-j RETURN`) through chains keyed on name prefixes, each
matching `--physdev-in tapab+` (or `--physdev-out`) and going to the next
level, as Felix does for workload interfaces. Every chain of the tree ends in
the unknown-device verdict, so a managed device nobody knows never passes.

Because each level *goes to* (`-g`) the next, a port chain's RETURN comes back
to whoever *jumped* into the root, whatever the depth.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from agent.dataplane.ruleset import TableBuilder, render_rule

FANOUT = 16  # a node with more entries than this splits by the next character


def build_tree(builder: TableBuilder, root: str, base_prefix: str,
               entries: Sequence[tuple[str, str, str]], match: Callable[[str], str],
               unknown: str, chain_name: Callable[[str], str]) -> None:
    """Fill chain `root` (and its children) dispatching `entries` by device name.

    `entries` are (device, action, comment) sorted by device; `match(pattern)`
    renders the physdev match for a device name or a `prefix+` wildcard;
    `unknown` is the final verdict of every chain; `chain_name(prefix)` names the
    chain of the subtree whose devices start with `prefix`.
    """
    _node(builder, root, base_prefix, list(entries), match, unknown, chain_name)


def _node(builder: TableBuilder, chain: str, prefix: str,
          entries: list[tuple[str, str, str]], match: Callable[[str], str],
          unknown: str, chain_name: Callable[[str], str]) -> None:
    rules = builder.chain(chain)
    if len(entries) <= FANOUT:
        rules += [render_rule(action, matches=[match(dev)], comment=note)
                  for dev, action, note in entries]
    else:
        # Skip levels every device shares: they would be chains of one rule.
        depth = max(len(prefix), len(os.path.commonprefix([e[0] for e in entries])))
        exact = [e for e in entries if len(e[0]) == depth]
        rules += [render_rule(action, matches=[match(dev)], comment=note)
                  for dev, action, note in exact]
        branches: dict[str, list[tuple[str, str, str]]] = {}
        for entry in entries:
            if len(entry[0]) > depth:
                branches.setdefault(entry[0][: depth + 1], []).append(entry)
        for sub_prefix, sub in sorted(branches.items()):
            if len(sub) == 1:
                dev, action, note = sub[0]
                rules.append(render_rule(action, matches=[match(dev)], comment=note))
                continue
            child = chain_name(sub_prefix)
            rules.append(render_rule(f"-g {child}", matches=[match(sub_prefix + "+")],
                                     comment=f"devices {sub_prefix}+"))
            _node(builder, child, sub_prefix, sub, match, unknown, chain_name)
    rules.append(render_rule(unknown, comment="unknown device"))
