"""Operations: Prometheus metrics, /healthz and /readyz, and systemd notifications.

Rules of this room:

1. The daemon reports, this module keeps count. `Observer` methods are called
   by the shells (`event_queued`) and by the writer thread (everything else);
   the HTTP threads only read. Nothing here touches the kernel or the queue,
   and what the HTTP threads read is guarded by one lock.
2. READY=1 and /readyz follow the first complete apply, not the start of the
   process. WATCHDOG=1 is sent by the writer loop itself (`loop_alive`), never
   by a timer thread, so a writer stuck in a kernel call stops the pings and
   systemd restarts the agent.
3. /healthz is kube-proxy's: unhealthy when a change has waited longer than
   2 x resync_interval without being applied, or when the writer loop has not
   turned for that long (it turns at least every resync_interval). An idle
   agent is healthy.
4. The HTTP server is started from the main thread, so it listens in the
   agent's own network namespace, never in `[agent] netns`. It is bounded:
   a few connections (threads) at a time, each with a timeout.
5. Every metric is `hostfw_*`, with its unit in the name; doc/operations.md
   lists them. A "full" apply is one that re-read the kernel first.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import agent
from agent import sdnotify
from agent.bounded import BoundedThreads
from agent.compiler import Compiled
from agent.dataplane import xtables_lock
from agent.dataplane.backend import Backend
from agent.dataplane.engine import ApplyReport
from agent.dataplane.ipsets import IpsetWriter
from agent.dataplane.plan import TablePlan

LOG = logging.getLogger(__name__)
T = TypeVar("T")

# Engine time of one apply: a no-op partial apply takes milliseconds, a full
# one on a large node seconds.
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Event to rules in the kernel: kube-proxy's network programming SLI range.
PROGRAMMING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                       120.0, 300.0)
EVENT_KINDS = ("devices", "policy", "resync")  # what the daemon's shells queue
KERNEL_TOOLS = ("iptables", "ip6tables", "ipset")
STATUS_ERROR_CHARS = 200  # a STATUS= line is shown by `systemctl status`: keep it one line
MAX_CONNECTIONS = 16  # concurrent HTTP connections (one thread each); scrapes are short
IO_TIMEOUT = 5.0      # seconds a connection may take to send its request or read the answer
BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Applied:
    """What the last successful apply left in the kernel, as the scrape reports it."""

    generation: int
    in_sync: bool
    ports_active: int
    chains_written: int
    lines_written: int
    rules: Mapping[tuple[int, str], int] = field(default_factory=dict)
    chains: Mapping[tuple[int, str], int] = field(default_factory=dict)
    ipsets: Mapping[int, int] = field(default_factory=dict)
    ipset_members: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, report: ApplyReport, compiled: Compiled, generation: int) -> Applied:
        ruleset = compiled.ruleset
        families = {family for family, _ in ruleset.tables}
        ipsets = dict.fromkeys(families, 0)
        members = dict.fromkeys(families, 0)
        for ipset in ruleset.ipsets.values():
            ipsets[ipset.family] = ipsets.get(ipset.family, 0) + 1
            members[ipset.family] = members.get(ipset.family, 0) + len(ipset.members)
        return cls(
            generation=generation, in_sync=report.in_sync,
            ports_active=len(compiled.active_ports), chains_written=report.chains_written,
            lines_written=report.lines_written,
            rules={key: sum(map(len, t.chains.values())) for key, t in ruleset.tables.items()},
            chains={key: len(t.chains) for key, t in ruleset.tables.items()},
            ipsets=ipsets, ipset_members=members)


class Observer:
    """Turns what the daemon does into metrics, health answers and sd_notify messages."""

    def __init__(self, resync_interval: float, source_status: Callable[[], Mapping[str, Any]],
                 notifier: sdnotify.Notifier | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`source_status` is the policy source's `status()`, read at every scrape."""
        self.health_timeout = 2.0 * resync_interval
        self.source_status = source_status
        self.notifier = notifier if notifier is not None else sdnotify.Notifier.from_environment()
        self.clock = clock
        self._lock = threading.Lock()
        self._queued: dict[str, deque[float]] = defaultdict(deque)  # kind -> queue times
        self._taken: list[tuple[str, float]] = []   # consumed by the writer, not yet applied
        self._applied: Applied | None = None
        self._last_alive: float | None = None
        self._last_apply_at: float | None = None    # unix time, for /healthz
        self._last_ping: float | None = None
        self._last_status = ""
        self._writer_error: str | None = None      # the last action failed; cleared by an apply
        self._server: _Server | None = None
        self._bridge_nf: dict[int, bool] = {}      # ip version -> hook alive, as last checked
        self._bridge_nf_problems: tuple[str, ...] = ()
        self._foreign_ahead: dict[tuple[int, str, str], int] = {}  # (version, table, chain)

        disable_created_metrics()  # the *_created series only double the scrape
        self.registry = registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        Gauge("hostfw_build_info", "Always 1; the labels say which hostfw runs (the version "
              "setuptools-scm derived from git) on which Python.", ["version", "python"],
              registry=registry).labels(agent.version(), platform.python_version()).set(1)
        self.apply_seconds = Histogram(
            "hostfw_apply_duration_seconds",
            "Time the engine took for a successful apply (kernel read, writes, verify). "
            "kind=full: it re-read the kernel first (resync, drift check, first apply); "
            "kind=partial: it diffed against its view.",
            ["kind"], buckets=APPLY_BUCKETS, registry=registry)
        self.apply_failures = Counter(
            "hostfw_apply_failures", "Applies that failed after their retries.",
            registry=registry)
        self.programming_seconds = Histogram(
            "hostfw_network_programming_duration_seconds",
            "From an event being queued (devices, policy, resync request) to the end of "
            "the apply that put its result in the kernel.",
            ["kind"], buckets=PROGRAMMING_BUCKETS, registry=registry)
        self.writer_errors = Counter(
            "hostfw_writer_errors_total",
            "Actions of the writer (apply, kernel re-read, read-back) that raised; the writer "
            "backs off and keeps the last good rules. kind=kernel: a kernel tool failed; "
            "kind=internal: anything else (a bug, or input the checks missed).",
            ["kind"], registry=registry)
        self.events = Counter(
            "hostfw_events", "Events queued for the writer, by kind.", ["kind"],
            registry=registry)
        self.kernel_writes = Counter(
            "hostfw_kernel_writes", "Kernel write transactions (one iptables-restore table "
            "commit, one ipset restore).", ["tool"], registry=registry)
        self.kernel_write_errors = Counter(
            "hostfw_kernel_write_errors", "Kernel write transactions that failed.", ["tool"],
            registry=registry)
        self.kernel_reads = Counter(
            "hostfw_kernel_reads", "Kernel reads (iptables-save of a family, ipset save).",
            ["tool"], registry=registry)
        self.kernel_read_errors = Counter(
            "hostfw_kernel_read_errors", "Kernel reads that failed.", ["tool"],
            registry=registry)
        self.chains_written = Counter(
            "hostfw_chains_written", "Owned chains rewritten by applies.", registry=registry)
        self.lines_written = Counter(
            "hostfw_restore_lines_written", "iptables-restore lines sent by applies.",
            registry=registry)
        self.ipset_member_changes = Counter(
            "hostfw_ipset_member_changes", "ipset members added or removed by applies.",
            ["op"], registry=registry)
        self.drift_repairs = Counter(
            "hostfw_drift_repairs", "Applies that found the kernel changed behind the agent's "
            "back and repaired it.", registry=registry)
        self.last_apply = Gauge(
            "hostfw_last_apply_success_timestamp_seconds",
            "Unix time of the end of the last successful apply.", registry=registry)
        self.last_queued = Gauge(
            "hostfw_last_queued_change_timestamp_seconds",
            "Unix time of the last event queued for the writer (newer than the last apply "
            "for long: the writer is stuck).", registry=registry)
        registry.register(_StateCollector(self))
        for kind in EVENT_KINDS:  # every series exists from the start, at 0
            self.events.labels(kind)
            self.programming_seconds.labels(kind)
        for kind in ("full", "partial"):
            self.apply_seconds.labels(kind)
        for tool in KERNEL_TOOLS:
            for counter in (self.kernel_writes, self.kernel_write_errors, self.kernel_reads,
                            self.kernel_read_errors):
                counter.labels(tool)
        for op in ("add", "remove"):
            self.ipset_member_changes.labels(op)
        for kind in ("kernel", "internal"):
            self.writer_errors.labels(kind)

    # ------------------------------------------------------------ shells (any thread)

    def event_queued(self, kind: str) -> None:
        """Call just before putting a change event on the queue, so the writer cannot
        take it before its time is recorded."""
        self.events.labels(kind).inc()
        self.last_queued.set_to_current_time()
        with self._lock:
            self._queued[kind].append(self.clock())

    # ------------------------------------------------------------ writer thread

    def events_taken(self, kinds: Iterable[str]) -> None:
        """The writer drained these events; the next successful apply consumes them."""
        with self._lock:
            for kind in kinds:
                waiting = self._queued.get(kind)
                if waiting:
                    self._taken.append((kind, waiting.popleft()))

    def applied(self, report: ApplyReport, compiled: Compiled, generation: int) -> None:
        """A successful apply: observe it, and tell systemd (READY=1 on the first)."""
        self.apply_seconds.labels("full" if report.refreshed else "partial").observe(
            report.seconds)
        self.chains_written.inc(report.chains_written)
        self.lines_written.inc(report.lines_written)
        self.ipset_member_changes.labels("add").inc(report.ipset_members_added)
        self.ipset_member_changes.labels("remove").inc(report.ipset_members_removed)
        if report.drift_repaired:
            self.drift_repairs.inc()
        wall, now = time.time(), self.clock()
        self.last_apply.set(wall)
        applied = Applied.of(report, compiled, generation)
        with self._lock:
            taken, self._taken = self._taken, []
            first = self._applied is None
            self._applied = applied
            self._last_apply_at = wall
            self._writer_error = None
        for kind, queued_at in taken:
            self.programming_seconds.labels(kind).observe(now - queued_at)
        sync = "in sync" if applied.in_sync else "NOT in sync with the kernel"
        ports = f"{applied.ports_active} active port{'' if applied.ports_active == 1 else 's'}"
        self._status(f"generation {generation}: {ports}, {sync}",
                     *(["READY=1"] if first else []))

    def apply_failed(self, error: str) -> None:
        """A failed apply; the changes it carried stay pending (and count for /healthz)."""
        self.apply_failures.inc()
        self._status(f"apply failed, retrying: {error[:STATUS_ERROR_CHARS]}")

    def writer_failed(self, error: str, kernel: bool) -> None:
        """An action of the writer raised; until an apply succeeds the agent is
        neither ready nor healthy (the kernel keeps the last good rules)."""
        self.writer_errors.labels("kernel" if kernel else "internal").inc()
        with self._lock:
            self._writer_error = error
        self._status(f"writer error, backing off: {error[:STATUS_ERROR_CHARS]}")

    def waiting_for_policy(self) -> None:
        """The writer consumed the changes and deliberately wrote nothing: it keeps the
        rules of a previous run until the first policy arrives. Not ready yet."""
        with self._lock:
            self._taken = []
        self._status("waiting for the first policy; keeping the rules found in the kernel")

    def bridge_nf_checked(self, ok: Mapping[int, bool], problems: Iterable[str]) -> None:
        """The bridge netfilter hook's state (agent/dataplane/brnf.py). While it is
        dead (`problems`), the agent is not ready, whatever the applies say."""
        problems = tuple(problems)
        with self._lock:
            self._bridge_nf = dict(ok)
            self._bridge_nf_problems = problems
        if problems:  # `systemctl status` shows it; READY=1 is not withdrawn (systemd
            # would restart-loop a node that cannot enforce, which helps nobody)
            self._status(f"NOT ENFORCING: {problems[0][:STATUS_ERROR_CHARS]}")

    def foreign_rules_ahead(self, counts: Mapping[tuple[int, str, str], int]) -> None:
        """Foreign rules ahead of our hooks, per (ip version, table, built-in chain), as
        agent/dataplane/plan.py `rules_ahead_of_hooks` found them at the last read."""
        with self._lock:
            self._foreign_ahead = dict(counts)

    def loop_alive(self) -> None:
        """Called at every turn of the writer loop: liveness and the systemd watchdog.

        Pings at most every quarter of WatchdogSec; `watchdog_deadline` makes
        an idle loop wake in time to ping every half of it.
        """
        period = self.notifier.watchdog_period
        now = self.clock()
        with self._lock:
            first = self._last_alive is None
            self._last_alive = now
            ping = period is not None and (self._last_ping is None or
                                           now - self._last_ping >= period / 2)
            if ping:
                self._last_ping = now
        if first:
            self._status("writer running; waiting for the devices and the first apply")
        if ping:
            self.notifier.notify("WATCHDOG=1")

    def watchdog_deadline(self) -> float:
        """The monotonic time by which the loop must turn again to feed the watchdog."""
        period = self.notifier.watchdog_period
        with self._lock:
            last = self._last_ping
        if period is None:
            return math.inf
        return (last if last is not None else self.clock()) + period

    def counted(self, backend: Backend) -> Backend:
        """`backend`, counting its reads, commits and their errors."""
        return _CountingBackend(backend, self)

    def counted_ipsets(self) -> IpsetWriter:
        """An IpsetWriter that counts its saves, restores and their errors."""
        return _CountingIpsetWriter(self)

    def kernel_call(self, op: str, tool: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one kernel read or write, counting it and its failure."""
        total, errors = ((self.kernel_writes, self.kernel_write_errors) if op == "write"
                         else (self.kernel_reads, self.kernel_read_errors))
        total.labels(tool).inc()
        try:
            return fn(*args)
        except Exception:
            errors.labels(tool).inc()
            raise

    # ------------------------------------------------------------ readers (any thread)

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._applied is not None and not self._bridge_nf_problems

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the /healthz document)."""
        now = self.clock()
        with self._lock:
            pending, oldest = self._pending(now)
            alive, last_apply_at = self._last_alive, self._last_apply_at
            writer_error = self._writer_error
        problems = [f"the writer is backing off after an error: {writer_error}"] \
            if writer_error else []
        if oldest is not None and oldest > self.health_timeout:
            problems.append(f"a change has waited {oldest:.1f} s without an apply "
                            f"(limit {self.health_timeout:g} s)")
        if alive is not None and now - alive > self.health_timeout:
            problems.append(f"the writer loop has not turned for {now - alive:.1f} s "
                            f"(limit {self.health_timeout:g} s)")
        return not problems, {
            "healthy": not problems, "problems": problems, "currentTime": time.time(),
            "lastUpdated": last_apply_at, "pendingChanges": pending,
            "oldestPendingSeconds": None if oldest is None else round(oldest, 3),
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the /readyz document): ready once the first apply completed, and
        not while the node cannot enforce (a dead bridge netfilter hook) or the
        writer is backing off after an error."""
        with self._lock:
            applied, problems = self._applied, list(self._bridge_nf_problems)
            if self._writer_error:
                problems.append(f"the writer is backing off after an error: "
                                f"{self._writer_error}")
        ready = applied is not None and not problems
        doc: dict[str, Any] = {
            "ready": ready,
            "generation": applied.generation if applied else 0,
            "in_sync": applied.in_sync if applied else False,
        }
        if problems:
            doc["problems"] = list(problems)
        return ready, doc

    def enforcement(self) -> tuple[dict[int, bool], dict[tuple[int, str, str], int]]:
        """(bridge hook alive per ip version, foreign rules ahead of our hooks)."""
        with self._lock:
            return dict(self._bridge_nf), dict(self._foreign_ahead)

    def snapshot(self) -> tuple[Applied | None, int, float | None]:
        """(last apply, pending changes, age of the oldest) for the state collector."""
        now = self.clock()
        with self._lock:
            return (self._applied, *self._pending(now))

    def _pending(self, now: float) -> tuple[int, float | None]:
        """(changes queued or taken but not applied, age of the oldest); under the lock."""
        stamps = [q[0] for q in self._queued.values() if q] + [at for _, at in self._taken]
        return len(stamps), (now - min(stamps) if stamps else None)

    # ------------------------------------------------------------ lifecycle

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve /metrics, /healthz and /readyz on HOST:PORT; returns the bound address.

        Raises ValueError for a malformed value, OSError when it cannot bind.
        """
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server((host, port), self, family)
        threading.Thread(target=self._server.serve_forever, name="metrics",
                         daemon=True).start()
        bound = self._server.server_address
        LOG.info("metrics, /healthz and /readyz on %s (port %d)", listen, bound[1])
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        """Tell systemd we are stopping and close the HTTP server."""
        self.notifier.notify("STOPPING=1", sdnotify.status_line("stopping; rules left in place"))
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.notifier.close()

    def _status(self, text: str, *extra: str) -> None:
        """Send STATUS= (once per distinct text) plus any extra lines."""
        with self._lock:
            changed = text != self._last_status
            self._last_status = text
        lines = [*extra, *([sdnotify.status_line(text)] if changed else [])]
        if lines:
            self.notifier.notify(*lines)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT`; an empty HOST is every IPv4 address."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 host as [ADDR]:PORT")
    return host, int(port)


class _StateCollector(Collector):
    """Gauges read at scrape time, so a series for a table that went away goes too."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        applied, pending, oldest = self.observer.snapshot()
        yield _gauge("hostfw_ready", "1 once the first apply completed, while the node can "
                     "enforce (see hostfw_bridge_nf_call_ok).", self.observer.ready)
        yield _gauge("hostfw_in_sync", "1 when the last apply verified the kernel matches.",
                     bool(applied and applied.in_sync))
        yield _gauge("hostfw_generation", "Applies that changed or confirmed the kernel.",
                     applied.generation if applied else 0)
        yield _gauge("hostfw_ports_active", "Local ports whose rules are applied.",
                     applied.ports_active if applied else 0)
        yield _gauge("hostfw_pending_changes", "Events queued or taken but not yet applied.",
                     pending)
        yield _gauge("hostfw_oldest_pending_change_seconds",
                     "Age of the oldest change not yet applied (0 when none).", oldest or 0.0)
        yield _gauge("hostfw_last_apply_chains_written",
                     "Owned chains the last successful apply rewrote.",
                     applied.chains_written if applied else 0)
        yield _gauge("hostfw_last_apply_lines_written",
                     "iptables-restore lines the last successful apply sent.",
                     applied.lines_written if applied else 0)
        per_table = [("hostfw_rules", "Rules in owned chains, as last applied.", "rules"),
                     ("hostfw_chains", "Owned chains, as last applied.", "chains")]
        for name, doc, attr in per_table:
            family = GaugeMetricFamily(name, doc, labels=["ip_version", "table"])
            for (version, table), count in sorted(getattr(applied, attr, {}).items()):
                family.add_metric([str(version), table], count)
            yield family
        per_family = [("hostfw_ipsets", "Owned ipsets, as last applied.", "ipsets"),
                      ("hostfw_ipset_members", "Members of owned ipsets, as last applied.",
                       "ipset_members")]
        for name, doc, attr in per_family:
            family = GaugeMetricFamily(name, doc, labels=["ip_version"])
            for version, count in sorted(getattr(applied, attr, {}).items()):
                family.add_metric([str(version)], count)
            yield family
        bridge_nf, ahead = self.observer.enforcement()
        family = GaugeMetricFamily(
            "hostfw_bridge_nf_call_ok", "1 when net.bridge.bridge-nf-call-iptables "
            "(ip_version 4) or -ip6tables (6) is 1 in the managed namespace; at 0 bridged "
            "traffic bypasses every rule.", labels=["ip_version"])
        for version, ok in sorted(bridge_nf.items()):
            family.add_metric([str(version)], float(ok))
        yield family
        family = GaugeMetricFamily(
            "hostfw_foreign_rules_ahead_of_hook", "Rules of other tools ahead of the "
            "agent's hook in a built-in chain, at the last kernel read; an ACCEPT there "
            "lets traffic past every security group.", labels=["ip_version", "table", "chain"])
        for (version, table, chain), count in sorted(ahead.items()):
            family.add_metric([str(version), table, chain], count)
        yield family
        yield CounterMetricFamily(
            "hostfw_xtables_lock_waits", "Times the agent found the xtables lock held by "
            "another writer and waited (the iptc backend takes the lock itself; "
            "iptables-restore waits inside the tool, uncounted).",
            value=xtables_lock.waits())
        yield from _source_metrics(self.observer.source_status())


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _source_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The policy source's own state; RPC keys only when the source is the RPC one."""
    yield _gauge("hostfw_source_error", "1 when the policy source reports an error.",
                 bool(status.get("error")))
    if "connected" in status:
        yield _gauge("hostfw_rpc_connected", "1 while the RPC source is connected.",
                     bool(status["connected"]))
    if "rpc_errors" in status:
        yield CounterMetricFamily("hostfw_rpc_errors", "Failed security group pulls.",
                                  value=float(status["rpc_errors"]))


class _CountingBackend:
    """A Backend that counts its kernel calls; everything else goes to the real one."""

    def __init__(self, inner: Backend, observer: Observer) -> None:
        self._inner = inner
        self._observer = observer

    def save(self, family: int, table: str | None = None) -> str:
        return self._observer.kernel_call("read", _iptables(family), self._inner.save, family,
                                          table)

    def list_chain(self, family: int, table: str, chain: str) -> str | None:
        return self._observer.kernel_call("read", _iptables(family), self._inner.list_chain,
                                          family, table, chain)

    def commit(self, plan: TablePlan) -> None:
        self._observer.kernel_call("write", _iptables(plan.family), self._inner.commit, plan)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingIpsetWriter(IpsetWriter):
    """IpsetWriter that counts; an empty restore runs nothing and counts nothing."""

    def __init__(self, observer: Observer) -> None:
        super().__init__()
        self._observer = observer

    def save(self, *names: str) -> str:
        return self._observer.kernel_call("read", "ipset", super().save, *names)

    def restore(self, lines: list[str]) -> None:
        if lines:
            self._observer.kernel_call("write", "ipset", super().restore, lines)


def _iptables(family: int) -> str:
    return "ip6tables" if family == 6 else "iptables"


class _Server(BoundedThreads, HTTPServer):
    """One thread per connection, at most `MAX_CONNECTIONS` of them.

    A connection over the cap is answered 503 and closed at once, and every
    connection times out after `IO_TIMEOUT`: idle clients can hold neither
    threads nor file descriptors, only the few slots, for a few seconds.
    """

    request_queue_size = 128
    refusal = BUSY

    def __init__(self, address: tuple[str, int], observer: Observer, family: int) -> None:
        self.address_family = family
        self.observer = observer
        self.io_timeout = IO_TIMEOUT
        self.limit(MAX_CONNECTIONS)
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.io_timeout  # socket timeout for every read and write
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        observer = self.server.observer
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(observer.registry), content_type)
        elif path in ("/healthz", "/readyz"):
            ok, doc = observer.health() if path == "/healthz" else observer.readiness()
            self._send(200 if ok else 503, json.dumps(doc).encode() + b"\n",
                       "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        LOG.debug("metrics http: " + format, *args)
