"""A node with N ports programmed, for the series that send packets across it.

Rules of this room:

1. Two real VMs (veth, tests/support/topology.py) on the node bridge, `src`
   and `dst`; what a series sends goes from one to the other and never
   leaves the sandbox.
2. "N ports programmed" means the real agent enforcing N ports: the two VMs
   plus N-2 tun/tap devices of the 1,000-port workload, so the dispatch trees,
   the group chains and the ipsets the VMs' packets cross are those of an
   N-port node. Both VMs are in the workload's default group (every port is)
   plus `sg-bench`, which admits iperf3 and the new-flows datagrams.
3. A series first measures with no rule at all (before the agent starts),
   then visits every count in turn within each repeat, so drift in the
   machine's load spreads over all of them.
4. A sample never overlaps a kernel read of the agent (`quiet`). At 1,000
   ports a read costs a CPU for a second or more, which would be charged to
   the datapath. What the agent reads, and when (agent/reconciler.py):
   - an apply that wrote schedules one read-back of the chains and sets it
     touched `CHECK_DELAY` after it started (a stepwise full re-read instead
     when it touched more than `CHECK_MAX`, which ends in an apply);
   - a full re-read happens otherwise only on the resync timer
     (`resync_interval`, an hour here) or `agent-ctl resync`, and ends in an
     apply.
   So the sample starts `CHECK_DELAY` after the last apply (`last_apply_ok_at`
   in `status`; an apply that wrote nothing schedules no read-back, and
   waiting for it anyway costs at most a second), once the agent is idle: no
   child process (the iptables/ipset reads) and no CPU spent for a while (a
   read-back is not counted in `status`, and the iptc backend reads in
   process). It is taken again when the agent applied or worked meanwhile.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from agent.reconciler import CHECK_DELAY
from bench import workloads
from bench.agent_bench import SUBNET4, SUBNET6, BenchAgent, wait_until
from bench.sandbox import add_taps, delete_links
from bench.stats import summary
from tests.support.topology import VM, Topology

BENCH_PORT = 5201            # iperf3's, and where the new-flows datagrams go
IDLE_WINDOW = 0.3            # seconds without agent CPU or children that count as idle
IDLE_TICKS = 1               # clock ticks an idle agent may spend in a window (timers)
BUSY_TICKS_PER_S = 2         # ... and per second of a sample, before it counts as busy

Sample = dict[str, float]
Prober = Callable[["Node"], AbstractContextManager[Callable[[], Sample]]]


def bench_group() -> list[dict[str, Any]]:
    """The rules that let iperf3 (TCP control, UDP data) and the new flows reach `dst`."""
    return [
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
         "port_range_min": BENCH_PORT, "port_range_max": BENCH_PORT,
         "remote_ip_prefix": SUBNET4},
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": BENCH_PORT, "port_range_max": BENCH_PORT,
         "remote_ip_prefix": SUBNET4},
        {"direction": "egress", "ethertype": "IPv4"},
        {"direction": "egress", "ethertype": "IPv6"},
    ]


def vm_port(vm: VM, groups: list[str]) -> dict[str, Any]:
    return {"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
            "fixed_ips": [vm.ipv4] + ([vm.ipv6] if vm.ipv6 else []),
            "security_groups": groups}


# ---------------------------------------------------------------- the quiet wait

def read_back_due(status: dict[str, Any]) -> float | None:
    """Wall-clock time by which the read-back after the last apply has started, if any."""
    at = status.get("last_apply_ok_at")
    return None if at is None else at + CHECK_DELAY


def stat_ticks(text: str) -> int:
    """CPU clock ticks of a process and its reaped children, from /proc/PID/stat."""
    fields = text.rpartition(")")[2].split()   # the name may hold spaces and parens
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime + stime + cutime + cstime


def has_children(pid: int) -> bool:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "children").read_text().strip():
                return True
        except OSError:   # the thread ended meanwhile
            continue
    return False


def ticks(pid: int) -> int:
    return stat_ticks(Path(f"/proc/{pid}/stat").read_text())


def wait_idle(agent: BenchAgent, timeout: float = 120.0) -> None:
    """Until the agent spent an `IDLE_WINDOW` without children and (nearly) without CPU."""
    assert agent.proc is not None
    pid = agent.proc.pid

    def idle() -> bool:
        before = ticks(pid)
        time.sleep(IDLE_WINDOW)
        return not has_children(pid) and ticks(pid) - before <= IDLE_TICKS

    wait_until(idle, timeout, "the agent to be idle", agent, interval=0.0)


def quiet(agent: BenchAgent, sample: Callable[[], Sample], attempts: int = 4) -> Sample:
    """`sample()` taken while the agent did not read or write the kernel (rule 4)."""
    assert agent.proc is not None
    pid = agent.proc.pid
    value: Sample = {}
    for _ in range(attempts):
        due = read_back_due(agent.fast_status())
        if due is not None:
            time.sleep(max(0.0, due + 0.1 - time.time()))
        wait_idle(agent)
        applies, cpu, start = agent.fast_status()["applies"], ticks(pid), time.monotonic()
        value = sample()
        spent = ticks(pid) - cpu
        budget = IDLE_TICKS + BUSY_TICKS_PER_S * (time.monotonic() - start)
        if agent.fast_status()["applies"] == applies and spent <= budget \
                and not has_children(pid):
            return value
    return {**value, "overlapped": 1.0}


# ---------------------------------------------------------------- the sweep

@contextmanager
def programmed_node(backend: str, workload: dict[str, Any]) -> Iterator[Node]:
    """The topology and the two VMs; the agent starts with `Node.start`."""
    with Topology(subnet4=SUBNET4, subnet6=SUBNET6) as topo, \
            tempfile.TemporaryDirectory(prefix="hfwbench-") as workdir:
        node = Node(topo, Path(workdir), backend, workload)
        try:
            yield node
        finally:
            node.stop()


# Fixed VM ports: the dispatch trees branch on the tap name, so random ids put
# the VMs' taps anywhere from 3 to 36 rules deep per tree at 1,000 ports and
# the ratio moved between runs by that alone. These two sit near the average
# depth of the workload's taps (23 and 21 rules at 1,000 ports).
SRC_PORT_ID = "7c3e5a10-4b2d-4f6e-9a1b-2c3d4e5f6a7b"
DST_PORT_ID = "8a41c2d9-6e7f-4a8b-b9c0-d1e2f3a4b5c6"


class Node:
    """The node namespace, `src` and `dst`, and the agent programming N ports."""

    def __init__(self, topo: Topology, workdir: Path, backend: str,
                 workload: dict[str, Any]) -> None:
        self.topo = topo
        self.workdir = workdir
        self.backend = backend
        self.src = topo.add_vm("src", port_id=SRC_PORT_ID)
        self.dst = topo.add_vm("dst", port_id=DST_PORT_ID)
        self.groups = dict(workload["security_groups"])
        self.groups["sg-bench"] = bench_group()
        member_of = [workloads.default_group(workload), "sg-bench"]
        self.vms = [vm_port(self.src, member_of), vm_port(self.dst, member_of)]
        self.ports: list[dict[str, Any]] = workload["ports"]
        self.members = workload["sg_member_ips"]
        self.present: set[str] = set()
        self.agent: BenchAgent | None = None

    def doc(self, count: int) -> dict[str, Any]:
        return {"security_groups": self.groups, "ports": list(self.ports[:count - 2]) + self.vms,
                "sg_member_ips": self.members}

    def start(self) -> BenchAgent:
        self.agent = BenchAgent(self.workdir, self.topo.node.ns, self.doc(2),
                                backend=self.backend, resync_interval=3600)
        self.agent.start()
        return self.agent

    def program(self, count: int) -> None:
        """Taps for `count` ports, the policy naming them, all of them active."""
        agent = self.agent
        assert agent is not None
        want = {p["device"] for p in self.ports[:count - 2]}
        add_taps(self.topo.node.ns, sorted(want - self.present), self.topo.node.bridge)
        delete_links(self.topo.node.ns, sorted(self.present - want))
        self.present = want
        agent.write_policy(self.doc(count))
        wait_until(lambda: agent.fast_status().get("devices") == count, 120,
                   f"{count} devices seen", agent)
        agent.resync(timeout=120)
        wait_until(lambda: agent.fast_status().get("ports_active") == count, 120,
                   f"{count} ports active", agent)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None


def sweep(backend: str, workload: dict[str, Any], counts: list[int], repeats: int,
          prober: Prober, rate_key: str) -> dict[str, Any]:
    """`prober`'s samples with no rules, then by ports programmed; the ratio of `rate_key`'s
    medians at the largest count over the smallest. The probe is made once, on the node
    without rules, and sampled throughout."""
    result: dict[str, Any] = {"backend": backend, "counts": counts}
    samples: dict[int, list[Sample]] = {c: [] for c in counts}
    with programmed_node(backend, workload) as node, prober(node) as probe:
        result["no_rules"] = summaries([probe() for _ in range(repeats)])
        agent = node.start()
        for _ in range(repeats):
            for count in counts:
                node.program(count)
                samples[count].append(quiet(agent, probe))
    result["programmed"] = {str(count): summaries(rows) for count, rows in samples.items()}
    result["overlapped"] = sum(1 for rows in samples.values() for s in rows if "overlapped" in s)
    result["ratio_max_over_min"] = ratio(result["programmed"], counts, rate_key)
    return result


def summaries(rows: list[Sample]) -> dict[str, Any]:
    """A summary per key the samples have in common."""
    keys = [k for k in rows[0] if k != "overlapped" and all(k in r for r in rows)] if rows else []
    return {key: summary([r[key] for r in rows]) for key in keys}


def ratio(programmed: dict[str, Any], counts: list[int], key: str) -> float | None:
    """Median of `key` at the largest count over the smallest; None without a base."""
    base = programmed[str(min(counts))][key]["median"]
    top = programmed[str(max(counts))][key]["median"]
    return round(top / base, 3) if base else None

