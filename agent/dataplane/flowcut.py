"""Delete conntrack entries in process over ctnetlink, on the writer thread.

Rules of this room: what to delete is decided by agent/compiler/flows.py;
this only finds and deletes the entries, in the writer thread's namespace.
A failure is reported, not raised: the rules are already right, and the next
packet of a surviving flow is checked against them once its entry expires.

Why not one `conntrack -D` per cut: every run makes the kernel walk the whole
host-wide conntrack hash table, 10-15 ms even when the namespace holds no
entry, so removing one port at 1,000 ports (2,589 cuts) took 35 s. Here each
family is dumped once, the cuts are matched by exact address in Python, and
each matching entry is deleted by its tuple and zone (a hash lookup).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

from agent.compiler.flows import FlowCut

LOG = logging.getLogger(__name__)

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
# Which side of an entry a cut field names: (tuple, address) of a ConntrackEntry.
FIELDS = {"src": ("tuple_orig", "saddr"), "dst": ("tuple_orig", "daddr"),
          "reply_dst": ("tuple_reply", "daddr")}


def describe(cut: FlowCut) -> str:
    """The cut in `conntrack -D` terms, for logs and tests."""
    words = ["-f", "ipv4" if cut.family == 4 else "ipv6"]
    if cut.proto is not None:
        words += ["-p", str(cut.proto)]
    for flag, value in (("-s", cut.src), ("-d", cut.dst), ("--reply-dst", cut.reply_dst)):
        if value:
            words += [flag, value]
    if cut.zone is not None:
        words += ["-w", str(cut.zone)]
    return " ".join(words)


class _Index:
    """Cuts of one family by (field, address): each entry looks up three keys."""

    def __init__(self, cuts: Iterable[FlowCut]) -> None:
        self.by_key: dict[tuple[str, str], list[FlowCut]] = defaultdict(list)
        self.any_address: list[FlowCut] = []
        for cut in cuts:
            field = next((f for f in FIELDS if getattr(cut, f)), None)
            if field is None:
                self.any_address.append(cut)
            else:
                self.by_key[(field, getattr(cut, field))].append(cut)

    def match(self, entry: Any) -> FlowCut | None:
        seen = {f: getattr(getattr(entry, side), attr) for f, (side, attr) in FIELDS.items()}
        candidates = [c for f, addr in seen.items() for c in self.by_key.get((f, addr), ())]
        for cut in candidates + self.any_address:
            if _matches(cut, entry, seen):
                return cut
        return None


def _matches(cut: FlowCut, entry: Any, seen: dict[str, str]) -> bool:
    if cut.proto is not None and entry.tuple_orig.proto != cut.proto:
        return False
    if cut.zone is not None and (entry.zone or 0) != cut.zone:
        return False
    return all(getattr(cut, f) in (None, seen[f]) for f in FIELDS)


def _entries(family: int) -> Iterator[tuple[Conntrack, Any]]:
    with Conntrack(nfgen_family=AF[family]) as ct:
        entries = list(ct.dump_entries())  # dump fully before deleting on the socket
        for entry in entries:
            yield ct, entry


def cut_flows(cuts: Iterable[FlowCut]) -> list[str]:
    """Delete every entry some cut matches; return the failures (empty when all went well)."""
    by_family: dict[int, list[FlowCut]] = defaultdict(list)
    for cut in cuts:
        by_family[cut.family].append(cut)
    failures = []
    for family, family_cuts in sorted(by_family.items()):
        index = _Index(family_cuts)
        deleted: Counter[str] = Counter()
        try:
            for ct, entry in _entries(family):
                cut = index.match(entry)
                if cut is None:
                    continue
                try:
                    ct.entry("del", tuple_orig=entry.tuple_orig, zone=entry.zone or 0)
                    deleted[cut.reason] += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # ENOENT: it expired meanwhile
                        failures.append(f"conntrack cleanup ({cut.reason}, {describe(cut)}) "
                                        f"failed: {exc}")
        except (NetlinkError, OSError) as exc:
            failures.append(f"conntrack cleanup of IPv{family} ({len(family_cuts)} cuts) "
                            f"failed: {exc}")
        for reason, count in sorted(deleted.items()):
            LOG.info("deleted %d conntrack entries (%s)", count, reason)
    return failures
