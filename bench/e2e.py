"""End to end, as users see it: from the operator's action to the first packet that shows it.

Rules of this room:

1. The agent is the real `hostfw-agent` process (tests/support/agent.py,
   tests/rpc/stack.py), managing a node namespace that holds the workload's
   N ports as taps plus four probe VMs (bench/e2e_net.py). Standalone: the
   action is an atomic rename of the policy file, plus SIGHUP when the agent
   does not notice the file by itself (`trigger`, recorded). RPC: a private
   RabbitMQ node and `hostfw-controller`; the action is an atomic rename of
   the controller's policy file.
2. Changes, each `repeats` times, the agent idle before each (in sync, then
   `settle` seconds past its drift check):
   - rule_add: a rule added to the group every port uses lets cli reach a
     new srv port;
   - member_add: one of cli's spare addresses joins the most referenced
     remote group, which srv's group allows;
   - port_remove: rm's port leaves the policy (its tap stays), its stream
     must stop; port_bound: the port comes back, the stream flows again;
   - port_add: plug's tap appears on the node (Nova's plug), its stream
     must get through.
   Each sample keeps what the logs said meanwhile (pulls, applies).
3. Cold start: the kernel is emptied, the agent started with the taps and
   the policy present; timed to "in sync with every port active" (status
   polled) and to the first packet that shows enforcement (a stream of new
   flows to a port nobody allows stops). Against the floor: the agent's own
   ruleset saved, the kernel emptied, and the save restored by the restore
   tools (legacy and nft), in the same namespace and run.
4. Nothing here asserts a timing; failures of one sample are recorded and
   the series goes on, a dead agent ends the size.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import e2e_net as net
from bench import workloads
from bench.agent_bench import BenchAgent
from bench.report import loadavg
from bench.stats import summary
from tests.support.agent import AgentProcess

PRE = 0.15          # seconds of stream before the action (the "before" check)
QUIET = 0.4         # no echo for this long after a block: the stream is cut
DETECT = 5.0        # seconds a bare write gets before SIGHUP is sent (trigger "auto")
EGRESS = [{"direction": "egress", "ethertype": "IPv4"},
          {"direction": "egress", "ethertype": "IPv6"}]


@dataclass
class Options:
    repeats: int = 5
    cold_repeats: int = 3
    floor_repeats: int = 3
    trigger: str = "auto"               # standalone: auto | write | sighup
    timeout: float = 30.0               # seconds one change may take
    settle: float | None = None         # None: 1.3 s + 1.2 s per 1,000 ports


# ---------------------------------------------------------------- the policy

def udp_from(port: int, prefix: str | None = None, remote_group: str | None = None
             ) -> dict[str, Any]:
    rule: dict[str, Any] = {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
                            "port_range_min": port, "port_range_max": port}
    if prefix:
        rule["remote_ip_prefix"] = prefix
    if remote_group:
        rule["remote_group_id"] = remote_group
    return rule


@dataclass
class Scenario:
    """The workload plus the probe VMs' ports and groups, as the changes have left it."""

    workload: dict[str, Any]
    vms: dict[str, Any]
    rules: int = 0
    members: int = 0
    rm_bound: bool = True
    default_group: str = field(init=False)
    member_group: str = field(init=False)

    def __post_init__(self) -> None:
        self.default_group = workloads.default_group(self.workload)
        self.member_group = workloads.most_referenced_remote_group(self.workload)

    def _port(self, name: str, *groups: str, **extra: Any) -> dict[str, Any]:
        vm = self.vms[name]
        return {"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
                "fixed_ips": [vm.ipv4], "security_groups": list(groups),
                "device_owner": "compute:nova", "network_id": "e2e-net", **extra}

    def doc(self) -> dict[str, Any]:
        cli, plug, rm = (f"{self.vms[n].ipv4}/32" for n in ("cli", "plug", "rm"))
        groups = dict(self.workload["security_groups"])
        groups[self.default_group] = list(groups[self.default_group]) + [
            udp_from(net.RULE_BASE + k, cli) for k in range(self.rules)]
        groups["sg-e2e-srv"] = [*EGRESS, udp_from(net.PORT_OK, cli),
                                udp_from(net.PORT_MEMBER, remote_group=self.member_group),
                                udp_from(net.PORT_PLUG, plug), udp_from(net.PORT_RM, rm)]
        groups["sg-e2e-cli"] = list(EGRESS)
        ports = list(self.workload["ports"]) + [
            self._port("srv", self.default_group, "sg-e2e-srv"),
            self._port("cli", "sg-e2e-cli",
                       allowed_address_pairs=[{"ip_address": net.MEMBER_NET}]),
            self._port("plug", "sg-e2e-cli")]
        if self.rm_bound:
            ports.append(self._port("rm", "sg-e2e-cli"))
        members = copy.deepcopy(self.workload["sg_member_ips"])
        v4 = members.setdefault(self.member_group, {}).setdefault("IPv4", [])
        v4 += [net.member_address(k) for k in range(self.members)]
        return {"security_groups": groups, "ports": ports, "sg_member_ips": members}


# ---------------------------------------------------------------- the agent, both modes

class Driver:
    """Starts agents and performs the operator's policy writes, in one mode."""

    mode = ""

    def __init__(self, workdir: Path, ns: str, backend: str) -> None:
        self.workdir = workdir
        self.ns = ns
        self.backend = backend
        self.agent: AgentProcess | None = None
        self.agent_log: net.LogTail | None = None
        self.controller_log: net.LogTail | None = None
        self.starts = 0
        self.trigger: str | None = None
        self._staged: Path | None = None

    def policy_path(self) -> Path:
        raise NotImplementedError

    def new_agent(self, workdir: Path, doc: dict[str, Any]) -> AgentProcess:
        raise NotImplementedError

    def start(self, doc: dict[str, Any]) -> float:
        """A new agent (fresh state dir) on `doc`; the wall-clock time it was spawned."""
        self.stop()
        self.starts += 1
        workdir = self.workdir / f"agent-{self.starts}"
        workdir.mkdir(parents=True)
        self.agent = self.new_agent(workdir, doc)
        self.agent_log = net.LogTail(self.agent.log_path)
        spawned = time.time()
        self.agent.start(wait=False)
        return spawned

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def close(self) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        assert self.agent is not None
        if self.agent.proc is not None and self.agent.proc.poll() is not None:
            raise RuntimeError(f"hostfw-agent exited {self.agent.proc.returncode}:\n"
                               f"{self.agent.log()[-2000:]}")
        try:
            return self.agent.request({"command": "status"}, timeout=30)
        except OSError:
            return {}

    def stage(self, doc: dict[str, Any]) -> None:
        """Write the next policy beside the file (not timed); `act` renames it."""
        path = self.policy_path()
        self._staged = path.with_name(path.name + ".next")
        self._staged.write_text(json.dumps(doc))

    def act(self) -> float:
        """The operator's action: the atomic rename (+ SIGHUP); returns its time."""
        assert self._staged is not None
        started = time.time()
        os.replace(self._staged, self.policy_path())
        if self.trigger == "sighup":
            self.hup()
        self._staged = None
        return started

    def hup(self) -> None:
        assert self.agent is not None and self.agent.proc is not None
        os.kill(self.agent.proc.pid, signal.SIGHUP)

    def mark_logs(self) -> None:
        for tail in (self.agent_log, self.controller_log):
            if tail:
                tail.mark()

    def logs(self) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
        return (self.agent_log.lines() if self.agent_log else [],
                self.controller_log.lines() if self.controller_log else [])


class StandaloneDriver(Driver):
    mode = "standalone"

    def __init__(self, workdir: Path, ns: str, backend: str, trigger: str) -> None:
        super().__init__(workdir, ns, backend)
        self.trigger = None if trigger == "auto" else trigger

    def policy_path(self) -> Path:
        assert self.agent is not None
        return self.agent.policy_path

    def new_agent(self, workdir: Path, doc: dict[str, Any]) -> AgentProcess:
        return BenchAgent(workdir, self.ns, doc, backend=self.backend, resync_interval=3600)


class RpcDriver(Driver):
    mode = "rpc"

    def __init__(self, workdir: Path, ns: str, backend: str, url: str,
                 doc: dict[str, Any]) -> None:
        from tests.rpc.stack import ControllerProcess

        super().__init__(workdir, ns, backend)
        self.url = url
        self.trigger = "write"
        self.controller = ControllerProcess(workdir, url, doc).start()
        self.controller_log = net.LogTail(self.controller.log_path)
        try:
            self.controller.wait_serving(60)
        except BaseException:
            self.controller.stop()
            raise

    def policy_path(self) -> Path:
        return self.controller.policy_path

    def new_agent(self, workdir: Path, doc: dict[str, Any]) -> AgentProcess:
        from tests.rpc.stack import RpcAgentProcess

        return RpcAgentProcess(workdir, self.ns, self.url, backend=self.backend,
                               resync_interval=3600)

    def close(self) -> None:
        super().close()
        self.controller.stop()


def wait_status(driver: Driver, ok: Callable[[dict[str, Any]], bool], timeout: float,
                what: str, interval: float = 0.05) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = driver.status()
        if status.get("ok") and ok(status):
            return status
        time.sleep(interval)
    log = driver.agent.log()[-2000:] if driver.agent else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")


# ---------------------------------------------------------------- samples

def change_sample(driver: Driver, stream: net.Stream, kind: str, act: Callable[[], float],
                  timeout: float, fallback: Callable[[], None] | None = None) -> dict[str, Any]:
    """One change seen by `stream`: "allow" (first echo) or "block" (first loss for good)."""
    try:
        if kind == "block" and stream.wait_through(time.time(), 5.0) is None:
            return {"error": "the stream did not flow before the action"}
        time.sleep(PRE)
        driver.mark_logs()
        action = act()
        out: dict[str, Any] = {}
        if kind == "allow":
            got = stream.wait_through(action, DETECT if fallback else timeout)
            if got is None and fallback:
                fallback()
                out["discarded"] = (f"the write alone was not seen within {DETECT:.0f} s; "
                                    f"SIGHUP sent")
                got = stream.wait_through(action, timeout)
            stream.finish()
            out.update(net.through_latency(stream.snapshot(), action, got))
        else:
            stream.wait_quiet(action, QUIET, timeout)
            sent = stream.finish()
            out.update(net.cut_latency(sent, stream.snapshot(), action))
    finally:
        stream.finish()
    out["breakdown"] = net.breakdown(*logs_until_applied(driver, action), action,
                                     time.time())
    return out


def logs_until_applied(driver: Driver, action: float, timeout: float = 10.0
                       ) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """The logs once the agent logged its apply of the change (it comes after the packets)."""
    deadline = time.monotonic() + timeout
    while True:
        agent_lines, controller_lines = driver.logs()
        if any(stamp >= action and net.APPLIED.search(text) for stamp, text in agent_lines) \
                or time.monotonic() > deadline:
            return agent_lines, controller_lines
        time.sleep(0.05)


def cold_sample(node: net.Node, driver: Driver, doc: dict[str, Any], expected: int,
                timeout: float) -> dict[str, Any]:
    """Empty kernel, start the agent; until in sync with `expected` ports, and enforced.

    Two streams of new flows from cli: to a port nobody allows (its first loss
    for good is "enforced") and to one the policy allows (whether it was ever
    cut on the way, and when it came back: the fail-closed window).
    """
    driver.stop()
    net.flush_kernel(node.ns)
    net.flush_conntrack(node.ns)
    srv, cli = node.vms["srv"], node.vms["cli"]
    base = random.randrange(20000, 25000)
    blocked = net.Stream(cli, srv.ipv4, net.PORT_BLOCKED, interval=0.005, fresh=True,
                         sport_base=base)
    allowed = net.Stream(cli, srv.ipv4, net.PORT_OK, interval=0.005, fresh=True,
                         sport_base=base + 20000)
    try:
        time.sleep(0.3)
        spawned = driver.start(doc)
        status = wait_status(driver, lambda s: bool(s.get("in_sync")) and
                             s.get("generation", 0) > 0 and s.get("ports_active") == expected,
                             timeout, f"in sync with {expected} ports")
        seen = time.time()
        blocked.wait_quiet(spawned, QUIET, 30)
        sent = blocked.finish()
        allowed_sent = allowed.finish()
    finally:
        blocked.finish()
        allowed.finish()
    cut = net.cut_latency(sent, blocked.snapshot(), spawned)
    applied = status.get("last_apply_ok_at")
    agent_lines, _ = driver.logs()
    sample = {"in_sync_seen_s": seen - spawned,
              "applied_s": applied - spawned if applied else None,
              "enforced_s": cut.get("latency_s"),
              "allowed_stream": net.interruption(allowed_sent, allowed.snapshot(), spawned),
              "generation": status.get("generation"),
              "breakdown": net.breakdown(agent_lines, [], spawned, seen + 1)}
    if "error" in cut:
        sample["enforced_error"] = cut["error"]
    return sample


def wait_idle(driver: Driver, settle: float, ports: int | None = None) -> None:
    """In sync (with `ports` active), then `settle` seconds for the drift check to pass."""
    wait_status(driver, lambda s: bool(s.get("in_sync")) and
                (ports is None or s.get("ports_active") == ports), 120, "the agent idle")
    time.sleep(settle)


# ---------------------------------------------------------------- one size

def bench_size(mode: str, backend: str, workload: dict[str, Any], opts: Options,
               broker_url: str | None = None, say: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """Cold start against the floor, then every change `opts.repeats` times."""
    size = len(workload["ports"])
    settle = opts.settle if opts.settle is not None else 1.3 + 1.2 * size / 1000
    timeout = opts.timeout * max(1.0, size / 500)
    result: dict[str, Any] = {"mode": mode, "backend": backend, "ports": size,
                              "probe_vms": 4, "devices": size + 4, "settle_s": settle,
                              "repeats": opts.repeats, "resync_interval": 3600,
                              "load": {"start": loadavg()}}
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="hfwe2e-"))
        stack.callback(shutil.rmtree, workdir, True)
        node = net.build_node([p["device"] for p in workload["ports"]], opts.repeats)
        stack.callback(node.close)
        net.static_neighbours(node)
        scen = Scenario(workload, node.vms)
        driver: Driver
        if mode == "rpc":
            assert broker_url
            driver = RpcDriver(workdir, node.ns, backend, broker_url, scen.doc())
        else:
            driver = StandaloneDriver(workdir, node.ns, backend, opts.trigger)
        stack.callback(driver.close)
        result["groups"] = {"rule_change": scen.default_group, "member": scen.member_group}
        expected = size + 4
        floor_mode = "iptables-legacy" if backend == "iptc" else backend

        cold: list[dict[str, Any]] = []
        for i in range(max(2, opts.cold_repeats)):
            say(f"e2e {mode} {backend} {size}: cold start {i + 1}")
            cold.append(cold_sample(node, driver, scen.doc(), expected, 60 + size * 0.3))
            if i == 0:
                driver.stop()
                result["floor"] = floors(node, floor_mode, opts.floor_repeats)
        result["cold_start"] = {
            "in_sync_s": summary([c["in_sync_seen_s"] for c in cold]),
            "applied_s": summary([c["applied_s"] for c in cold if c["applied_s"]]),
            "enforced_s": summary([c["enforced_s"] for c in cold if c["enforced_s"]]),
            "allowed_back_s": summary([c["allowed_stream"]["back_s"] for c in cold
                                       if c["allowed_stream"].get("back_s")]),
            "allowed_lost": [c["allowed_stream"]["lost"] for c in cold],
            "samples": cold}
        own = result["floor"].get(floor_mode, {}).get("total_s")
        if own and result["cold_start"]["in_sync_s"]:
            result["cold_over_floor"] = round(result["cold_start"]["in_sync_s"]["median"] /
                                              own["median"], 3)
        result["changes"] = run_changes(node, driver, scen, opts, settle, timeout, expected, say)
        result["trigger"] = driver.trigger
        result["trigger_asked"] = opts.trigger if mode == "standalone" else "write"
        result["noop_resync_s"] = noop_resync(driver)
        result["load"]["end"] = loadavg()
    return result


def floors(node: net.Node, own_mode: str, repeats: int) -> dict[str, Any]:
    """The agent's ruleset (as left by its SIGTERM) restored by the tools of both modes.

    The agent's own mode `repeats` times (the ratio's floor), the other once.
    """
    dump = net.save(node.ns, own_mode)
    out: dict[str, Any] = {"saved_with": own_mode, **dump.counts()}
    for mode in (own_mode, *(m for m in net.TOOLS if m != own_mode)):
        try:
            count = max(1, repeats) if mode == own_mode else 1
            samples = [net.restore_floor(node.ns, dump, mode) for _ in range(count)]
        except Exception as exc:  # e.g. a module the other mode lacks; the own mode decides
            out[mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        out[mode] = {key: summary([s[key] for s in samples]) for key in samples[0]}
    net.flush_kernel(node.ns)
    return out


def run_changes(node: net.Node, driver: Driver, scen: Scenario, opts: Options, settle: float,
                timeout: float, expected: int, say: Callable[[str], None]) -> dict[str, Any]:
    vms = node.vms
    srv = vms["srv"].ipv4
    samples: dict[str, list[dict[str, Any]]] = {
        "rule_add": [], "member_add": [], "port_remove": [], "port_bound": [], "port_add": []}

    def policy_change(kind: str, stream: net.Stream) -> dict[str, Any]:
        driver.stage(scen.doc())
        fallback = None
        if driver.trigger is None:   # "auto": is a bare write seen?
            def fallback() -> None:
                driver.trigger = "sighup"
                driver.hup()
        res = change_sample(driver, stream, kind, driver.act, timeout, fallback)
        if driver.trigger is None and "latency_s" in res:
            driver.trigger = "write"
        return res

    repeats = min(opts.repeats, net.MAX_SAMPLES - 1)
    say(f"e2e {driver.mode}: {repeats} x rule_add, member_add, port_remove/bound, port_add")
    for k in range(repeats + 1):   # one more when "auto" spent the first on finding SIGHUP
        if k == repeats and not any("discarded" in s for s in samples["rule_add"]):
            break
        wait_idle(driver, settle)
        scen.rules += 1
        samples["rule_add"].append(policy_change(
            "allow", net.Stream(vms["cli"], srv, net.RULE_BASE + k)))
    for k in range(repeats):
        wait_idle(driver, settle)
        scen.members += 1
        samples["member_add"].append(policy_change(
            "allow", net.Stream(vms["cli"], srv, net.PORT_MEMBER, bind=net.member_address(k))))
    for _ in range(repeats):
        wait_idle(driver, settle, expected)
        scen.rm_bound = False
        samples["port_remove"].append(policy_change("block", net.Stream(vms["rm"], srv,
                                                                         net.PORT_RM)))
        wait_idle(driver, settle)
        scen.rm_bound = True
        samples["port_bound"].append(policy_change("allow", net.Stream(vms["rm"], srv,
                                                                        net.PORT_RM)))
    plug_vm = vms["plug"]

    def plug_now() -> float:
        started = time.time()
        net.plug(node, plug_vm)
        return started

    for _ in range(repeats):
        wait_idle(driver, settle, expected)
        net.unplug(node, plug_vm)
        wait_idle(driver, settle, expected - 1)
        samples["port_add"].append(change_sample(
            driver, net.Stream(plug_vm, srv, net.PORT_PLUG), "allow", plug_now, timeout))
    out: dict[str, Any] = {}
    for name, got in samples.items():
        latencies = [s["latency_s"] for s in got if "latency_s" in s and "discarded" not in s]
        out[name] = {"latency_s": summary(latencies),
                     "apply_s": summary([a["seconds"] for s in got
                                         for a in s["breakdown"]["applies"][:1]]),
                     "pull_s": summary([p["seconds"] for s in got
                                        for p in s["breakdown"]["pulls"][:1]]),
                     "errors": [s["error"] for s in got if "error" in s],
                     "samples": got}
        med = out[name]["latency_s"]
        say(f"  {name}: p50 {med['median'] * 1000:.0f} ms, p90 {med['p90'] * 1000:.0f} ms"
            if med else f"  {name}: no sample ({out[name]['errors'][:1]})")
    return out


def noop_resync(driver: Driver, count: int = 2) -> dict[str, Any] | None:
    """`resync --wait` on the idle agent: the full re-read and check."""
    assert driver.agent is not None
    times = []
    for _ in range(count):
        started = time.perf_counter()
        reply = driver.agent.request({"command": "resync", "wait": True, "timeout": 120},
                                     timeout=130)
        if reply.get("ok"):
            times.append(time.perf_counter() - started)
    return summary(times)
