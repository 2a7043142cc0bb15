"""Heartbeats to Neutron (`report_state` on q-reports-plugin), so the agent is listed alive.

Rules of this room:

1. The message is Neutron's own: `report_state(agent_state={"agent_state":
   {...}}, time=...)`, as neutron.agent.rpc.PluginReportStateAPI sends it and
   neutron.db.agents_db.AgentExtRpcCallback reads it. `agent_state` carries
   the binary, `[DEFAULT] host`, the topic, the agent type, `configurations`
   and `start_flag` (true until a report has been accepted, so the server
   records a (re)start); `time` is the agent's UTC clock, which the server
   compares with its own at start. Building it (`agent_state`,
   `report_kwargs`) is pure.
2. One thread of its own ("report-state") reports every `[agent]
   report_interval` seconds, as a call with that interval as its timeout,
   like Neutron's L2 agents: a report lost to a broker or server fault is
   logged and the next one is sent on time. Interval 0 turns reporting off.
3. Configurations come from a callable (backend, port count, in_sync ...),
   read at each report: the reporter knows nothing of the agent's state.
   A failing callable costs that report's configurations, never the
   heartbeat.
4. The server answers "revived" when it had already declared the agent dead:
   notifications sent meanwhile may be lost, so `on_revived` (a resync) is
   called, as Neutron's agents do a full sync then.
5. Like every RPC of the agent, the thread is made by `start`, in the
   agent's own network namespace, where the broker is reachable.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import oslo_messaging as messaging

from agent.sources import rpc_api

LOG = logging.getLogger(__name__)
REVIVED = "revived"   # neutron-lib agent constants: AGENT_NEW, AGENT_ALIVE, AGENT_REVIVED


def agent_state(host: str, configurations: Mapping[str, Any], start_flag: bool) -> dict[str, Any]:
    """The `agent_state` dict Neutron stores as the agents table's row."""
    state: dict[str, Any] = {
        "binary": rpc_api.AGENT_BINARY,
        "host": host,
        "topic": rpc_api.AGENT_TOPIC,
        "agent_type": rpc_api.AGENT_TYPE,
        "configurations": dict(configurations),
        "uuid": str(uuid.uuid4()),   # lets a server log line be matched with ours
    }
    if start_flag:
        state["start_flag"] = True
    return state


def report_kwargs(state: Mapping[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """The keyword arguments of one `report_state` call; `now` is UTC."""
    return {"agent_state": {"agent_state": dict(state)},
            "time": now.strftime(rpc_api.AGENT_TIME_FORMAT)}


def configurations_of(status: Mapping[str, Any]) -> dict[str, Any]:
    """The configurations hostfw reports, from the `agent-ctl status` document."""
    return {"backend": status.get("backend"), "mode": status.get("mode"),
            "ports": status.get("ports_active", 0), "devices": status.get("devices", 0),
            "in_sync": bool(status.get("in_sync")), "generation": status.get("generation", 0)}


class StateReporter:
    """Sends `report_state` every `interval` seconds from a thread of its own."""

    def __init__(self, transport: messaging.Transport, host: str, interval: float,
                 configurations: Callable[[], Mapping[str, Any]],
                 on_revived: Callable[[], None] = lambda: None) -> None:
        self.host = host
        self.interval = interval
        self._configurations = configurations
        self._on_revived = on_revived
        self._client = messaging.get_rpc_client(
            transport, messaging.Target(topic=rpc_api.REPORTS_TOPIC,
                                        version=rpc_api.REPORT_STATE_VERSION))
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Guarded by _lock: what `status` shows.
        self._start_flag = True
        self._reports = 0
        self._failures = 0
        self._last_ok_at: float | None = None
        self._last_error: str | None = None

    def start(self) -> None:
        """Start reporting (no thread at all when the interval is 0)."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="report-state", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop after the report in flight, if any (bounded by `timeout`)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.is_set():
            started = time.monotonic()
            self.report_once()
            self._stopped.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def report_once(self) -> str | None:
        """Send one report; the server's answer ("new", "alive", "revived") or None."""
        try:
            configurations = dict(self._configurations())
        except Exception as exc:  # rule 3: the heartbeat goes on without them
            LOG.warning("report_state: configurations unavailable: %s", exc)
            configurations = {}
        with self._lock:
            start_flag = self._start_flag
        kwargs = report_kwargs(agent_state(self.host, configurations, start_flag),
                               datetime.datetime.now(datetime.UTC))
        client = self._client.prepare(timeout=max(self.interval, 1.0), retry=0)
        try:
            answer = client.call(rpc_api.admin_context(), rpc_api.REPORT_STATE_METHOD,
                                 **kwargs)
        except Exception as exc:  # any transport or server fault: report again next time
            reason = f"{type(exc).__name__}: {exc}"
            LOG.warning("report_state failed: %s", reason)
            with self._lock:
                self._failures += 1
                self._last_error = reason
            return None
        with self._lock:
            self._start_flag = False
            self._reports += 1
            self._last_ok_at = time.time()
            self._last_error = None
        if answer == REVIVED:
            LOG.warning("the server had declared this agent dead; resyncing")
            self._on_revived()
        return answer if isinstance(answer, str) else None

    def status(self) -> dict[str, Any]:
        """For `agent-ctl status`: reports accepted, failures, the last success."""
        with self._lock:
            return {"interval": self.interval, "reports": self._reports,
                    "failures": self._failures, "last_ok_at": self._last_ok_at,
                    "last_error": self._last_error}
