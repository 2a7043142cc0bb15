"""The fleet series: many agents, one broker, one hostfw-controller (issue 12).

Rules of this room:

1. `converge`: N real `hostfw-agent` processes in RPC mode, each managing a
   node namespace of its own (`[agent] netns`) with 10 ports: a client VM
   and a server VM (namespaces on the node's bridge, as tests/support builds
   them) and 8 plain taps. One private RabbitMQ node (tests/rpc/broker.py)
   and one controller serve them all; the controller's file holds every
   node's ports from the start, so growing the fleet (10, then 50, then 100
   agents) only starts agents and casts nothing. One rule change per size
   (a UDP port opened on the servers' group) is timed from just before the
   file is replaced to the first datagram through on each node: a probe
   sends one datagram per node every `PROBE_INTERVAL` from client to server
   (sockets opened in the VM namespaces by this process), and a datagram
   that arrives before the change voids the sample.
2. `storm`: 1,000 simulated agents against one controller serving a
   10,000-port policy (10 ports per simulated host). A few worker
   processes each hold one oslo.messaging transport, listen to the
   security-group fanout as an agent does, and on the notification pull
   `security_group_info_for_devices` for every one of their hosts' 10
   devices at once, one thread per host (what today's agent does on any
   notification). The controller's answer time is the call's round trip
   seen by the caller, so it includes the queueing behind the other 999.
   The storm runs twice: answered by the controller process itself, and by
   two answer workers (`[controller] rpc_workers = 2`). Each round records
   the CPU seconds of controller (with its workers), broker and clients,
   because on a small machine they compete for the same cores.
3. Everything is torn down on the way out, also on errors: agents and
   workers are stopped (killed if need be), namespaces deleted, the broker
   stopped.
4. `python -m bench --sections fleet` runs both parts; `--quick` runs N = 10
   and one round of each storm.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from agent import netns
from bench.agent_bench import APPLIED_RE
from bench.sandbox import add_taps
from bench.stats import summary
from tests.rpc.broker import Broker, running_broker, skip_reason
from tests.rpc.stack import ControllerProcess, RpcAgentProcess
from tests.support.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
PORTS_PER_NODE = 10
PROBE_INTERVAL = 0.01          # seconds between two datagrams of one node's probe
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux; Python names it from 3.12
PROBE_PORT_BASE = 41000        # size k of a run opens UDP port PROBE_PORT_BASE + k
CONVERGE_TIMEOUT = 60.0
START_BATCH = 10               # agents started together, then waited for
EGRESS = [{"direction": "egress", "ethertype": "IPv4"},
          {"direction": "egress", "ethertype": "IPv6"}]
PULLED_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[.,]\d{3}) .*?pulled (\d+) devices?"
                       r"(?: \([a-z]+\))? in ([\d.]+) s")
RELOAD_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[.,]\d{3}) .*reload \(file changed\): "
                       r".*load ([\d.]+) ms, diff\+swap ([\d.]+) ms, casts ([\d.]+) ms")


def percentile(samples: list[float], q: int) -> float | None:
    """The q-th percentile (inclusive method), None without samples."""
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def tail(samples: list[float]) -> dict[str, Any]:
    """The summary plus p99, as the fleet rows report it."""
    out = summary(samples) or {}
    out["p99"] = percentile(samples, 99)
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its living children (the answer workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_seconds(int(child)) for child in children)


def _broker_pid(broker: Broker) -> int | None:
    try:
        return int(Path(broker.workdir, "pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def replace_policy(controller: ControllerProcess, policy: dict[str, Any]) -> float:
    """Replace the controller's file atomically; the wall time of the rename."""
    tmp = controller.policy_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(policy))
    written = time.time()
    os.replace(tmp, controller.policy_path)
    return written


def _stamp(text: str) -> float:
    return datetime.strptime(text.replace(",", "."), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def agent_steps(agent: RpcAgentProcess, since: float) -> dict[str, float | None]:
    """From an agent's log: when its first pull and first commit after `since` ended."""
    steps: dict[str, float | None] = {"pulled_s": None, "pull_took_s": None, "applied_s": None}
    for line in agent.log_path.read_text(errors="replace").splitlines():
        pulled = PULLED_RE.match(line)
        if pulled and steps["pulled_s"] is None and _stamp(pulled.group(1)) >= since:
            steps["pulled_s"] = _stamp(pulled.group(1)) - since
            steps["pull_took_s"] = float(pulled.group(3))
        applied = APPLIED_RE.match(line)
        if applied and steps["applied_s"] is None and _stamp(applied.group(1)) >= since:
            steps["applied_s"] = _stamp(applied.group(1)) - since
    return steps


def controller_reload(controller: ControllerProcess, since: float) -> dict[str, Any] | None:
    """The controller's first "reload (file changed)" at or after `since` (wall clock)."""
    for line in controller.log_path.read_text(errors="replace").splitlines():
        match = RELOAD_RE.match(line)
        if not match:
            continue
        stamp = _stamp(match.group(1))
        if stamp >= since - 0.001:
            return {"logged_after_write_s": round(stamp - since, 4),
                    "load_ms": float(match.group(2)), "diff_swap_ms": float(match.group(3)),
                    "casts_ms": float(match.group(4))}
    return None


# ---------------------------------------------------------------- part 1: real agents

class FleetNode:
    """One simulated compute node: its namespaces, its 10 ports, its agent."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.subnet4 = f"10.251.{index}.0/24"
        self.subnet6 = f"fd00:251:{index:x}::/64"
        self.client_ip, self.server_ip = f"10.251.{index}.2", f"10.251.{index}.3"
        ids = [f"{index:04x}{k:04x}-f1ee-4000-8000-{index:04x}{k:08x}" for k in range(10)]
        self.client_id, self.server_id, *self.tap_ids = ids
        self.macs = [f"fa:16:3e:fe:{index:02x}:{k:02x}" for k in range(10)]
        self.topology: Topology | None = None
        self.agent: RpcAgentProcess | None = None

    def ports(self) -> list[dict[str, Any]]:
        """This node's ports as the controller's file lists them."""
        out = [self._port(self.client_id, self.macs[0], 2, "fleet-client"),
               self._port(self.server_id, self.macs[1], 3, "fleet-server")]
        out += [self._port(pid, self.macs[2 + k], 10 + k, "fleet-other")
                for k, pid in enumerate(self.tap_ids)]
        return out

    def _port(self, port_id: str, mac: str, host: int, group: str) -> dict[str, Any]:
        return {"id": port_id, "mac_address": mac,
                "fixed_ips": [f"10.251.{self.index}.{host}", f"fd00:251:{self.index:x}::{host:x}"],
                "security_groups": [group]}

    def build(self) -> None:
        """The node namespace, both VMs plugged, the 8 taps."""
        for attempt in range(3):
            try:
                topo = self.topology = Topology(subnet4=self.subnet4, subnet6=self.subnet6)
                break
            except subprocess.CalledProcessError:
                # Namespace names carry 2 random bytes: among 100 nodes of one process a
                # clash happens in a few runs in a hundred. A new Topology draws anew.
                if attempt == 2:
                    raise
        topo.add_vm("client", port_id=self.client_id, mac=self.macs[0], ipv4=self.client_ip,
                    ipv6=f"fd00:251:{self.index:x}::2")
        topo.add_vm("server", port_id=self.server_id, mac=self.macs[1], ipv4=self.server_ip,
                    ipv6=f"fd00:251:{self.index:x}::3")
        add_taps(topo.node.ns, [f"tap{pid[:11]}" for pid in self.tap_ids], topo.node.bridge)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop(timeout=15)
        if self.topology is not None:
            self.topology.close()


def fleet_policy(nodes: list[FleetNode], udp_ports: list[int]) -> dict[str, Any]:
    """Every node's ports; the servers' group admits the UDP ports opened so far."""
    opened = [{"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
               "port_range_min": p, "port_range_max": p} for p in udp_ports]
    return {
        "security_groups": {
            "fleet-client": [{"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp"},
                             *EGRESS],
            "fleet-server": [{"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp",
                              "remote_group_id": "fleet-client"}, *EGRESS, *opened],
            "fleet-other": [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                             "port_range_min": 22, "port_range_max": 22,
                             "remote_group_id": "fleet-client"}, *EGRESS],
        },
        "ports": [p for node in nodes for p in node.ports()],
    }


class UdpProbe:
    """One UDP flow per node, client VM -> server VM; when did each first get through."""

    def __init__(self, nodes: list[FleetNode], port: int) -> None:
        self.port = port
        self.first: dict[int, float] = {}
        self.max_gap = 0.0   # the longest pause between two sending rounds (a busy machine)
        self._stop = threading.Event()
        self._senders: list[socket.socket] = []
        self._receivers: dict[int, tuple[socket.socket, int]] = {}   # fileno -> (socket, node)
        self._sockets: list[socket.socket] = []
        made: list[BaseException] = []
        thread = threading.Thread(target=self._open, args=(nodes, made), name="probe-open")
        thread.start()   # a thread of its own: setns moves only the calling thread
        thread.join()
        if made:
            self.close()
            raise made[0]
        self._threads = [threading.Thread(target=self._send, name="probe-send", daemon=True),
                         threading.Thread(target=self._receive, name="probe-recv", daemon=True)]
        for t in self._threads:
            t.start()

    def _open(self, nodes: list[FleetNode], made: list[BaseException]) -> None:
        try:
            for node in nodes:
                assert node.topology is not None
                netns.enter(node.topology.vms["server"].ns)
                rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._sockets.append(rx)
                rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                rx.bind((node.server_ip, self.port))
                rx.setblocking(False)
                self._receivers[rx.fileno()] = (rx, node.index)
                netns.enter(node.topology.vms["client"].ns)
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._sockets.append(tx)
                tx.connect((node.server_ip, self.port))
                tx.setblocking(False)
                self._senders.append(tx)
        except BaseException as exc:  # reported to the caller, which cleans up
            made.append(exc)

    def _send(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(PROBE_INTERVAL):
            now = time.monotonic()
            self.max_gap, last = max(self.max_gap, now - last), now
            for tx in self._senders:
                try:
                    tx.send(b"fleet")
                except OSError:
                    pass   # dropped, refused or queue full: the next one is 10 ms away

    def _receive(self) -> None:
        """Record each node's first datagram by its kernel receive time (SO_TIMESTAMPNS),
        which a busy machine cannot delay the way it delays this thread."""
        while not self._stop.is_set():
            readable, _, _ = select.select(list(self._receivers), [], [], 0.05)
            for fd in readable:
                sock, index = self._receivers[fd]
                try:
                    while True:
                        _, ancillary, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(16))
                        for level, kind, data in ancillary:
                            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                                sec, nsec = struct.unpack("qq", data[:16])
                                self.first.setdefault(index, sec + nsec / 1e9)
                except BlockingIOError:
                    pass

    def wait(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.first) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        for t in getattr(self, "_threads", []):
            t.join(2)
        for sock in self._sockets:
            sock.close()


def _wait_agents(nodes: list[FleetNode], timeout: float) -> None:
    """Until every agent is connected, in sync, with its 10 ports active."""
    for node in nodes:
        assert node.agent is not None
        node.agent.wait_converged(timeout=timeout, ports=PORTS_PER_NODE)


def converge(broker: Broker, sizes: list[int], workdir: Path,
             backend: str = "iptables-legacy", rpc_workers: int = 0) -> dict[str, Any]:
    """Part 1: per-agent convergence after one rule change, for each fleet size."""
    result: dict[str, Any] = {
        "backend": backend, "ports_per_agent": PORTS_PER_NODE,
        "controller_rpc_workers": rpc_workers,
        "probe": f"first UDP datagram through (its kernel receive time), client VM -> server "
                 f"VM on each node, one sent every {PROBE_INTERVAL * 1000:.0f} ms; timed from "
                 f"the rename of the controller's file",
        "agents_resync_interval_s": 3600, "sizes": {}}
    nodes = [FleetNode(i) for i in range(max(sizes))]
    opened: list[int] = []
    with ExitStack() as cleanup:
        cleanup.callback(_close_nodes, nodes)
        controller = ControllerProcess(workdir, broker.url, fleet_policy(nodes, opened))
        with open(controller.conf_path, "a", encoding="utf-8") as conf:
            conf.write(f"rpc_workers = {rpc_workers}\n")   # the file ends in [controller]
        cleanup.callback(controller.stop)
        controller.start()
        controller.wait_serving(timeout=60)
        running: list[FleetNode] = []
        for k, size in enumerate(sorted(sizes)):
            started = time.monotonic()
            while len(running) < size:
                batch = nodes[len(running):min(size, len(running) + START_BATCH)]
                for node in batch:
                    node.build()
                    assert node.topology is not None
                    (workdir / f"agent{node.index}").mkdir()
                    node.agent = RpcAgentProcess(workdir / f"agent{node.index}",
                                                 node.topology.node.ns, broker.url,
                                                 backend=backend, resync_interval=3600)
                    node.agent.start(wait=False)
                _wait_agents(batch, timeout=180)
                running += batch
            _wait_agents(running, timeout=60)
            time.sleep(2.0)   # let the last pulls and drift checks finish
            port = PROBE_PORT_BASE + k
            probe = UdpProbe(running, port)
            try:
                time.sleep(0.5)
                leaked = sorted(probe.first)
                probe.first.clear()
                probe.max_gap = 0.0
                opened.append(port)
                written = replace_policy(controller, fleet_policy(nodes, opened))
                probe.wait(len(running), CONVERGE_TIMEOUT)
                first, max_gap = dict(probe.first), probe.max_gap
            finally:
                probe.close()
            times = [first[n.index] - written for n in running if n.index in first]
            steps = [agent_steps(n.agent, written) for n in running if n.agent is not None]
            result["sizes"][str(size)] = {
                "agents_logged": {key: tail([s[key] for s in steps if s[key] is not None])
                                  for key in ("pulled_s", "pull_took_s", "applied_s")},
                "agents": size, "setup_s": round(time.monotonic() - started, 1),
                "convergence_s": tail(times),
                "p50_s": percentile(times, 50), "p99_s": percentile(times, 99),
                "not_converged": len(running) - len(times),
                "open_before_change": leaked,
                "probe_longest_send_pause_s": round(max_gap, 4),
                "controller_reload": controller_reload(controller, written),
            }
    return result


def _close_nodes(nodes: list[FleetNode]) -> None:
    """SIGTERM every agent first (their shutdowns overlap), then stop and delete all."""
    for node in nodes:
        if node.agent is not None and node.agent.proc is not None:
            node.agent.proc.terminate()
    for node in nodes:
        node.close()


# ---------------------------------------------------------------- part 2: the pull storm

def storm_policy(hosts: int, per_host: int = PORTS_PER_NODE, projects: int = 100,
                 extra_rule: int = 0) -> dict[str, Any]:
    """`hosts * per_host` ports in `projects` projects of three groups each.

    Each project has a default group (ingress from itself, as Neutron's
    default group), a web group and a db group that admits the web group;
    every port is in its project's default group and in web or db. A host's
    ports come from per_host / 2 projects, so a host's reply carries a few
    projects' rules and members, as on a real cloud.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in range(projects):
        groups[f"default-{p}"] = [
            {"direction": "ingress", "ethertype": e, "remote_group_id": f"default-{p}"}
            for e in ("IPv4", "IPv6")] + EGRESS
        groups[f"web-{p}"] = [
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
             "port_range_min": port, "port_range_max": port} for port in (80, 443)] + [
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp"}]
        groups[f"db-{p}"] = [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                              "port_range_min": 5432, "port_range_max": 5432,
                              "remote_group_id": f"web-{p}"}]
    for k in range(extra_rule):
        groups["default-0"].append({"direction": "ingress", "ethertype": "IPv4",
                                    "protocol": "udp", "port_range_min": 30000 + k,
                                    "port_range_max": 30000 + k})
    ports = []
    for h in range(hosts):
        for k in range(per_host):
            n = h * per_host + k
            project = (h + (k // 2) * 13) % projects
            ports.append({
                "id": f"{n:08x}-5707-4000-8000-{n:012x}",
                "mac_address": f"fa:16:3e:{n >> 16 & 0xff:02x}:{n >> 8 & 0xff:02x}:{n & 0xff:02x}",
                "fixed_ips": [f"10.{64 + (n >> 16)}.{n >> 8 & 0xff}.{n & 0xff}",
                              f"fd00:5707::{n:x}"],
                "security_groups": [f"default-{project}", ("web" if k % 2 else "db")
                                    + f"-{project}"]})
    return {"security_groups": groups, "ports": ports}


def storm(broker: Broker, workdir: Path, hosts: int = 1000, rounds: int = 3,
          workers: int = 4, rpc_workers: int = 0) -> dict[str, Any]:
    """Part 2: `hosts` simulated agents pull at once after one notification, `rounds` times.

    `workers` are the simulating processes; `rpc_workers` the controller's
    answering processes (`[controller] rpc_workers`, 0: the controller itself).
    """
    policy = storm_policy(hosts)
    devices = [f"tap{p['id'][:11]}" for p in policy["ports"]]
    per_host = [devices[i:i + PORTS_PER_NODE] for i in range(0, len(devices), PORTS_PER_NODE)]
    result: dict[str, Any] = {
        "simulated_agents": hosts, "devices_per_pull": PORTS_PER_NODE,
        "client_processes": workers, "controller_rpc_workers": rpc_workers,
        "policy": {"ports": len(policy["ports"]), "security_groups": len(policy["security_groups"]),
                   "shape": "100 projects x (default, web, db); 5 projects per host"},
        "measures": "round trip of each security_group_info_for_devices call, all hosts "
                    "calling on the same rule_updated notification", "rounds": []}
    with ExitStack() as cleanup:
        controller = ControllerProcess(workdir, broker.url, policy)
        with open(controller.conf_path, "a", encoding="utf-8") as conf:
            conf.write(f"rpc_workers = {rpc_workers}\n")   # the file ends in [controller]
        cleanup.callback(controller.stop)
        controller.start()
        controller.wait_serving(timeout=120)
        procs = []
        for w in range(workers):
            proc = subprocess.Popen([sys.executable, "-m", "bench.fleet", "sim"], cwd=ROOT,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            cleanup.callback(_stop_worker, proc)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"url": broker.url, "rounds": rounds,
                                         "hosts": per_host[w::workers]}) + "\n")
            proc.stdin.flush()
            procs.append(proc)
        for proc in procs:
            if _read_line(proc, 180) != "ready":
                raise RuntimeError("a storm worker did not get ready")
        assert controller.proc is not None
        beam = _broker_pid(broker)
        for r in range(rounds):
            time.sleep(2.0)
            cpu = _cpu_seconds(controller.proc.pid)
            broker_cpu = _cpu_seconds(beam) if beam else 0.0
            written = replace_policy(controller, storm_policy(hosts, extra_rule=r + 1))
            calls, client_cpu = [], 0.0
            for proc in procs:
                line = json.loads(_read_line(proc, 300))
                calls += line["calls"]
                client_cpu += line["cpu_s"]
            answers = [c["answered"] - c["sent"] for c in calls if c.get("ok")]
            since = [c["answered"] - written for c in calls if c.get("ok")]
            result["rounds"].append({
                "answer_s": tail(answers), "since_write_s": tail(since),
                "p50_s": percentile(answers, 50), "p99_s": percentile(answers, 99),
                "failed": [c.get("error") for c in calls if not c.get("ok")][:5],
                "failed_count": sum(1 for c in calls if not c.get("ok")),
                "devices_answered": sum(c.get("devices", 0) for c in calls),
                "cpu_s": {"controller": round(_cpu_seconds(controller.proc.pid) - cpu, 3),
                          "broker": round(_cpu_seconds(beam) - broker_cpu, 3) if beam else None,
                          "simulated_agents": round(client_cpu, 3)},
                "controller_reload": controller_reload(controller, written)})
    good = [r for r in result["rounds"] if r["p99_s"] is not None]
    result["p50_s"] = statistics.median(r["p50_s"] for r in good) if good else None
    result["p99_s"] = max(r["p99_s"] for r in good) if good else None
    return result


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise TimeoutError(f"storm worker {proc.pid} said nothing within {timeout} s "
                           f"(exit {proc.poll()})")
    return line.strip()


def _stop_worker(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sim_worker() -> int:
    """A storm worker: stdin gives url, rounds and hosts; stdout says ready, then each round."""
    import oslo_messaging as messaging
    from oslo_config import cfg

    from agent.sources import rpc_api

    spec = json.loads(sys.stdin.readline())
    hosts: list[list[str]] = spec["hosts"]
    # The simulated agents of one process share oslo's pool of 30 AMQP connections
    # (one each would be 1,000 connections opened at the storm's start, a broker
    # storm of its own); waiting for a pooled connection is not worth a warning.
    logging.getLogger("oslo.messaging._drivers.pool").setLevel(logging.ERROR)   # oslo_log's name
    messaging.set_transport_defaults(control_exchange=rpc_api.CONTROL_EXCHANGE)
    transport = messaging.get_rpc_transport(cfg.CONF, url=spec["url"])
    fired = threading.Event()

    class Notified:
        target = messaging.Target(version=rpc_api.SG_NOTIFY_VERSION)

        def security_groups_rule_updated(self, context: Any, **kwargs: Any) -> None:
            fired.set()

        def security_groups_member_updated(self, context: Any, **kwargs: Any) -> None:
            fired.set()

    server = messaging.get_rpc_server(
        transport, messaging.Target(topic=rpc_api.SG_TOPIC, server=f"fleet-sim-{os.getpid()}",
                                    fanout=True), [Notified()])
    server.start()
    client = messaging.get_rpc_client(
        transport, messaging.Target(topic=rpc_api.PLUGIN_TOPIC, version="1.0")).prepare(
        version=rpc_api.SG_INFO_VERSION, timeout=120, retry=0)

    def pull(devices: list[str]) -> dict[str, Any]:
        sent = time.time()
        try:
            reply = client.call(rpc_api.admin_context(), rpc_api.SG_INFO_METHOD,
                                devices=devices, call_version=rpc_api.SG_INFO_VERSION)
        except Exception as exc:  # reported in the JSON, never hidden
            return {"ok": False, "sent": sent, "error": f"{type(exc).__name__}: {exc}"[:200]}
        return {"ok": True, "sent": sent, "answered": time.time(),
                "devices": len(reply["devices"])}

    with ThreadPoolExecutor(len(hosts)) as pool:
        barrier = threading.Barrier(len(hosts))
        list(pool.map(lambda _: barrier.wait(), range(len(hosts))))   # every thread exists
        pull(hosts[0])   # connected, reply queue declared
        print("ready", flush=True)
        for _ in range(spec["rounds"]):
            fired.wait()
            fired.clear()
            cpu = sum(os.times()[:2])
            calls = list(pool.map(pull, hosts))
            print(json.dumps({"calls": calls, "cpu_s": sum(os.times()[:2]) - cpu}), flush=True)
    server.stop()
    server.wait()
    transport.cleanup()
    return 0


# ---------------------------------------------------------------- entry

@contextmanager
def private_broker() -> Iterator[Broker]:
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    with running_broker() as broker:
        yield broker


def bench_fleet(sizes: list[int], storm_hosts: int, storm_rounds: int,
                backend: str = "iptables-legacy", rpc_workers: int = 2) -> dict[str, Any]:
    """Both parts on one private broker; a part that fails is recorded, the others still run.

    The storm runs twice: answered by the controller process itself, and by
    `rpc_workers` answer workers.
    """
    out: dict[str, Any] = {}
    parts = {
        "converge": lambda b, d: converge(b, sizes, d, backend),
        "storm": lambda b, d: storm(b, d, storm_hosts, storm_rounds),
        f"storm_rpc_workers_{rpc_workers}": lambda b, d: storm(
            b, d, storm_hosts, storm_rounds, rpc_workers=rpc_workers),
    }
    with private_broker() as broker, tempfile.TemporaryDirectory(prefix="hfwfleet-") as work:
        for name, run in parts.items():
            where = Path(work) / name
            where.mkdir()
            try:
                out[name] = run(broker, where)
            except Exception as exc:  # one part's failure must not lose the others' figures
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["sim"]:
        sys.exit(sim_worker())
    print("usage: python -m bench.fleet sim  (a storm worker; run the series with "
          "python -m bench --sections fleet)", file=sys.stderr)
    sys.exit(2)
