"""iptables-restore backends (legacy and nft): read a family, commit a table.

Rules of this room: a backend knows two things only, how to read every table
of one family (`*-save`) and how to commit one table's script atomically
(`*-restore --noflush --wait`). What to write is decided by plan.py.
"""

from __future__ import annotations

import logging

from agent.dataplane.command import KernelWriteError, run
from agent.dataplane.plan import TablePlan
from agent.vocab import protocols

LOG = logging.getLogger(__name__)

BINARIES = {
    ("iptables-legacy", 4): "iptables-legacy", ("iptables-legacy", 6): "ip6tables-legacy",
    ("iptables-nft", 4): "iptables-nft", ("iptables-nft", 6): "ip6tables-nft",
}


def _protocol_lookup() -> dict[str, int]:
    """Names from /etc/protocols, which iptables-save uses to print numbers."""
    lookup: dict[str, int] = {}
    try:
        with open("/etc/protocols", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and fields[1].isdigit():
                    for name in [fields[0], *fields[2:]]:
                        lookup.setdefault(name, int(fields[1]))
    except OSError:
        pass
    return lookup


PROTOCOL_LOOKUP = _protocol_lookup()


def normalise_proto(word: str) -> str:
    return protocols.canonical_token(word, PROTOCOL_LOOKUP)


class RestoreBackend:
    """One of the iptables-restore flavours; `mode` is a [firewall] backend value."""

    def __init__(self, mode: str) -> None:
        if (mode, 4) not in BINARIES:
            raise ValueError(f"unknown restore backend {mode!r}")
        self.mode = mode

    def save(self, family: int, table: str | None = None) -> str:
        return run([BINARIES[(self.mode, family)] + "-save", *(["-t", table] if table else [])])

    def list_chain(self, family: int, table: str, chain: str) -> str | None:
        return list_chain(BINARIES[(self.mode, family)], table, chain)

    def commit(self, plan: TablePlan) -> None:
        """One atomic transaction for one table: the whole plan or nothing."""
        run([BINARIES[(self.mode, plan.family)] + "-restore", "--noflush", "--wait", "5"],
            plan.script())


def list_chain(binary: str, table: str, chain: str) -> str | None:
    """`<binary> -t table -S chain`; None when the chain is missing (exit status 1)."""
    try:
        return run([binary, "-w", "5", "-t", table, "-S", chain])
    except KernelWriteError as exc:
        if " exited 1:" in str(exc):
            return None
        raise


def detect_mode() -> str:
    """Pick legacy or nft the way kube-proxy does: whichever already holds rules.

    Counts rule lines in each mode's save output of the managed namespace (a
    restarted agent's own rules count too, so it adopts the mode it wrote). On
    a tie, follow the `iptables` alternative's version string.
    """
    scores = {}
    for mode in ("iptables-legacy", "iptables-nft"):
        score = 0
        for family in (4, 6):
            try:
                text = RestoreBackend(mode).save(family)
            except KernelWriteError:
                continue
            for line in text.splitlines():
                if line.startswith("-A "):
                    score += 1
        scores[mode] = score
    if scores.get("iptables-legacy", 0) != scores.get("iptables-nft", 0):
        choice = max(scores, key=lambda m: scores[m])
        reason = f"rule counts {scores}"
    else:
        try:
            version = run(["iptables", "--version"])
        except KernelWriteError:
            version = ""
        choice = "iptables-nft" if "nf_tables" in version else "iptables-legacy"
        reason = f"no rules either way; iptables is {version.strip() or 'missing'}"
    LOG.info("firewall backend auto: chose %s (%s)", choice, reason)
    return choice
