"""hostfw-agent: wire the sources, the compiler and the writer, and own the loop.

Rules of this room:

1. One queue, one writer. Sources (netlink, policy file or RPC, admin socket,
   the resync timer) only put events on the queue; the writer thread, which
   entered `[agent] netns` first, drains it, compiles and applies. Nothing
   else touches the kernel.
2. Leading edge: the writer acts on the first event at once and gathers
   what arrives while it works into the next step (`[agent] batch_window`,
   0 by default, adds a wait after the first event). What to do is decided
   by the pure `agent.reconciler`; this module carries it out.
3. Fail closed, never flush: until the first policy arrives the agent leaves
   rules it finds in place (a restart adopts them); on a node with none of
   ours yet it applies the empty policy, which drops every managed device.
   SIGTERM leaves every rule where it is.
4. Failures retry with backoff (tenacity inside an apply, a growing delay
   between applies) and show in `agent-ctl status`. The writer loop is
   supervised: no exception ends it; the kernel keeps the last good rules.
5. SIGHUP reloads the policy source; `agent-ctl resync` also re-reads the
   kernel (in small steps) and repairs drift.
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
from typing import TYPE_CHECKING, Any

import tenacity
from oslo_config import cfg
from oslo_log import log as oslo_logging

from agent import config, netns, version_line
from agent.admin.server import AdminServer
from agent.compiler import Compiled, NatSettings, Settings, Snapshot, compile_ruleset, zones
from agent.dataplane.command import KernelWriteError
from agent.dataplane.engine import ApplyReport, Engine
from agent.dataplane.restore_backend import RestoreBackend, detect_mode
from agent.enforcement import BRIDGE_CHECK_EVERY, EnforcementCheck
from agent.flow_keeper import FlowKeeper
from agent.metrics import Observer
from agent.model import Policy
from agent.reconciler import Action, Apply, BeginRefresh, Check, Reconciler, RefreshStep
from agent.sources.base import PolicySource
from agent.sources.netlink import DeviceWatcher
from agent.sources.policy_file import PolicyFileSource
from agent.state import NodeState
from agent.vocab.names import Names

if TYPE_CHECKING:
    from agent.sources.report_state import StateReporter

LOG = logging.getLogger("hostfw.agent")


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
        max_set_members=conf.firewall.ipset_max_members,
    )


def nat_settings(conf: cfg.ConfigOpts) -> NatSettings | None:
    """`[nat]` as the compiler wants it; None (no NAT at all) without a fixed range."""
    nat = conf.nat
    if not nat.fixed_range:
        return None
    return NatSettings(fixed_range=nat.fixed_range, routing_source_ip=nat.routing_source_ip or "",
                       public_interface=nat.public_interface, dmz_cidr=tuple(nat.dmz_cidr),
                       metadata_host=nat.metadata_host, metadata_port=nat.metadata_port,
                       dhcp_bridges=tuple(nat.dhcp_bridges))


def make_reporter(conf: cfg.ConfigOpts, source: PolicySource,
                  state: NodeState) -> StateReporter | None:
    """RPC mode's report_state heartbeat (Neutron's agent list); None in standalone."""
    if conf.agent.mode != "rpc" or conf.agent.report_interval <= 0:
        return None
    from agent.sources.report_state import StateReporter, configurations_of
    from agent.sources.rpc import RpcSource
    assert isinstance(source, RpcSource)
    return StateReporter(source.transport, conf.host, conf.agent.report_interval,
                         lambda: configurations_of(state.status(source.status())),
                         on_revived=source.resync)


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
        self.reporter = make_reporter(conf, source, self.state)
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
        self.bridges: dict[str, str] = {}       # managed device -> its bridge
        self.zones: dict[str, int] = {}         # bridge -> conntrack zone
        self.flows = FlowKeeper(self.settings.families, self.metrics.loop_alive)
        self.enforcement = EnforcementCheck(self.settings.families,
                                            conf.firewall.manage_bridge_nf_call,
                                            self.settings.names.owns_chain, self.metrics)

    # ------------------------------------------------------------ shells enqueue

    def _on_devices(self, devices: dict[str, str], full: bool) -> None:
        """A device list from netlink; `full` (a fresh dump) needs no kernel re-read:
        the device list is complete either way, and the rules did not move."""
        self.metrics.event_queued("devices")
        self.queue.put(Event("devices", devices))

    def _on_policy(self, policy: Policy) -> None:
        self.metrics.event_queued("policy")
        self.queue.put(Event("policy", policy))

    def _on_fatal(self, reason: str) -> None:
        LOG.critical("%s", reason)
        self.fatal = reason
        self.stopping.set()
        self.queue.put(Event("stop"))

    def request_resync(self, wait: bool = False, timeout: float = 60.0) -> dict[str, Any]:
        """Re-read the source and the whole kernel, repair; optionally wait for it.

        A waiter that comes before the first device dump waits for it, all
        within `timeout`.
        """
        self.source.resync()
        waiter = Waiter() if wait else None
        self.metrics.event_queued("resync")
        self.queue.put(Event("resync", waiter=waiter))
        if waiter is None:
            return {"ok": True, "queued": True}
        if not waiter.done.wait(timeout):
            return {"ok": False, "error": f"resync did not finish within {timeout} s"}
        return waiter.result

    def request_reload(self) -> None:
        """SIGHUP: re-read the policy source only; the kernel is not re-read."""
        self.source.reload()

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
        self._loop(self.engine)

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
        raw = engine.adopt()[4].get("raw")  # the one full read of a start
        if raw:  # adopt the zones of a previous run, so conntrack entries stay valid
            self.zones = zones.zones_from_chains(raw.chains, self.settings.names)
        return engine

    def _loop(self, engine: Engine) -> None:
        """Take events, let the reconciler decide, carry out its actions.

        Supervised: an exception from any action is logged, counted and backed
        off by the reconciler, and the kernel keeps the last good rules; the
        loop itself never dies of one.
        """
        rec = Reconciler(self.conf.agent.resync_interval, now=time.monotonic())
        while not self.stopping.is_set():
            self.metrics.loop_alive()
            if not self._take_events(rec, block=False):
                return
            if self.enforcement.bridge(time.monotonic()):
                self.state.record_enforcement(self.enforcement.problems,
                                              self.enforcement.warnings)
            action = rec.next_action(time.monotonic())
            if action is None:
                deadline = min(rec.deadline(), self.metrics.watchdog_deadline(),
                               time.monotonic() + BRIDGE_CHECK_EVERY)
                if not self._take_events(rec, block=True, deadline=deadline):
                    return
                continue
            try:
                self._perform(engine, rec, action)
            except Exception as exc:  # supervised: back off, keep the last good rules
                self._writer_failed(rec, action, exc)

    def _take_events(self, rec: Reconciler, block: bool, deadline: float = 0.0) -> bool:
        """Feed queued events to `rec`; with `block`, wait for the first until
        `deadline` (then `[agent] batch_window` for more). False on stop."""
        batch = []
        try:
            if block:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                end = time.monotonic() + self.conf.agent.batch_window
                while (left := end - time.monotonic()) > 0:
                    batch.append(self.queue.get(timeout=left))
            while True:
                batch.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        if batch:
            self.metrics.events_taken(event.kind for event in batch)
        for event in batch:
            if event.kind == "stop":
                return False
            if event.kind == "call":
                self._run_call(event)
            elif event.kind == "devices":
                self.bridges = event.payload
                self.state.devices = frozenset(self.bridges)
                self.source.set_devices(self.state.devices)
                rec.devices_changed()
            elif event.kind == "policy":
                self.state.policy = event.payload
                rec.policy_changed()
            elif event.kind == "resync":
                rec.resync_asked(event.waiter)
        return True

    def _perform(self, engine: Engine, rec: Reconciler, action: Action) -> None:
        if isinstance(action, Apply):
            report = self._apply(engine, force=action.force, verify=action.verify)
            for waiter in rec.applied(report.changed, report.touched, report.sets_touched):
                self._answer(waiter, ok=True)
        elif isinstance(action, BeginRefresh):
            if action.source:
                self._resync_wanted.set()  # the source re-reads on its own thread
            compiled = self.state.compiled
            rec.refresh_planned(engine.refresh_steps(compiled.ruleset if compiled else None))
        elif isinstance(action, RefreshStep):
            engine.refresh_step(action.step)
            rec.step_done()
        elif isinstance(action, Check):
            if engine.view is None:   # a failed write made the view unknown: re-read
                rec.checked(True)
                return
            differs = engine.check(action.touched, set(action.sets))
            if differs:
                LOG.warning("read-back after a write found drift in %s", ", ".join(differs[:10]))
            rec.checked(bool(differs))

    def _writer_failed(self, rec: Reconciler, action: Action, exc: Exception) -> None:
        if isinstance(exc, KernelWriteError):
            LOG.error("%s failed: %s", type(action).__name__, exc)
        else:  # a bug, or input the checks missed: never lose the writer to it
            LOG.exception("%s failed", type(action).__name__)
        error = f"{type(action).__name__.lower()} failed: {exc}"
        self.state.record_failure(None, error)
        self.metrics.writer_failed(error, isinstance(exc, KernelWriteError))
        for waiter in rec.failed(action):
            self._answer(waiter, ok=False, error=error)

    def _answer(self, waiter: object, ok: bool, error: str | None = None) -> None:
        assert isinstance(waiter, Waiter)
        in_sync = ok and self.state.in_sync
        waiter.finish(ok=in_sync, in_sync=in_sync, generation=self.state.generation,
                      **({"error": error} if error else {}))

    def _resync_main(self) -> None:
        while not self.stopping.is_set():
            if not self._resync_wanted.wait(1.0):
                continue
            self._resync_wanted.clear()
            try:
                self.source.resync()
            except Exception:  # the next period tries again; the loop must live on
                LOG.exception("periodic resync of the %s source failed", self.source.name)

    def _run_call(self, event: Event) -> None:
        assert event.waiter is not None and self.engine is not None
        try:
            event.waiter.finish(value=event.payload(self.engine))
        except Exception as exc:  # reported to the admin caller, never kills the loop
            event.waiter.finish(error=f"{type(exc).__name__}: {exc}")

    def _apply(self, engine: Engine, force: bool, verify: bool) -> ApplyReport:
        """Compile and apply; raises KernelWriteError after tenacity's retries."""
        policy = self.state.policy
        if policy is None:
            assert engine.view is not None
            has_ours = any(self.settings.names.owns_chain(c)
                           for tables in engine.view.values()
                           for t in tables.values() for c in t.chains)
            if has_ours:
                LOG.info("no policy yet; keeping the rules found in the kernel")
                self.metrics.waiting_for_policy()
                return ApplyReport(in_sync=self.state.in_sync)
            policy = Policy()
        snapshot = self._snapshot(policy)
        compiled = compile_ruleset(snapshot)
        try:
            report = self._apply_with_retries(engine, compiled, force, verify)
        except KernelWriteError as exc:
            self.state.record_failure(compiled, f"apply failed: {exc}")
            self.metrics.apply_failed(str(exc))
            raise
        if report.refreshed and engine.view is not None:
            self.enforcement.foreign(engine.view)
            self.state.record_enforcement(self.enforcement.problems, self.enforcement.warnings)
        self.state.record_apply(compiled, report)
        self.metrics.applied(report, compiled, self.state.generation)
        cut_errors = self.flows.after_apply(snapshot, compiled, self.state.policy is not None)
        for error in cut_errors:
            LOG.warning("%s", error)
        for warning in report.warnings:
            LOG.warning("%s", warning)
        if report.changed:
            LOG.info("applied generation %d: %s, %d chains, %d lines, ipset +%d/-%d, "
                     "%.3f s, in_sync=%s", self.state.generation, report.tables_written,
                     report.chains_written, report.lines_written, report.ipset_members_added,
                     report.ipset_members_removed, report.seconds, report.in_sync)
        return report

    def _snapshot(self, policy: Policy) -> Snapshot:
        """The compiler's input; zones are allocated here so they stay stable."""
        used = {b for dev, b in self.bridges.items() if b}
        self.zones = zones.allocate(used, self.zones)
        return Snapshot(policy, self.state.devices, self.settings, dict(self.bridges),
                        dict(self.zones))

    @staticmethod
    def _apply_with_retries(engine: Engine, compiled: Compiled, force: bool,
                            verify: bool) -> ApplyReport:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(KernelWriteError),
            stop=tenacity.stop_after_attempt(3),
            wait=tenacity.wait_exponential_jitter(initial=0.1, max=1.0),
            before_sleep=lambda rs: LOG.warning("apply attempt %d failed: %s; retrying",
                                                rs.attempt_number, rs.outcome.exception()),
            reraise=True,
        )
        return retrying(engine.apply, compiled.ruleset, force=force, verify=verify)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """The source first: a policy file is read before the device dump can arrive,
        so a cold start is one apply of the whole policy, not an empty one first."""
        self.resyncer.start()
        self.writer.start()
        self.source.start(self._on_policy)
        self.watcher.start()
        if self.reporter is not None:
            self.reporter.start()

    def stop(self) -> None:
        self.stopping.set()
        self.queue.put(Event("stop"))
        self.watcher.stop()
        if self.reporter is not None:
            self.reporter.stop()
        self.source.stop()


def parse_args(argv: list[str] | None) -> cfg.ConfigOpts:
    conf = cfg.CONF
    config.register_opts(conf)
    config.set_log_defaults(conf)
    conf(argv, project="hostfw", prog="hostfw-agent", version=version_line("hostfw-agent"),
         default_config_files=[f for f in ["/etc/hostfw/agent.conf"] if os.path.exists(f)])
    return conf


def main(argv: list[str] | None = None) -> int:
    try:
        conf = parse_args(sys.argv[1:] if argv is None else argv)
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
        target=agent.request_reload, name="sighup", daemon=True).start())
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
