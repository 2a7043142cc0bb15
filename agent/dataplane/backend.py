"""What every kernel backend offers: read a family, commit one table's plan.

Rules of this room: the API is kept this small on purpose (Felix's Table
keeps to "hook a kernel chain, replace an owned chain"): a backend reads the
whole family (or one table) as iptables-save text, lists one chain (to read
back what a write touched), and commits one `TablePlan` atomically. All
deciding happens in plan.py and engine.py, so every backend behaves the same.
"""

from __future__ import annotations

from typing import Protocol

from agent.dataplane.plan import TablePlan


class Backend(Protocol):
    mode: str

    def save(self, family: int, table: str | None = None) -> str:
        """Every table of `family` (or just `table`) in iptables-save format."""

    def list_chain(self, family: int, table: str, chain: str) -> str | None:
        """One chain as `iptables -S` prints it; None when the kernel has no such chain."""

    def commit(self, plan: TablePlan) -> None:
        """Apply `plan` to its table in one atomic transaction, or raise KernelWriteError."""
