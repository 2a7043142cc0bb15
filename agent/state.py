"""The node's view, shared between the writer thread and the readers.

Rules of this room: the writer thread is the only one that changes this
state (through `record_*`); the admin socket and metrics only read it, under
the lock, as plain values. Nothing here touches the kernel.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.compiler import Compiled
from agent.dataplane.engine import ApplyReport
from agent.model import Policy


@dataclass
class NodeState:
    """What the agent knows and what it last did."""

    mode: str
    backend: str = "unknown"
    namespace: str = ""
    policy: Policy | None = None
    devices: frozenset[str] = frozenset()
    compiled: Compiled | None = None
    generation: int = 0
    in_sync: bool = False
    last_apply_ok_at: float | None = None
    last_report: ApplyReport | None = None
    apply_error: str | None = None
    started_at: float = field(default_factory=time.time)
    applies: int = 0
    drift_repairs: int = 0
    last_drift_at: float | None = None
    enforcement_problems: tuple[str, ...] = ()   # the node cannot enforce (errors)
    enforcement_warnings: tuple[str, ...] = ()   # others' rules that may bypass ours
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_apply(self, compiled: Compiled, report: ApplyReport) -> None:
        with self.lock:
            self.compiled = compiled
            self.last_report = report
            self.in_sync = report.in_sync
            self.generation += 1
            self.applies += 1
            self.last_apply_ok_at = time.time()
            if report.drift_repaired:
                self.drift_repairs += 1
                self.last_drift_at = self.last_apply_ok_at
            self.apply_error = None

    def record_enforcement(self, problems: tuple[str, ...], warnings: tuple[str, ...]) -> None:
        with self.lock:
            self.enforcement_problems = problems
            self.enforcement_warnings = warnings

    def record_failure(self, compiled: Compiled | None, error: str) -> None:
        with self.lock:
            if compiled is not None:
                self.compiled = compiled
            self.in_sync = False
            self.apply_error = error

    def status(self, source_status: dict[str, Any]) -> dict[str, Any]:
        """The `agent-ctl status --json` document (CONTRACT 6)."""
        with self.lock:
            compiled = self.compiled
            errors = list(compiled.errors) if compiled else []
            errors += self.enforcement_problems
            if self.apply_error:
                errors.append(self.apply_error)
            if source_status.get("error"):
                errors.append(str(source_status["error"]))
            known = {p.device for p in self.policy.ports} | set(self.policy.trusted_devices) \
                if self.policy else set()
            report = self.last_report
            return {
                "mode": self.mode,
                "backend": self.backend,
                "netns": self.namespace,
                "in_sync": self.in_sync,
                "generation": self.generation,
                "ports_active": len(compiled.active_ports) if compiled else 0,
                "ports_known": len(self.policy.ports) if self.policy else 0,
                "devices": len(self.devices),
                "unknown_devices": sorted(self.devices - known),
                "policy_loaded": self.policy is not None,
                "last_apply_ok_at": self.last_apply_ok_at,
                "last_apply": None if report is None else {
                    "seconds": round(report.seconds, 4),
                    "tables_written": report.tables_written,
                    "chains_written": report.chains_written,
                    "lines_written": report.lines_written,
                    "ipset_members_added": report.ipset_members_added,
                    "ipset_members_removed": report.ipset_members_removed,
                },
                "rules": compiled.ruleset.rule_count() if compiled else 0,
                "ipsets": len(compiled.ruleset.ipsets) if compiled else 0,
                "applies": self.applies,
                "drift_repairs": self.drift_repairs,
                "last_drift_repair_at": self.last_drift_at,
                "uptime": round(time.time() - self.started_at, 1),
                "source": source_status,
                "errors": errors,
                "warnings": list(self.enforcement_warnings),
            }

    def ports(self) -> list[dict[str, Any]]:
        with self.lock:
            if not self.policy:
                return []
            active = set(self.compiled.active_ports) if self.compiled else set()
            out = []
            for port in sorted(self.policy.ports, key=lambda p: p.device):
                if port.device not in self.devices:
                    continue
                state = "active" if port.id in active else "pending"
                if not port.port_security_enabled:
                    state += " (no port security)"
                out.append({"id": port.id, "device": port.device, "state": state,
                            "mac_address": port.mac_address, "fixed_ips": list(port.fixed_ips),
                            "security_groups": list(port.security_groups)})
            return out
