"""Datapath cost: 64-byte UDP packets per second across the bridge, by ports programmed.

Rules of this room:

1. Two real VMs (veth, tests/support/topology.py) on the node bridge; iperf3
   runs in their namespaces (`-u -l 64 -b 0`: 64-byte payloads, as fast as the
   sender can go), client and server pinned to different CPUs. Nothing leaves
   the sandbox.
2. "N ports programmed" means the real agent enforcing N ports: the two VMs
   plus N-2 tun/tap devices of the 1,000-port workload, so the dispatch trees,
   the group chains and the ipsets the VMs' packets cross are those of an
   N-port node. Both VMs are in the workload's default group (every port is)
   plus a group that admits iperf3.
3. The received packet rate is what counts (what crossed the firewall and
   reached the server); a baseline without any rule is measured first.
   Counts are visited in turn within each repeat, so drift in the machine's
   load spreads over all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import workloads
from bench.agent_bench import SUBNET4, SUBNET6, BenchAgent, wait_until
from bench.sandbox import add_taps, delete_links
from bench.stats import summary
from tests.support.topology import VM, Topology, popen_in, run_in

IPERF_PORT = 5201
PAYLOAD = 64


def iperf_group() -> list[dict[str, Any]]:
    """The rules that let iperf3 (TCP control, UDP data) reach the server VM."""
    return [
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
         "port_range_min": IPERF_PORT, "port_range_max": IPERF_PORT,
         "remote_ip_prefix": SUBNET4},
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": IPERF_PORT, "port_range_max": IPERF_PORT,
         "remote_ip_prefix": SUBNET4},
        {"direction": "egress", "ethertype": "IPv4"},
        {"direction": "egress", "ethertype": "IPv6"},
    ]


def run_iperf(client: VM, server: VM, seconds: float) -> dict[str, float]:
    """One iperf3 UDP run; packets per second sent and received."""
    cpus = os.cpu_count() or 1
    pin_server = ["-A", "1"] if cpus > 1 else []
    pin_client = ["-A", "0"] if cpus > 1 else []
    last_error = ""
    for _ in range(5):
        srv = popen_in(server.ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT), *pin_server],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            proc = run_in(client.ns, ["iperf3", "-c", server.ipv4, "-p", str(IPERF_PORT), "-u",
                                      "-l", str(PAYLOAD), "-b", "0", "-t", str(seconds), "-J",
                                      *pin_client], check=False, timeout=seconds + 30)
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait()
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            last_error = proc.stderr.strip() or proc.stdout[:200]
            continue
        if "error" in data:
            last_error = data["error"]
            continue
        received = data["end"]["sum_received"]
        sent = data["end"]["sum_sent"]
        got = received["packets"] - received["lost_packets"]
        return {"sent_pps": sent["packets"] / sent["seconds"],
                "received_pps": got / received["seconds"],
                "lost_percent": received["lost_percent"]}
    raise RuntimeError(f"iperf3 did not run: {last_error}")


def quiet_iperf(agent: BenchAgent, src: VM, dst: VM, seconds: float) -> dict[str, float]:
    """An iperf3 run during which the agent did not re-read the kernel.

    After a write the agent re-reads the kernel 1 s later, then 2 s, 4 s, 8 s
    after each read (its drift checks); each read is an apply in `status`. At
    1,000 ports a read costs a CPU for a second or more, which would be
    charged to the datapath. So: wait for the first two checks, run in the
    4 s gap before the third, and run again if a check still overlapped.
    """
    start = agent.fast_status()["applies"]
    try:
        wait_until(lambda: agent.fast_status()["applies"] >= start + 2, 12,
                   "two drift checks after the write", agent, interval=0.05)
    except TimeoutError:  # no write, so no drift checks scheduled: already quiet
        pass
    for _ in range(4):
        before = agent.fast_status()["applies"]
        sample = run_iperf(src, dst, seconds)
        if agent.fast_status()["applies"] == before:
            return sample
        wait_until(lambda b=before: agent.fast_status()["applies"] > b, 30,
                   "the overlapping drift check to end", agent, interval=0.05)
    return sample


def vm_port(vm: VM, groups: list[str]) -> dict[str, Any]:
    return {"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
            "fixed_ips": [vm.ipv4] + ([vm.ipv6] if vm.ipv6 else []),
            "security_groups": groups}


def bench_datapath(backend: str, workload: dict[str, Any], counts: list[int], repeats: int,
                   seconds: float) -> dict[str, Any]:
    """pps by ports programmed (and with no rules at all) for one backend."""
    result: dict[str, Any] = {"backend": backend, "payload_bytes": PAYLOAD,
                              "seconds_per_run": seconds, "counts": counts}
    with Topology(subnet4=SUBNET4, subnet6=SUBNET6) as topo, \
            tempfile.TemporaryDirectory(prefix="hfwbench-") as workdir:
        src, dst = topo.add_vm("src"), topo.add_vm("dst")
        baseline = [run_iperf(src, dst, seconds) for _ in range(repeats)]
        result["no_rules"] = {key: summary([b[key] for b in baseline])
                              for key in ("received_pps", "sent_pps")}
        groups = dict(workload["security_groups"])
        groups["sg-iperf"] = iperf_group()
        member_of = [workloads.default_group(workload), "sg-iperf"]
        vms = [vm_port(src, member_of), vm_port(dst, member_of)]
        ports = workload["ports"]

        def doc(count: int) -> dict[str, Any]:
            return {"security_groups": groups, "ports": list(ports[:count - 2]) + vms,
                    "sg_member_ips": workload["sg_member_ips"]}

        agent = BenchAgent(Path(workdir), topo.node.ns, doc(2), backend=backend,
                           resync_interval=3600)
        agent.start()
        present: set[str] = set()
        samples: dict[int, list[dict[str, float]]] = {c: [] for c in counts}
        try:
            for _ in range(repeats):
                for count in counts:
                    want = {p["device"] for p in ports[:count - 2]}
                    add_taps(topo.node.ns, sorted(want - present), topo.node.bridge)
                    delete_links(topo.node.ns, sorted(present - want))
                    present = want
                    agent.write_policy(doc(count))
                    wait_until(lambda c=count: agent.fast_status().get("devices") == c, 120,
                               f"{count} devices seen", agent)
                    agent.resync(timeout=120)
                    wait_until(lambda c=count: agent.fast_status().get("ports_active") == c,
                               120, f"{count} ports active", agent)
                    samples[count].append(quiet_iperf(agent, src, dst, seconds))
        finally:
            agent.stop()
        result["programmed"] = {
            str(count): {key: summary([s[key] for s in rows])
                         for key in ("received_pps", "sent_pps", "lost_percent")}
            for count, rows in samples.items()}
    low, high = str(min(counts)), str(max(counts))
    base = result["programmed"][low]["received_pps"]["median"]
    top = result["programmed"][high]["received_pps"]["median"]
    result["ratio_max_over_min"] = round(top / base, 3) if base else None
    return result
