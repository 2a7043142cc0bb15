"""New flows per second across the firewall, by ports programmed.

Rules of this room:

1. The node, the two VMs, the agent programming N ports and the quiet wait
   are bench/programmed.py's, shared with the datapath series; this module is
   the probe.
2. The generator: one UDP datagram per fresh source port, from `src` to
   `dst`'s port 5201, which `sg-bench` admits. A thread that entered `src`'s
   namespace (bench/sandbox.py's NetnsWorker) writes each datagram's UDP
   header into a raw socket (IPPROTO_UDP: the kernel adds the IP header with
   the VM's own address, so the spoof check passes as for any VM packet).
   Each datagram is a 5-tuple conntrack has not seen: it creates an entry
   and walks every chain in NEW state, and nothing else happens on its way.
   Why this one: the generator must be cheaper per flow than the firewall,
   or it sets the rate. TCP connects add a handshake, the reply's walk and
   a socket set-up per flow; a UDP socket per flow costs four system calls
   and Python objects per flow; trafgen, hping3 or pktgen would be one more
   Debian dependency. The raw socket costs one system call per flow and
   sends about as many datagrams per second with no rules as iperf3 does.
3. Bounded conntrack: a burst is one pass over source ports 1024-65535
   (64,512 flows, fewer when the node namespace's nf_conntrack_max leaves
   less room), and the node namespace's table is flushed before each burst,
   off the clock. So every datagram of a burst creates an entry, the table
   never holds more than one burst, and no sysctl is touched.
4. Counted: datagrams that reached `dst`'s eth0 (its rx_packets, read
   before and after a burst, at most what was sent: a stray ARP or ND
   packet is not a flow) over the time the sender took. A socket bound
   in `dst` and never read makes `dst` drop them quietly rather than answer
   ICMP port unreachable across the firewall. A sample is as many bursts as
   fill `seconds` of sending; its rate is their flows over their time.
   The veth hands each datagram to the sending CPU's backlog, so that CPU
   also carries it across the bridge and the firewall before the next send:
   the pace the sender keeps is the cost of one new flow, end to end, and
   a drop anywhere shows as flows sent but not accepted.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bench.programmed import BENCH_PORT, Node, Sample, sweep
from bench.sandbox import NetnsWorker
from tests.support.topology import VM, popen_in, run, run_in

PAYLOAD = 64
FIRST_PORT = 1024
LAST_PORT = 65535
CONNTRACK_SPARE = 1024       # entries left free for anything else in the node namespace
SETTLE = 0.05                # seconds for the bridge's backlog to drain after a burst

RECEIVER = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('0.0.0.0', int(sys.argv[1])))\n"
            "print('ready', flush=True)\n"
            "time.sleep(1e6)\n")


def datagram(sport: int, dport: int, payload: int = PAYLOAD) -> bytes:
    """A UDP header and zero payload; checksum 0 (none, which IPv4 allows)."""
    return struct.pack("!HHHH", sport, dport, 8 + payload, 0) + bytes(payload)


def burst_ports(ct_max: int, ct_count: int) -> range:
    """The source ports of one burst: all of them, or as many as conntrack has room for."""
    room = ct_max - ct_count - CONNTRACK_SPARE
    if room <= 0:
        raise RuntimeError(f"no room in conntrack for new flows: {ct_count} of {ct_max} "
                           f"entries used")
    return range(FIRST_PORT, FIRST_PORT + min(LAST_PORT + 1 - FIRST_PORT, room))


def rates(bursts: Sequence[tuple[int, int, float]]) -> Sample:
    """(sent, received, seconds) per burst -> flows/s sent and accepted, share accepted."""
    sent = sum(b[0] for b in bursts)
    got = sum(b[1] for b in bursts)
    seconds = sum(b[2] for b in bursts)
    return {"sent_fps": sent / seconds, "accepted_fps": got / seconds,
            "accepted_percent": 100.0 * got / sent if sent else 0.0,
            "flows": float(sent)}


def send_all(dst_ip: str, packets: Sequence[bytes]) -> float:
    """Send every datagram from this thread's namespace; the seconds it took."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        sock.connect((dst_ip, 0))
        send = sock.send
        start = time.perf_counter()
        for packet in packets:
            send(packet)
        return time.perf_counter() - start
    finally:
        sock.close()


def rx_packets(ns: str) -> int:
    """Packets eth0 received in VM namespace `ns`."""
    out = run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", "eth0"]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def conntrack_room(node_ns: str) -> tuple[int, int]:
    """(nf_conntrack_max, entries now) in the node namespace."""
    ct_max = run_in(node_ns, ["sysctl", "-n", "net.netfilter.nf_conntrack_max"]).stdout
    count = run_in(node_ns, ["conntrack", "-C"]).stdout
    return int(ct_max), int(count)


@contextmanager
def receiver(dst: VM) -> Iterator[None]:
    """A UDP socket bound to the bench port in `dst`, never read."""
    proc = popen_in(dst.ns, [sys.executable, "-c", RECEIVER, str(BENCH_PORT)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"new-flows receiver did not start: {proc.stderr}")
        yield
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def new_flows(node: Node, seconds: float) -> Iterator[Callable[[], Sample]]:
    """A probe for `programmed.sweep`: bursts of fresh source ports for `seconds`."""
    node_ns, src, dst = node.topo.node.ns, node.src, node.dst

    made: dict[range, list[bytes]] = {}

    def sample() -> Sample:
        bursts: list[tuple[int, int, float]] = []
        while sum(b[2] for b in bursts) < seconds:
            run_in(node_ns, ["conntrack", "-F"])
            ports = burst_ports(*conntrack_room(node_ns))
            if ports not in made:
                made[ports] = [datagram(port, BENCH_PORT) for port in ports]
            packets = made[ports]
            before = rx_packets(dst.ns)
            took = worker.call(send_all, dst.ipv4, packets)
            time.sleep(SETTLE)
            got = rx_packets(dst.ns) - before
            bursts.append((len(packets), min(got, len(packets)), took))
        entries = conntrack_room(node_ns)[1]   # each accepted flow made one (none: no rules)
        run_in(node_ns, ["conntrack", "-F"])
        return {**rates(bursts), "conntrack_entries_last_burst": float(entries)}

    with receiver(dst), NetnsWorker(src.ns) as worker:
        yield sample


def bench_newflows(backend: str, workload: dict[str, Any], counts: list[int], repeats: int,
                   seconds: float) -> dict[str, Any]:
    """New flows/s accepted by ports programmed (and with no rules at all) for one backend."""
    result = sweep(backend, workload, counts, repeats, lambda node: new_flows(node, seconds),
                   "accepted_fps")
    return {"payload_bytes": PAYLOAD, "seconds_per_run": seconds, **result}
