"""Conntrack entries and cuts as values: what the compiler judges and the dataplane deletes.

Rules of this room: values only. The compiler (agent/compiler/flows.py,
stale_flows.py) says which entries go, as `FlowCut`s or by judging a `Flow`
the dataplane read; the dataplane (agent/dataplane/flowcut.py) reads entries
as `Flow`s and turns a cut into a netlink filter. Neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlowCut:
    """`conntrack -D -f <family> [-p proto] [-s src] [-d dst] [--reply-dst R] [-w zone]`.

    `src`, `dst` and `reply_dst` are an address (`10.0.0.5`) or a network
    (`10.1.0.0/16`, every address in it).
    """

    family: int
    proto: int | None = None
    src: str | None = None
    dst: str | None = None
    zone: int | None = None
    reason: str = ""
    reply_dst: str | None = None


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, as its first packet saw it (the original tuple)."""

    family: int
    proto: int
    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    zone: int = 0
    nat: bool = False  # the reply tuple is not the original's mirror
