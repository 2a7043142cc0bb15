"""hostfw-agent: wire the sources, the compiler and the writer, and own the loop.

Rules of this room:

1. One queue, one writer. Sources (netlink, policy file or RPC, admin socket,
   the resync timer) only put events on the queue; the writer thread, which
   entered `[agent] netns` first, drains it, compiles and applies. Nothing
   else touches the kernel.
2. Bursts coalesce: after the first event the writer waits `batch_window`
   for more, then applies once.
3. Fail closed, never flush: until the first policy arrives the agent leaves
   rules it finds in place (a restart adopts them); on a node with none of
   ours yet it applies the empty policy, which drops every managed device.
   SIGTERM leaves every rule where it is.
4. Failures retry with backoff (tenacity inside an apply, a growing delay
   between applies) and show in `agent-ctl status`.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity
from oslo_config import cfg
from oslo_log import log as oslo_logging

from agent import config, netns
from agent.admin.server import AdminServer
from agent.compiler import Compiled, NatSettings, Settings, Snapshot, compile_ruleset, zones
from agent.compiler.flows import floating_ip_cuts, flows_to_cut
from agent.compiler.names import Names
from agent.dataplane.command import KernelWriteError
from agent.dataplane.engine import ApplyReport, Engine
from agent.dataplane.flowcut import cut_flows
from agent.dataplane.restore_backend import RestoreBackend, detect_mode
from agent.metrics import Observer
from agent.model import Policy
from agent.sources.base import PolicySource
from agent.sources.netlink import DeviceWatcher
from agent.sources.policy_file import PolicyFileSource
from agent.state import NodeState

LOG = logging.getLogger("hostfw.agent")
FORCE_AFTER_FAILURES = 3


class Timers:
    """When the writer must wake up without an event: resync, drift check, retry.

    After every write the kernel is re-read soon (1 s), then at a doubling
    interval up to `resync_interval`, so tampering right after a change is
    caught quickly without re-reading a large table on every apply. Failed
    applies are retried with a doubling delay, capped at 30 s.
    """

    def __init__(self, resync_interval: float) -> None:
        self.resync_interval = resync_interval
        now = time.monotonic()
        self.due = {"resync": now + resync_interval}
        self.drift_delay = 1.0
        self.retry_delay = 0.0
        self.failures = 0

    def next_due(self) -> float:
        return min(self.due.values())

    def pop_due(self) -> set[str]:
        now = time.monotonic()
        fired = {name for name, at in self.due.items() if at <= now}
        for name in fired:
            del self.due[name]
        if "resync" in fired or "resync" not in self.due:
            self.due["resync"] = now + self.resync_interval
        return fired

    def after_apply(self, ok: bool, changed: bool) -> None:
        now = time.monotonic()
        if not ok:
            self.failures += 1
            self.retry_delay = min(30.0, max(1.0, self.retry_delay * 2))
            self.due["retry"] = now + self.retry_delay
            return
        self.failures = 0
        self.retry_delay = 0.0
        self.due.pop("retry", None)
        if changed:
            self.drift_delay = 1.0
        elif "drift" not in self.due:
            self.drift_delay = min(self.resync_interval, self.drift_delay * 2)
            if self.drift_delay >= self.resync_interval:
                return
        self.due["drift"] = now + self.drift_delay


@dataclass
class Waiter:
    """A caller blocked until the writer finishes something for it."""

    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] = field(default_factory=dict)

    def finish(self, **result: Any) -> None:
        self.result = result
        self.done.set()


@dataclass
class Event:
    kind: str                       # devices | policy | resync | call | stop
    payload: Any = None
    waiter: Waiter | None = None


def settings_from_conf(conf: cfg.ConfigOpts) -> Settings:
    return Settings(
        names=Names(conf.firewall.chain_prefix, conf.firewall.ipset_prefix,
                    conf.agent.device_prefix),
        unknown_device_policy=conf.agent.unknown_device_policy,
        enable_ipv6=conf.firewall.enable_ipv6,
        accept_mark=int(conf.firewall.accept_mark, 0),
        conntrack_zones=conf.firewall.conntrack_zones,
        nat=nat_settings(conf),
    )


def nat_settings(conf: cfg.ConfigOpts) -> NatSettings | None:
    """`[nat]` as the compiler wants it; None (no NAT at all) without a fixed range."""
    nat = conf.nat
    if not nat.fixed_range:
        return None
    return NatSettings(fixed_range=nat.fixed_range, routing_source_ip=nat.routing_source_ip,
                       public_interface=nat.public_interface, dmz_cidr=tuple(nat.dmz_cidr),
                       metadata_host=nat.metadata_host, metadata_port=nat.metadata_port,
                       dhcp_bridges=tuple(nat.dhcp_bridges))


def make_source(conf: cfg.ConfigOpts) -> PolicySource:
    if conf.agent.mode == "standalone":
        return PolicyFileSource(conf.agent.policy_file)
    from agent.sources.rpc import RpcSource  # imported lazily: oslo.messaging is heavy
    return RpcSource(conf)


class Agent:
    """The daemon: state, queue, writer thread and the shells around them."""

    def __init__(self, conf: cfg.ConfigOpts, source: PolicySource) -> None:
        self.conf = conf
        self.settings = settings_from_conf(conf)
        self.source = source
        self.queue: queue.Queue[Event] = queue.Queue()
        self.state = NodeState(mode=conf.agent.mode, namespace=conf.agent.netns)
        self.metrics = Observer(conf.agent.resync_interval, source.status)
        self.stopping = threading.Event()
        self.fatal: str | None = None
        self.engine: Engine | None = None
        self.watcher = DeviceWatcher(conf.agent.netns, conf.agent.device_prefix,
                                     self._on_devices, self._on_fatal)
        self.writer = threading.Thread(target=self._writer_main, name="writer", daemon=True)
        # Started from the main thread, so it stays in the agent's own namespace
        # (a thread inherits the namespace of the thread that starts it).
        self.resyncer = threading.Thread(target=self._resync_main, name="resync", daemon=True)
        self._resync_wanted = threading.Event()
        self._devices_seen = threading.Event()
        self.bridges: dict[str, str] = {}       # managed device -> its bridge
        self.zones: dict[str, int] = {}         # bridge -> conntrack zone
        self.last_snapshot: Snapshot | None = None
        self.floating_ips: dict[str, str] = {}  # floating -> fixed IP, as last applied

    # ------------------------------------------------------------ shells enqueue

    def _on_devices(self, devices: dict[str, str], full: bool) -> None:
        self.metrics.event_queued("devices")
        self.queue.put(Event("devices", (devices, full)))
        self._devices_seen.set()

    def _on_policy(self, policy: Policy) -> None:
        self.metrics.event_queued("policy")
        self.queue.put(Event("policy", policy))

    def _on_fatal(self, reason: str) -> None:
        LOG.critical("%s", reason)
        self.fatal = reason
        self.stopping.set()
        self.queue.put(Event("stop"))

    def request_resync(self, wait: bool = False, timeout: float = 60.0) -> dict[str, Any]:
        """Re-read the source, re-scan, recompile, reconcile; optionally wait for it."""
        self.source.resync()
        waiter = Waiter() if wait else None
        self.metrics.event_queued("resync")
        self.queue.put(Event("resync", waiter=waiter))
        if waiter is None:
            return {"ok": True, "queued": True}
        if not waiter.done.wait(timeout):
            return {"ok": False, "error": f"resync did not finish within {timeout} s"}
        return waiter.result

    def call_on_writer(self, fn: Callable[[Engine], Any], timeout: float = 30.0) -> Any:
        """Run `fn(engine)` on the writer thread (in the managed namespace)."""
        waiter = Waiter()
        self.queue.put(Event("call", fn, waiter))
        if not waiter.done.wait(timeout):
            raise TimeoutError("the writer thread did not answer in time")
        if "error" in waiter.result:
            raise RuntimeError(waiter.result["error"])
        return waiter.result["value"]

    # ------------------------------------------------------------ writer thread

    def _writer_main(self) -> None:
        try:
            netns.enter(self.conf.agent.netns)
            self.engine = self._make_engine()
        except (OSError, ValueError, KernelWriteError) as exc:
            self._on_fatal(f"cannot start the writer: {exc}")
            return
        try:
            self._loop(self.engine)
        except Exception:  # a bug: exit non-zero (systemd restarts us) rather than hang
            LOG.exception("the writer thread failed")
            self._on_fatal("the writer thread failed; see the log")

    def _make_engine(self) -> Engine:
        mode = self.conf.firewall.backend
        if mode == "auto":  # the host's one mode (never both): legacy -> iptc, nft -> restore
            mode = "iptc" if detect_mode() == "iptables-legacy" else "iptables-nft"
        self.state.backend = mode
        LOG.info("writer in netns %r using %s", self.conf.agent.netns or "(own)", mode)
        if mode == "iptc":
            try:  # imported only when chosen: it loads libiptc and modprobes ip_tables
                from agent.dataplane.iptc_backend import IptcBackend
            except Exception as exc:  # ImportError, or OSError/XTablesError from the C side
                raise ValueError(f"[firewall] backend iptc: python-iptables does not load: "
                                 f"{exc}") from exc
            backend = IptcBackend()
        else:
            backend = RestoreBackend(mode)
        engine = Engine(self.metrics.counted(backend), self.settings.names,
                        self.settings.families)
        engine.ipsets = self.metrics.counted_ipsets()
        raw = engine.read()[4].get("raw")
        if raw:  # adopt the zones of a previous run, so conntrack entries stay valid
            self.zones = zones.zones_from_rules(raw.chains.get(self.settings.names.chain(
                "PREROUTING"), []))
        return engine

    def _loop(self, engine: Engine) -> None:
        timers = Timers(self.conf.agent.resync_interval)
        while not self.stopping.is_set():
            self.metrics.loop_alive()
            batch = self._next_batch(min(timers.next_due(), self.metrics.watchdog_deadline()))
            self.metrics.events_taken(event.kind for event in batch)
            waiters = [e.waiter for e in batch if e.waiter and e.kind != "call"]
            dirty = refresh = False
            for event in batch:
                if event.kind == "stop":
                    return
                if event.kind == "call":
                    self._run_call(engine, event)
                elif event.kind == "devices":
                    bridges, full = event.payload
                    self.bridges = bridges
                    self.state.devices = frozenset(bridges)
                    self.source.set_devices(self.state.devices)
                    dirty = True
                    refresh |= full
                elif event.kind == "policy":
                    self.state.policy = event.payload
                    dirty = True
                elif event.kind == "resync":
                    dirty = refresh = True
            due = timers.pop_due()
            if "resync" in due:
                self._periodic_resync()
            if due:
                dirty = True
                refresh |= bool(due & {"resync", "drift"})
            if not dirty:
                continue
            if not self._devices_seen.is_set():
                for waiter in waiters:
                    waiter.finish(ok=False, error="the agent has not seen the devices yet")
                continue
            ok, changed = self._apply(engine, refresh=refresh or bool(waiters),
                                      force=timers.failures >= FORCE_AFTER_FAILURES,
                                      verify=refresh or bool(waiters))
            timers.after_apply(ok, changed)
            for waiter in waiters:
                waiter.finish(ok=ok and self.state.in_sync, in_sync=self.state.in_sync,
                              generation=self.state.generation,
                              **({} if ok else {"error": self.state.apply_error}))

    def _next_batch(self, deadline: float) -> list[Event]:
        """Wait for an event (or the deadline), then gather a burst of them."""
        try:
            first = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return []
        batch = [first]
        end = time.monotonic() + self.conf.agent.batch_window
        while (left := end - time.monotonic()) > 0:
            try:
                batch.append(self.queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _periodic_resync(self) -> None:
        """Ask the source for a full resync without blocking the writer."""
        self._resync_wanted.set()

    def _resync_main(self) -> None:
        while not self.stopping.is_set():
            if not self._resync_wanted.wait(1.0):
                continue
            self._resync_wanted.clear()
            try:
                self.source.resync()
            except Exception:  # the next period tries again; the loop must live on
                LOG.exception("periodic resync of the %s source failed", self.source.name)

    def _run_call(self, engine: Engine, event: Event) -> None:
        assert event.waiter is not None
        try:
            event.waiter.finish(value=event.payload(engine))
        except Exception as exc:  # reported to the admin caller, never kills the loop
            event.waiter.finish(error=f"{type(exc).__name__}: {exc}")

    def _apply(self, engine: Engine, refresh: bool, force: bool,
               verify: bool) -> tuple[bool, bool]:
        """Compile and apply; returns (succeeded, wrote anything)."""
        policy = self.state.policy
        if policy is None:
            has_ours = any(self.settings.names.owns_chain(c)
                           for tables in engine.read().values()
                           for t in tables.values() for c in t.chains)
            if has_ours:
                LOG.info("no policy yet; keeping the rules found in the kernel")
                self.metrics.waiting_for_policy()
                return True, False
            policy = Policy()
        snapshot = self._snapshot(policy)
        compiled = compile_ruleset(snapshot)
        try:
            report = self._apply_with_retries(engine, compiled, refresh, force, verify)
        except KernelWriteError as exc:
            LOG.error("apply failed: %s", exc)
            self.state.record_failure(compiled, f"apply failed: {exc}")
            self.metrics.apply_failed(str(exc))
            return False, False
        self.state.record_apply(compiled, report)
        self.metrics.applied(report, compiled, self.state.generation)
        cut_errors = cut_flows(flows_to_cut(self.last_snapshot, snapshot) +
                               floating_ip_cuts(self.floating_ips, compiled.floating_ips))
        self.last_snapshot = snapshot
        self.floating_ips = dict(compiled.floating_ips)
        for error in cut_errors:
            LOG.warning("%s", error)
        for warning in report.warnings:
            LOG.warning("%s", warning)
        if report.changed:
            LOG.info("applied generation %d: %s, %d chains, %d lines, ipset +%d/-%d, "
                     "%.3f s, in_sync=%s", self.state.generation, report.tables_written,
                     report.chains_written, report.lines_written, report.ipset_members_added,
                     report.ipset_members_removed, report.seconds, report.in_sync)
        return True, report.changed

    def _snapshot(self, policy: Policy) -> Snapshot:
        """The compiler's input; zones are allocated here so they stay stable."""
        used = {b for dev, b in self.bridges.items() if b}
        self.zones = zones.allocate(used, self.zones)
        return Snapshot(policy, self.state.devices, self.settings, dict(self.bridges),
                        dict(self.zones))

    @staticmethod
    def _apply_with_retries(engine: Engine, compiled: Compiled, refresh: bool, force: bool,
                            verify: bool) -> ApplyReport:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(KernelWriteError),
            stop=tenacity.stop_after_attempt(3),
            wait=tenacity.wait_exponential_jitter(initial=0.1, max=1.0),
            before_sleep=lambda rs: LOG.warning("apply attempt %d failed: %s; retrying",
                                                rs.attempt_number, rs.outcome.exception()),
            reraise=True,
        )
        return retrying(engine.apply, compiled.ruleset, refresh=refresh, force=force,
                        verify=verify)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.resyncer.start()
        self.writer.start()
        self.watcher.start()
        self.source.start(self._on_policy)

    def stop(self) -> None:
        self.stopping.set()
        self.queue.put(Event("stop"))
        self.watcher.stop()
        self.source.stop()


def parse_args(argv: list[str] | None) -> cfg.ConfigOpts:
    conf = cfg.CONF
    config.register_opts(conf)
    config.set_log_defaults(conf)
    conf(argv, project="hostfw", prog="hostfw-agent",
         default_config_files=[f for f in ["/etc/hostfw/agent.conf"] if os.path.exists(f)])
    return conf


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--version" in argv:  # before any config file is read; exit 0 like argparse's
        from agent import version_line
        print(version_line("hostfw-agent"))
        return 0
    try:
        conf = parse_args(argv)
    except cfg.Error as exc:
        print(f"hostfw-agent: {exc}", file=sys.stderr)
        return 2
    problems = config.validate(conf)  # reads every option: oslo.log's too, before setup
    if problems:
        for problem in problems:
            print(f"hostfw-agent: {problem}", file=sys.stderr)
        return 2
    oslo_logging.setup(conf, "hostfw")  # stderr (journald) unless configured otherwise
    if conf.agent.netns and not os.path.exists(netns.netns_path(conf.agent.netns)):
        print(f"hostfw-agent: [agent] netns {conf.agent.netns!r} does not exist",
              file=sys.stderr)
        return 2
    try:
        agent = Agent(conf, make_source(conf))
    except ValueError as exc:  # e.g. a transport_url oslo.messaging cannot parse
        print(f"hostfw-agent: {exc}", file=sys.stderr)
        return 2
    try:
        if conf.metrics.listen:
            agent.metrics.serve(conf.metrics.listen)
    except (ValueError, OSError) as exc:
        print(f"hostfw-agent: [metrics] listen: {exc}", file=sys.stderr)
        return 2
    admin = AdminServer(conf.admin.socket_path, agent)
    admin.start()
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(
        target=agent.request_resync, name="sighup", daemon=True).start())
    agent.start()
    LOG.info("hostfw-agent started (mode %s)", conf.agent.mode)
    while not agent.stopping.wait(1.0):
        pass
    agent.metrics.stop()
    admin.stop()
    agent.writer.join(timeout=10)
    LOG.info("hostfw-agent stopped; rules left in place")
    return 1 if agent.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
