"""Delete conntrack entries in process over ctnetlink, on the writer thread.

Rules of this room: what to delete is decided by agent/compiler/flows.py (cuts
after a change) and agent/compiler/stale_flows.py (the audit of every entry
against the current policy, at start); this only finds and deletes the
entries, in the writer thread's namespace. A failure is reported, not raised:
the rules are already right. What did not get done comes back in
`CutReport.retry` (and `complete` is false when a dump was cut short), so the
caller can try again at its next apply instead of leaving a revoked flow
established for good.

Why not one `conntrack -D` per cut: every run makes the kernel walk the whole
host-wide conntrack hash table, 10-15 ms even when the namespace holds no
entry, so removing one port at 1,000 ports (2,589 cuts) took 35 s. Here each
family is dumped once, the cuts are matched by address in Python (exact
addresses by a dict lookup, networks by one lookup per prefix length), and
each matching entry is deleted by its tuple and zone (a hash lookup).

Why bounded: the sweep runs on the writer thread, which feeds the systemd
watchdog. It calls `progress` every `Limits.progress_every` entries (the
daemon passes its watchdog ping) and stops after `Limits.seconds` or
`Limits.entries`, reporting itself incomplete. Only the entries to delete are
kept (the dump is not held in memory), and the deletes run on a second
socket once the dump is over.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import Conntrack, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.vocab.flows import Flow, FlowCut

LOG = logging.getLogger(__name__)

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
# Which side of an entry a cut field names: (tuple, address) of a ConntrackEntry.
FIELDS = {"src": ("tuple_orig", "saddr"), "dst": ("tuple_orig", "daddr"),
          "reply_dst": ("tuple_reply", "daddr")}
BITS = {4: 32, 6: 128}


@dataclass(frozen=True)
class Limits:
    """How far one sweep of a family's entries may go before it gives up."""

    seconds: float = 15.0        # for the whole pass (every family), dump and deletes
    entries: int = 1_000_000     # entries looked at per family
    progress_every: int = 1000   # call `progress` after this many entries or deletes


@dataclass
class CutReport:
    """What a pass did; `retry` and `complete` say what the next one must redo."""

    deleted: int = 0
    errors: list[str] = field(default_factory=list)
    retry: list[FlowCut] = field(default_factory=list)  # cuts not known to be done
    complete: bool = True  # every dump ran to its end


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
    """Cuts of one family by (field, address) or (field, prefix length, network)."""

    def __init__(self, family: int, cuts: Iterable[FlowCut]) -> None:
        self.bits = BITS[family]
        self.by_key: dict[tuple[str, str], list[FlowCut]] = defaultdict(list)
        self.by_net: dict[tuple[str, int, int], list[FlowCut]] = defaultdict(list)
        self.prefixes: dict[str, set[int]] = defaultdict(set)  # field -> prefix lengths
        self.any_address: list[FlowCut] = []
        for cut in cuts:
            field_ = next((f for f in FIELDS if getattr(cut, f)), None)
            if field_ is None:
                self.any_address.append(cut)
                continue
            value = getattr(cut, field_)
            if "/" in value:
                net = ipaddress.ip_network(value)
                self.by_net[(field_, net.prefixlen, int(net.network_address))].append(cut)
                self.prefixes[field_].add(net.prefixlen)
            else:
                self.by_key[(field_, value)].append(cut)

    def match(self, entry: Any) -> FlowCut | None:
        seen = {f: getattr(getattr(entry, side), attr) for f, (side, attr) in FIELDS.items()}
        candidates = [c for f, addr in seen.items() for c in self.by_key.get((f, addr), ())]
        for f, lengths in self.prefixes.items():
            if not seen[f]:
                continue
            value = int(ipaddress.ip_address(seen[f]))
            for length in lengths:
                mask = ((1 << length) - 1) << (self.bits - length)
                candidates += self.by_net.get((f, length, value & mask), ())
        for cut in candidates + self.any_address:
            if _matches(cut, entry, seen):
                return cut
        return None


def _matches(cut: FlowCut, entry: Any, seen: dict[str, str]) -> bool:
    if cut.proto is not None and entry.tuple_orig.proto != cut.proto:
        return False
    if cut.zone is not None and (entry.zone or 0) != cut.zone:
        return False
    return all(_covers(getattr(cut, f), seen[f]) for f in FIELDS)


def _covers(want: str | None, address: str | None) -> bool:
    if want is None:
        return True
    if address is None:
        return False
    if "/" not in want:
        return want == address
    return ipaddress.ip_address(address) in ipaddress.ip_network(want)


def as_flow(family: int, entry: Any) -> Flow:
    """A ctnetlink entry as the pure audit sees it: its original tuple, zone, NAT."""
    orig, reply = entry.tuple_orig, entry.tuple_reply
    return Flow(family=family, proto=orig.proto, src=orig.saddr, dst=orig.daddr,
                sport=orig.sport, dport=orig.dport, icmp_type=orig.icmp_type,
                icmp_code=orig.icmp_code, zone=entry.zone or 0,
                nat=(reply.saddr, reply.daddr) != (orig.daddr, orig.saddr))


class _Pass:
    """One bounded pass: the deadline, the progress calls and the report."""

    def __init__(self, limits: Limits, progress: Callable[[], None],
                 clock: Callable[[], float]) -> None:
        self.limits, self.progress, self.clock = limits, progress, clock
        self.deadline = clock() + limits.seconds
        self.report = CutReport()

    def sweep(self, family: int, pick: Callable[[Any], FlowCut | None]) -> bool:
        """Delete the entries `pick` names a cut for; False when the sweep failed or
        stopped short (the caller then retries its cuts). Failed deletes go to retry."""
        chosen: list[tuple[Any, FlowCut]] = []
        try:
            complete = self._dump(family, pick, chosen)
        except (NetlinkError, OSError) as exc:
            self.report.errors.append(f"conntrack dump of IPv{family} failed: {exc}")
            self.report.complete = False
            return False
        deleted: Counter[str] = Counter()
        try:
            with Conntrack(nfgen_family=AF[family]) as ct:
                for n, (entry, cut) in enumerate(chosen, 1):
                    if self._tick(n) and self.clock() > self.deadline:
                        self.report.errors.append(f"conntrack cleanup of IPv{family} stopped "
                                                  f"after {self.limits.seconds:g} s")
                        self.report.retry += [c for _, c in chosen[n - 1:]]
                        complete = False
                        break
                    try:
                        ct.entry("del", tuple_orig=entry.tuple_orig, zone=entry.zone or 0)
                        deleted[cut.reason] += 1
                    except NetlinkError as exc:
                        if exc.code != errno.ENOENT:  # ENOENT: it expired meanwhile
                            self.report.errors.append(
                                f"conntrack cleanup ({cut.reason}, {describe(cut)}) failed: "
                                f"{exc}")
                            self.report.retry.append(cut)
        except (NetlinkError, OSError) as exc:
            self.report.errors.append(f"conntrack cleanup of IPv{family} failed: {exc}")
            self.report.retry += [c for _, c in chosen]
            complete = False
        for reason, count in sorted(deleted.items()):
            LOG.info("deleted %d conntrack entries (%s)", count, reason)
        self.report.deleted += sum(deleted.values())
        self.report.complete &= complete
        return complete

    def _dump(self, family: int, pick: Callable[[Any], FlowCut | None],
              chosen: list[tuple[Any, FlowCut]]) -> bool:
        with Conntrack(nfgen_family=AF[family]) as ct:
            for n, entry in enumerate(_dump_entries(ct), 1):
                if self._tick(n) and self.clock() > self.deadline:
                    self.report.errors.append(f"conntrack dump of IPv{family} stopped after "
                                              f"{self.limits.seconds:g} s ({n} entries)")
                    return False
                if n > self.limits.entries:
                    self.report.errors.append(f"conntrack dump of IPv{family} stopped after "
                                              f"{self.limits.entries} entries")
                    return False
                cut = pick(entry)
                if cut is not None:
                    chosen.append((entry, cut))
        return True

    def _tick(self, n: int) -> bool:
        """Every `progress_every` steps: feed the caller's watchdog; True then."""
        if n % self.limits.progress_every:
            return False
        self.progress()
        return True


def _dump_entries(ct: Conntrack) -> Iterator[Any]:
    """The namespace's entries of the socket's family (a seam for tests)."""
    return iter(ct.dump_entries())


def cut(cuts: Iterable[FlowCut], limits: Limits = Limits(),
        progress: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic) -> CutReport:
    """Delete every entry some cut matches, within `limits`.

    `report.retry` holds the cuts to pass again next time: all of a family
    whose dump failed or stopped short, and those whose delete failed.
    """
    by_family: dict[int, list[FlowCut]] = defaultdict(list)
    for c in dict.fromkeys(cuts):
        by_family[c.family].append(c)
    run = _Pass(limits, progress, clock)
    for family, family_cuts in sorted(by_family.items()):
        index = _Index(family, family_cuts)
        if not run.sweep(family, index.match):
            run.report.retry += family_cuts
    run.report.retry = list(dict.fromkeys(run.report.retry))
    return run.report


def audit(verdict: Callable[[Flow], str | None], families: Iterable[int],
          limits: Limits = Limits(), progress: Callable[[], None] = lambda: None,
          clock: Callable[[], float] = time.monotonic) -> CutReport:
    """Delete every entry `verdict` gives a reason for (stale_flows.FlowAudit.verdict).

    A failed delete comes back in `retry` as a cut of that flow's addresses;
    `complete` is false when a dump failed or stopped short: audit again.
    """
    run = _Pass(limits, progress, clock)
    for family in families:
        def pick(entry: Any, family: int = family) -> FlowCut | None:
            flow = as_flow(family, entry)
            reason = verdict(flow)
            if reason is None:
                return None
            return FlowCut(family, flow.proto, src=flow.src, dst=flow.dst, zone=flow.zone,
                           reason=reason)
        run.sweep(family, pick)
    return run.report


def node_addresses() -> frozenset[str]:
    """Addresses of this namespace's own interfaces (the node, for the audit)."""
    with IPRoute() as ipr:
        return frozenset(str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()
                         if a.get_attr("IFA_ADDRESS"))
