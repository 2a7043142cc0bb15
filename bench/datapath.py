"""Datapath cost: 64-byte UDP packets per second across the bridge, by ports programmed.

Rules of this room:

1. The node, the two VMs, the agent programming N ports and the quiet wait
   are bench/programmed.py's; this module is the iperf3 probe. iperf3 runs
   in the VMs' namespaces (`-u -l 64 -b 0`: 64-byte payloads, as fast as the
   sender can go), client and server pinned to different CPUs.
2. The received packet rate is what counts (what crossed the firewall and
   reached the server); a baseline without any rule is measured first.
   One-way UDP never sees a reply, so conntrack calls every packet NEW and
   each walks the chains; only the first creates a conntrack entry
   (bench/newflows.py measures that).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.programmed import BENCH_PORT, Sample, sweep
from tests.support.topology import VM, popen_in, run_in

IPERF_PORT = BENCH_PORT
PAYLOAD = 64


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


@contextmanager
def iperf(src: VM, dst: VM, seconds: float) -> Iterator[Callable[[], Sample]]:
    """A probe for `programmed.sweep`: one iperf3 run from src to dst per sample."""
    yield lambda: run_iperf(src, dst, seconds)


def bench_datapath(backend: str, workload: dict[str, Any], counts: list[int], repeats: int,
                   seconds: float) -> dict[str, Any]:
    """pps by ports programmed (and with no rules at all) for one backend."""
    result = sweep(backend, workload, counts, repeats,
                   lambda node: iperf(node.src, node.dst, seconds), "received_pps")
    return {"payload_bytes": PAYLOAD, "seconds_per_run": seconds, **result}
