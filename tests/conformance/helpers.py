"""The conformance sandbox, policy builders and the probes Neutron's tests use.

Why one sandbox per backend: building namespaces and starting the agent costs
seconds, a policy change costs a fraction of one. Every test therefore brings
the *whole* policy it needs (`Sandbox.policy(...)` + `Sandbox.apply(...)`),
never relies on what an earlier test left, and probes with real packets.

The sandbox (addresses fixed so that prefixes in rules are easy to read)::

    node  br0 10.0.0.1 fd00::1 ; the agent manages it through [agent] netns
     |- tap a  10.0.0.10 fd00::10   the VM under test (group sg-a)
     |- tap b  10.0.0.20 fd00::20   a peer (sg-b, egress open)
     |- tap c  10.0.0.30 fd00::30   a peer (sg-c, egress open)
     |- tap d  10.0.0.40 (no IPv6)  an IPv4-only port (sg-d, egress open)
     `- uplr0  10.0.0.50 fd00::50   "r": a host behind the uplink, i.e. on
                                    another node (its device is not a tap, so
                                    this agent leaves it alone); it plays the
                                    DHCP server, the remote member and the
                                    stateless group's client.

Why ``r`` behind an uplink: a remote group member on another node changes only
an ipset here, which is the point of Neutron's ipset design, and an unfiltered
peer lets a test see one port's rules without the other end's.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess
from tests.support.topology import (
    VM,
    Server,
    Topology,
    kill_process,
    popen_in,
    run_in,
    serve,
)

RAWPROBE = str(Path(__file__).with_name("rawprobe.py"))
_PY = (sys.executable, "-I", "-S")

# Most scenarios run once per address family: Neutron's IPv6 class is skipped.
FAMILIES = [pytest.param(4, id="v4"), pytest.param(6, id="v6")]

FAIL = 0.4   # seconds a probe that must fail may take
PASS = 2.0   # seconds a probe that must pass may take (first ARP/ND included)

# Ports the echo servers listen on, chosen around the edges the tests probe.
TCP_PORTS = (22, 42, 43, 80, 81, 100, 101, 999, 1000, 2000, 2001, 5000, 7001, 7002)
UDP_PORTS = (53, 67, 68, 80, 546, 547, 999, 1000, 2000, 2001, 5000, 9999)
# Ports where nothing listens: a probe there is answered by RST / ICMP unreachable.
CLOSED_PORT = 7777

ADDRESSES = {
    "a": ("10.0.0.10", "fd00::10"),
    "b": ("10.0.0.20", "fd00::20"),
    "c": ("10.0.0.30", "fd00::30"),
    "d": ("10.0.0.40", None),
    "r": ("10.0.0.50", "fd00::50"),
}
LOCAL_VMS = ("a", "b", "c", "d")
# iptc drives libiptc, i.e. the legacy tables.
SAVE_TOOL = {"iptables-legacy": "iptables-legacy-save", "iptables-nft": "iptables-nft-save",
             "iptc": "iptables-legacy-save"}
UPLINK = "uplr0"


# ---------------------------------------------------------------- rules and ports

ICMP_PROTOCOLS = ("icmp", "icmpv6", "ipv6-icmp", 1, 58, "1", "58")


def ethertype(family: int) -> str:
    return f"IPv{family}"


def rule(direction: str, family: int, protocol: Any = None, lo: int | None = None,
         hi: int | None = None, **extra: Any) -> dict[str, Any]:
    """A Neutron-shaped rule dict; `lo`/`hi` are the port range (ICMP type/code)."""
    out: dict[str, Any] = {"direction": direction, "ethertype": ethertype(family)}
    if protocol is not None:
        out["protocol"] = protocol
    if lo is not None:
        out["port_range_min"] = lo
    if hi is not None:
        out["port_range_max"] = hi
    elif lo is not None and protocol not in ICMP_PROTOCOLS:
        out["port_range_max"] = lo  # one port; for ICMP a lone type means any code
    out.update(extra)
    return out


def ingress(family: int, protocol: Any = None, lo: int | None = None,
            hi: int | None = None, **extra: Any) -> dict[str, Any]:
    return rule("ingress", family, protocol, lo, hi, **extra)


def egress(family: int, protocol: Any = None, lo: int | None = None,
           hi: int | None = None, **extra: Any) -> dict[str, Any]:
    return rule("egress", family, protocol, lo, hi, **extra)


def icmp_name(family: int) -> str:
    return "icmp" if family == 4 else "ipv6-icmp"


def echo_type(family: int) -> int:
    return 8 if family == 4 else 128


EGRESS_ALL = [egress(4), egress(6)]


def port_of(vm: VM, *groups: str, **extra: Any) -> dict[str, Any]:
    """The Neutron port dict of a sandbox VM."""
    return {"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
            "fixed_ips": [vm.ipv4] + ([vm.ipv6] if vm.ipv6 else []),
            "security_groups": list(groups), "device_owner": "compute:nova",
            "network_id": "net-1", **extra}


def remote_port(vm: VM, *groups: str) -> dict[str, Any]:
    """A port of another node for `vm` (behind the uplink): its device is not here."""
    return {"id": "remote-port-" + vm.name, "device": "tapremote" + vm.name,
            "mac_address": vm.mac, "fixed_ips": [vm.ipv4] + ([vm.ipv6] if vm.ipv6 else []),
            "security_groups": list(groups), "device_owner": "compute:nova",
            "network_id": "net-1"}


def link_local(mac: str) -> str:
    """The EUI-64 link-local address the kernel gives an interface with `mac`."""
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    iid = int.from_bytes(bytes(octets[:3] + [0xFF, 0xFE] + octets[3:]), "big")
    return str(ipaddress.IPv6Address((0xFE80 << 112) | iid))


# ---------------------------------------------------------------- sandbox

@dataclass
class Sandbox:
    """One node, five hosts, one agent on one backend; see the module docstring."""

    backend: str
    topo: Topology
    agent: AgentProcess
    vms: dict[str, VM]
    servers: dict[str, Server] = field(default_factory=dict)

    def __getattr__(self, name: str) -> VM:
        vms = self.__dict__.get("vms", {})
        if name in vms:
            return vms[name]
        raise AttributeError(name)

    # -- policy ----------------------------------------------------------
    def policy(self, groups: dict[str, list[dict[str, Any]]] | None = None, *,
               ports: dict[str, dict[str, Any]] | None = None,
               extra_ports: list[dict[str, Any]] | None = None,
               omit: tuple[str, ...] = (), **top: Any) -> dict[str, Any]:
        """A whole policy: every local VM in its own group, `groups` overriding.

        Defaults: sg-a has no rules (the tests give it some), sg-b, sg-c and
        sg-d allow all egress and no ingress. `ports` adds or replaces keys of
        a VM's port (e.g. {"a": {"security_groups": [...]}}); `omit` leaves
        VMs' ports out (their taps become unknown devices); `top` adds
        top-level keys such as address_groups or sg_member_ips.
        """
        all_groups: dict[str, list[dict[str, Any]]] = {
            "sg-a": [], "sg-b": list(EGRESS_ALL), "sg-c": list(EGRESS_ALL),
            "sg-d": list(EGRESS_ALL)}
        all_groups.update(copy.deepcopy(groups or {}))
        port_list = []
        for name in LOCAL_VMS:
            if name in omit:
                continue
            port = port_of(self.vms[name], f"sg-{name}")
            port.update(copy.deepcopy((ports or {}).get(name, {})))
            port_list.append(port)
        return {"security_groups": all_groups, "ports": port_list + list(extra_ports or []),
                **top}

    def apply(self, policy: dict[str, Any]) -> dict[str, Any]:
        """Apply and wait for the kernel; returns the resync reply."""
        return self.agent.apply_policy(policy)

    def status(self) -> dict[str, Any]:
        """`status --json` over the socket: same document, no CLI start-up race."""
        reply = self.agent.request({"command": "status"})
        assert reply.get("ok"), reply
        return reply

    def save(self, family: int) -> str:
        """iptables-save (all tables) of the node with this backend's tools.

        Why not `AgentProcess.save`: for family 6 it runs `ip6iptables-*-save`
        ("ip6" + "iptables-..."), which does not exist.
        """
        tool = SAVE_TOOL[self.backend]
        if family == 6:
            tool = tool.replace("iptables", "ip6tables", 1)
        return "".join(line for line in self.node(tool).splitlines(keepends=True)
                       if not line.startswith("#"))

    def node(self, *argv: str, check: bool = True) -> str:
        return run_in(self.topo.node.ns, list(argv), check=check).stdout


@contextlib.contextmanager
def build_sandbox(backend: str, workdir: Path) -> Iterator[Sandbox]:
    """Namespaces, echo servers and a started agent; all removed on exit."""
    with Topology() as topo:
        vms = {}
        for name, (ip4, ip6) in ADDRESSES.items():
            vms[name] = topo.add_vm(name, ipv4=ip4, ipv6=ip6,
                                    **({"tap": UPLINK} if name == "r" else {}))
        sandbox = Sandbox(backend, topo, AgentProcess(workdir, topo.node.ns, {},
                                                      backend=backend), vms)
        for name, vm in vms.items():
            sandbox.servers[name] = serve(vm, tcp=TCP_PORTS, udp=UDP_PORTS)
        sandbox.agent.write_policy(sandbox.policy())
        try:
            sandbox.agent.start()
            yield sandbox
        finally:
            sandbox.agent.stop()


# ---------------------------------------------------------------- reports

def measure_change(sb: Sandbox, before: dict[str, Any], after: dict[str, Any],
                   attempts: int = 3) -> dict[str, Any]:
    """`last_apply` of exactly the apply that turned `before` into `after`.

    The agent notices the rewritten file itself and applies the change once.
    Why retry: a drift repair or the periodic resync is an apply too, and
    replaces `last_apply`; if one slipped in (seen as a generation jump of
    more than one), the measurement is redone.
    """
    for _ in range(attempts):
        sb.apply(before)
        generation = sb.status()["generation"]
        sb.agent.write_policy(after)
        sb.agent.wait_for(lambda: sb.status()["generation"] > generation,  # noqa: B023
                          what="the apply of the change")
        time.sleep(0.2)   # a second apply (there should be none) would show by now
        status = sb.status()
        if status["generation"] == generation + 1:
            return status["last_apply"]
    raise AssertionError(f"could not isolate one apply in {attempts} attempts: {status}")


# ---------------------------------------------------------------- probes

def passing(**probes: Callable[[], bool]) -> list[str]:
    """The names of the probes that succeeded, all run at the same time.

    Why: a probe that must fail costs its whole timeout; several of them in
    parallel (each is its own process in its own socket) cost one. Use as
    ``assert passing(udp=lambda: ..., ping=lambda: ...) == []``.
    """
    with ThreadPoolExecutor(max_workers=len(probes) or 1) as pool:
        futures = {name: pool.submit(probe) for name, probe in probes.items()}
        return [name for name, future in futures.items() if future.result()]


def _raw(vm: VM, *args: str, timeout: float = 5.0) -> str:
    proc = run_in(vm.ns, [*_PY, RAWPROBE, *args], check=False, timeout=timeout + 10)
    if proc.returncode != 0:
        raise AssertionError(f"rawprobe {args} in {vm.name} failed: {proc.stderr}")
    return proc.stdout.strip()


def connect(vm: VM, proto: str, dst: str, port: int, timeout: float = PASS) -> str:
    """`ok`, `refused` (RST / ICMP port unreachable) or `timeout`."""
    return _raw(vm, "connect", proto, dst, str(port), "--timeout", str(timeout),
                timeout=timeout)


def udp_send(vm: VM, dst: str, port: int, *, src: str | None = None, sport: int = 0,
             dev: str | None = None, broadcast: bool = False) -> None:
    """Fire three datagrams; whether they arrive is asked of the receiving server."""
    args = ["udp-send", dst, str(port), "--sport", str(sport)]
    if src:
        args += ["--src", src]
    if dev:
        args += ["--dev", dev]
    if broadcast:
        args.append("--broadcast")
    _raw(vm, *args)


def dhcp_discover(vm: VM, sport: int = 68, dport: int = 67) -> None:
    """A broadcast from 0.0.0.0 as a DHCP client without an address sends it."""
    _raw(vm, "dhcp-discover", "--dev", "eth0", "--sport", str(sport), "--dport", str(dport))


def icmp_send(vm: VM, dst: str, kind: int, code: int = 0) -> None:
    _raw(vm, "icmp-send", dst, str(kind), "--code", str(code))


def server_saw(server: Server, src: str, proto: str, port: int, *, sport: int | None = None,
               timeout: float = 0.0) -> bool:
    """Whether `src` (scope ids ignored) reached `server` on proto/port.

    Why not `Server.saw`: a link-local peer is logged as ``fe80::1%eth0``.
    """
    want = ipaddress.ip_address(src)
    deadline = time.monotonic() + timeout
    while True:
        for peer in server.peers():
            if peer.proto == proto and peer.port == port and \
                    (sport is None or peer.sport == sport) and \
                    ipaddress.ip_address(peer.src.split("%")[0]) == want:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def spoof_send(src_vm: VM, src_ip: str, dst_vm: VM, server: Server, port: int = 9999, *,
               mac: str | None = None, dst_ip: str | None = None, sport: int = 0,
               timeout: float = FAIL) -> bool:
    """Whether a datagram from (`src_ip`, `mac`) sent by `src_vm` reaches `dst_vm`.

    `sport` fixes the source port (0: any), e.g. to forge another flow's.

    Why not `send_spoofed`: the destination's neighbour entry is pinned
    first, so a blocked probe proves the firewall dropped *the datagram*;
    otherwise ARP/ND with the forged pair (itself dropped on IPv6) would
    fail first and hide a missing spoof rule for UDP. The address is added
    with the subnet's prefix so that the destination is on-link from it.
    """
    family = ipaddress.ip_address(src_ip).version
    dst_ip = dst_ip or dst_vm.ip_for(family)
    own = ipaddress.ip_address(src_ip) in {ipaddress.ip_address(a) for a in
                                           (src_vm.ipv4, src_vm.ipv6, link_local(src_vm.mac))
                                           if a}
    plen = src_vm.prefix4 if family == 4 else 64
    server.clear()  # an earlier probe from the same address must not count
    if not own:
        src_vm.run(["ip", "addr", "add", f"{src_ip}/{plen}", "dev", "eth0"] +
                   (["nodad"] if family == 6 else []))
    if mac:
        src_vm.run(["ip", "link", "set", "eth0", "address", mac])
    try:
        # After a MAC change the kernel flushes the neighbour table: pin it now.
        src_vm.run(["ip", "neigh", "replace", dst_ip, "lladdr", dst_vm.mac, "dev", "eth0",
                    "nud", "permanent"])
        udp_send(src_vm, dst_ip, port, src=src_ip, sport=sport, dev="eth0")
        return server_saw(server, src_ip, "udp", port, sport=sport or None, timeout=timeout)
    finally:
        src_vm.run(["ip", "neigh", "del", dst_ip, "dev", "eth0"], check=False)
        if mac:
            src_vm.run(["ip", "link", "set", "eth0", "address", src_vm.mac], check=False)
        if not own:
            src_vm.run(["ip", "addr", "del", f"{src_ip}/{plen}", "dev", "eth0"], check=False)


class IcmpSniffer:
    """Records every ICMP/ICMPv6 message arriving in a VM (raw sockets).

    Why: `ping` only shows echo; a type-specific rule must also be shown to
    stop the other types, and for that the receiver has to be asked.
    """

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.log = vm.topology.tmpdir / f"icmp-{vm.name}-{time.monotonic_ns()}.log"
        self.log.touch()
        self.proc = popen_in(vm.ns, [*_PY, RAWPROBE, "icmp-sniff", "--log", str(self.log)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "READY":
            self.close()
            raise RuntimeError(f"icmp sniffer in {vm.name} did not start")

    def seen(self, src: str, kind: int, timeout: float = 0.0) -> bool:
        want = ipaddress.ip_address(src)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log.read_text().splitlines():
                addr, seen_kind, _ = line.split()
                if int(seen_kind) == kind and ipaddress.ip_address(addr) == want:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def clear(self) -> None:
        self.log.write_text("")

    def close(self) -> None:
        kill_process(self.proc)

    def __enter__(self) -> IcmpSniffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpSession:
    """One TCP connection held open from `vm`, exchanging tokens on demand."""

    def __init__(self, vm: VM, dst: str, port: int) -> None:
        self.proc = popen_in(vm.ns, [*_PY, RAWPROBE, "session", dst, str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline().strip()
        words = self.first.split()
        self.sport = int(words[1]) if len(words) == 2 and words[0] == "CONNECTED" else 0

    @property
    def connected(self) -> bool:
        return self.first.startswith("CONNECTED")

    def exchange(self, timeout: float) -> str:
        """Send a token and wait `timeout` for its echo: OK, TIMEOUT or CLOSED."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{timeout}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() or "CLOSED"

    def close(self) -> None:
        kill_process(self.proc)

    def __enter__(self) -> TcpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- kernel views

class ConntrackDeletions:
    """Records the node's tcp conntrack entries that userspace deleted.

    Why: a connection that survives a rule change may have survived because
    its entry was never deleted; the node's conntrack event stream
    (`conntrack -E -e DESTROY`, `[USERSPACE]` = deleted by `conntrack -D`)
    tells a cut that happened from one that did not. Start it *before* the
    flow: with the default nf_conntrack_events=2 the kernel attaches event
    reporting only to entries created while a listener exists, so the
    sandbox node is switched to 1 (always) as well.
    """

    def __init__(self, sb: Sandbox, family: int) -> None:
        sb.node("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_events=1")
        self.log = sb.topo.tmpdir / f"ct-events-{time.monotonic_ns()}.log"
        self.handle = open(self.log, "w")  # noqa: SIM115 - closed in close()
        self.proc = popen_in(sb.topo.node.ns, ["conntrack", "-E", "-e", "DESTROY", "-f",
                                                f"ipv{family}", "-p", "tcp"],
                             stdout=self.handle, stderr=subprocess.STDOUT)
        time.sleep(0.3)  # the event socket must be bound before the deletion

    def lines(self, sport: int) -> list[str]:
        """Deletions of flows from `sport`; stops the listener (it flushes on exit)."""
        self.close()
        return [line for line in self.log.read_text().splitlines()
                if "[USERSPACE]" in line and f"sport={sport} " in line]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.handle.close()

    def __enter__(self) -> ConntrackDeletions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ZONE_RE = re.compile(r"\bzone=(\d+)")


def conntrack_entries(sb: Sandbox, family: int, proto: str, dst: str, dport: int) -> list[str]:
    """The node's conntrack entries of flows to `dst`:`dport` (original direction)."""
    out = sb.node("conntrack", "-L", "-f", f"ipv{family}", "-p", proto, "-d", dst,
                  "--dport", str(dport), check=False)
    return [line for line in out.splitlines() if f"dport={dport}" in line]


def enable_conntrack_accounting(sb: Sandbox) -> None:
    """Per-entry packet counters in the node (`nf_conntrack_acct`, per namespace).

    Why: counters of a live entry only grow, so an entry whose count went
    *down* was deleted and created again; that tells a cut that happened
    from one that did not when the connection survives either way. Only
    entries created after this call carry counters.
    """
    sb.node("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1")


def conntrack_packets(sb: Sandbox, family: int, sport: int) -> int:
    """Original-direction packet count of the tcp entry from `sport` (-1: none)."""
    out = sb.node("conntrack", "-L", "-f", f"ipv{family}", "-p", "tcp", "--sport", str(sport),
                  check=False)
    counts = [int(m.group(1)) for line in out.splitlines()
              if (m := re.search(r"\bpackets=(\d+)", line))]
    return counts[0] if counts else -1


def zones_of(entries: list[str]) -> set[int]:
    """The zone of each conntrack entry line (0 when it has none)."""
    zones = set()
    for line in entries:
        match = ZONE_RE.search(line)
        zones.add(int(match.group(1)) if match else 0)
    return zones


def chain_rules(save_text: str, chain: str) -> list[str]:
    """The `-A chain ...` lines of one chain, in kernel order."""
    head = f"-A {chain} "
    return [line[len(head):] for line in save_text.splitlines() if line.startswith(head)]


def ipset_members(sb: Sandbox, name: str) -> set[str]:
    """Members of one ipset in the node namespace, as networks."""
    out = sb.node("ipset", "list", name)
    members = out.split("Members:", 1)[1].split() if "Members:" in out else []
    return {str(ipaddress.ip_network(m, strict=False)) for m in members}
