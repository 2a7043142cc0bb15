"""Delete conntrack entries (`conntrack -D`), on the writer thread.

Rules of this room: what to delete is decided by agent/compiler/flows.py;
this only runs the commands, in the writer thread's namespace. "No entries"
(exit 1 with that message) is success. A failure is reported, not raised: the
rules are already right, and the next packet of a surviving flow is still
checked against them once its entry expires.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agent.compiler.flows import FlowCut
from agent.dataplane.command import KernelWriteError, run

LOG = logging.getLogger(__name__)


def argv(cut: FlowCut) -> list[str]:
    args = ["conntrack", "-D", "-f", "ipv4" if cut.family == 4 else "ipv6"]
    if cut.proto is not None:
        args += ["-p", str(cut.proto)]
    if cut.src:
        args += ["-s", cut.src]
    if cut.dst:
        args += ["-d", cut.dst]
    if cut.reply_dst:
        args += ["--reply-dst", cut.reply_dst]
    if cut.zone is not None:
        args += ["-w", str(cut.zone)]
    return args


def cut_flows(cuts: Iterable[FlowCut]) -> list[str]:
    """Run every cut; return the failures (empty when all went well)."""
    failures = []
    for cut in cuts:
        try:
            run(argv(cut), timeout=30)
            LOG.info("deleted conntrack entries (%s): %s", cut.reason, " ".join(argv(cut)[2:]))
        except KernelWriteError as exc:
            if "0 flow entries have been deleted" in str(exc):
                continue
            failures.append(f"conntrack cleanup ({cut.reason}) failed: {exc}")
    return failures
