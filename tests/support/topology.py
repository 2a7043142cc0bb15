"""Network-namespace sandbox for hostfw's kernel tests and the demo.

One *node* namespace plays the hypervisor: a Linux bridge ``br0`` with
br_netfilter turned on, which is where the agent under test runs and programs
iptables/ipset. Every *VM* is a namespace of its own whose ``eth0`` is one end
of a veth pair; the other end (the "tap", named like Nova/Neutron name them,
e.g. ``tap6f1c2a4e-00``) is a port of the node bridge. Traffic between VMs is
therefore bridged inside the node namespace and crosses its FORWARD chain via
``physdev``, exactly like on a linuxbridge compute node, while the root
namespace's firewall is never touched.

Why namespaces rather than mocks: the point of the kernel tests is to prove
that the rules the agent writes really pass or drop packets. Why this shape:

* Names start with ``hfwt-<pid>-<random>`` so parallel test runs never
  collide, and leftovers of a killed run (whose pid is gone) can be found and
  removed safely (``make clean-netns`` / :func:`cleanup_leftovers`).
* Probes are short-lived ``ip netns exec`` processes running ``netprobe.py``
  (stdlib only), because Python 3.11 cannot ``setns`` a thread.
* Cleanup is the context manager's job, backed by ``atexit``; processes
  inside a namespace are killed first since they would keep it alive.

This module must not import pytest: the demo uses it too.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

NS_PREFIX = "hfwt-"
NETPROBE = str(Path(__file__).with_name("netprobe.py"))
IFNAMSIZ = 15  # longest Linux interface name
# netprobe.py is stdlib only: -I -S skips site-packages (.pth files of a big
# venv), halving the start-up cost of every probe.
_PY = (sys.executable, "-I", "-S")

_LIVE: set[Topology] = set()


# --------------------------------------------------------------------------
# process helpers

def run(argv: Sequence[str], *, check: bool = True,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command in the current namespace, capturing text output.

    Failures raise with stderr in the message, which is what one needs to
    read when a namespace command fails halfway through a fixture.
    """
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    proc = subprocess.run(list(argv), check=False, **kw)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(
            proc.returncode, proc.args, proc.stdout,
            f"{proc.stderr}\n(command: {' '.join(map(str, argv))})")
    return proc


def run_in(ns: str, argv: Sequence[str], *, check: bool = True,
           **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` (``ip netns exec``); see :func:`run`."""
    return run(["ip", "netns", "exec", ns, *argv], check=check, **kw)


def popen_in(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
    """Start ``argv`` in the background inside ``ns``.

    ``ip netns exec`` execs the command, so the Popen pid is the process
    itself and signals reach it directly.
    """
    kw.setdefault("text", True)
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)


def _sysctl(ns: str, *settings: str) -> None:
    run_in(ns, ["sysctl", "-q", "-w", *settings])


def _kill_ns_processes(ns: str) -> None:
    """Kill whatever still runs in ``ns``: a live process pins a namespace."""
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_ns(ns: str) -> None:
    _kill_ns_processes(ns)
    run(["ip", "netns", "delete", ns], check=False)


# --------------------------------------------------------------------------
# leftovers

def list_namespaces(prefix: str = NS_PREFIX) -> list[str]:
    """Names of existing namespaces starting with ``prefix``."""
    out = run(["ip", "netns", "list"], check=False).stdout
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return [n for n in names if n.startswith(prefix)]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_process(proc: subprocess.Popen) -> None:
    """Kill a helper process (idempotent), reap it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - kernel stuck
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _owner_alive(ns: str) -> bool:
    try:
        pid = int(ns[len(NS_PREFIX):].split("-", 1)[0])
    except ValueError:
        return False
    return pid_alive(pid)


def cleanup_leftovers(force: bool = False) -> list[str]:
    """Delete ``hfwt-`` namespaces whose creating process is gone.

    With ``force`` delete them all, including those of runs still going.
    Returns the names deleted.
    """
    doomed = [ns for ns in list_namespaces() if force or not _owner_alive(ns)]
    for ns in doomed:
        _delete_ns(ns)
    return doomed


def kernel_skip_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "kernel/netns tests need root (network namespaces, iptables)"
    for tool in ("ip", "sysctl"):
        if shutil.which(tool) is None:
            return f"kernel/netns tests need '{tool}' (run make deps)"
    return None


# --------------------------------------------------------------------------
# model

@dataclass(eq=False)
class Node:
    """The hypervisor namespace: bridge + br_netfilter; run the agent here."""

    ns: str
    bridge: str
    ipv4: str
    ipv6: str

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node namespace."""
        return run_in(self.ns, argv, **kw)


@dataclass(eq=False)
class VM:
    """A guest: its own namespace, ``eth0`` plugged into the node bridge."""

    name: str
    ns: str
    port_id: str
    tap: str
    mac: str
    ipv4: str
    ipv6: str | None
    prefix4: int
    prefix6: int
    topology: Topology = field(repr=False)
    plugged: bool = False
    _peer: str = field(default="", repr=False)

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the VM namespace."""
        return run_in(self.ns, argv, **kw)

    def plug(self) -> None:
        """Create the veth pair and attach it to the bridge (see Topology.plug)."""
        self.topology.plug(self)

    def unplug(self) -> None:
        """Delete the tap, as Nova does when a VM goes away."""
        self.topology.unplug(self)

    def ip_for(self, family: int) -> str:
        """This VM's address of the given family (4 or 6)."""
        if family == 6:
            if self.ipv6 is None:
                raise ValueError(f"{self.name} has no IPv6 address")
            return self.ipv6
        return self.ipv4


class Peer(NamedTuple):
    """One flow a :class:`Server` accepted: who sent what to which port."""

    proto: str
    port: int
    src: str
    sport: int


class Server:
    """Echo server on TCP/UDP ports (v4 and v6) inside a VM namespace.

    It records every peer in a log file, which is how tests check *which
    source address* reached the VM (anti-spoofing) and not only whether a
    probe got an answer. Use :func:`serve`, :func:`tcp_listen` or
    :func:`udp_listen` to start one; the topology stops it at cleanup.
    """

    def __init__(self, vm: VM, tcp: Iterable[int] = (), udp: Iterable[int] = (),
                 *, start_timeout: float = 5.0) -> None:
        self.vm = vm
        self.tcp = tuple(tcp)
        self.udp = tuple(udp)
        self.log = vm.topology.tmpdir / f"server-{vm.name}-{secrets.token_hex(3)}.log"
        self.log.touch()
        argv = [*_PY, NETPROBE, "serve", "--log", str(self.log)]
        argv += [a for p in self.tcp for a in ("--tcp", str(p))]
        argv += [a for p in self.udp for a in ("--udp", str(p))]
        self.proc = popen_in(vm.ns, argv, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        vm.topology._servers.append(self)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "READY":
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"server in {vm.ns} did not start: {err.strip()}")

    def peers(self) -> list[Peer]:
        """Every flow seen so far, oldest first.

        The server appends while this reads: a last line without its newline
        is still being written and is left for the next read.
        """
        text = self.log.read_text()
        out = []
        for line in text[:text.rfind("\n") + 1].splitlines():
            proto, port, src, sport = line.split()
            out.append(Peer(proto, int(port), src, int(sport)))
        return out

    def sources(self, proto: str | None = None, port: int | None = None) -> set[str]:
        """Distinct source addresses seen, optionally for one proto/port."""
        return {p.src for p in self.peers()
                if (proto is None or p.proto == proto)
                and (port is None or p.port == port)}

    def saw(self, src: str, proto: str | None = None, port: int | None = None,
            *, timeout: float = 0.0) -> bool:
        """Whether ``src`` reached this server, waiting up to ``timeout``."""
        want = str(ipaddress.ip_address(src))
        deadline = time.monotonic() + timeout
        while True:
            if want in self.sources(proto, port):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def clear(self) -> None:
        """Forget the flows recorded so far."""
        self.log.write_text("")

    def stop(self) -> None:
        """Kill the server process (idempotent)."""
        kill_process(self.proc)


# --------------------------------------------------------------------------
# topology

class Topology:
    """Owns a node namespace, its VMs and their servers; cleans all of it up.

    Use as a context manager (or the pytest fixture ``topology``)::

        with Topology() as topo:
            a = topo.add_vm("a", ipv4="10.0.0.11")
            b = topo.add_vm("b")
            assert tcp_connect(a, b.ipv4, 22) is False

    Exiting deletes every namespace it made, even after an exception; an
    ``atexit`` hook covers the topologies nobody closed.
    """

    def __init__(self, *, subnet4: str = "10.0.0.0/24",
                 subnet6: str = "fd00::/64", bridge: str = "br0") -> None:
        reason = kernel_skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.run_id = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.subnet4 = ipaddress.IPv4Network(subnet4)
        self.subnet6 = ipaddress.IPv6Network(subnet6)
        self.vms: dict[str, VM] = {}
        self.namespaces: list[str] = []
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}{self.run_id}-"))
        self._servers: list[Server] = []
        self._next_host = 2
        self._peer_seq = 0
        self._closed = False
        _LIVE.add(self)
        try:
            self.node = self._make_node(bridge)
        except BaseException:
            self.close()
            raise

    # -- context manager -------------------------------------------------
    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- namespaces ------------------------------------------------------
    def _new_ns(self, role: str) -> str:
        name = f"{NS_PREFIX}{self.run_id}-{role}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run_in(name, ["ip", "link", "set", "lo", "up"])
        # Make IPv6 usable at once: no DAD wait, no RAs from neighbours.
        _sysctl(name, "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.default.accept_ra=0")
        return name

    def _make_node(self, bridge: str) -> Node:
        ns = self._new_ns("node")
        # br_netfilter must be loaded for its sysctls to exist; they are
        # per-namespace, so the root namespace's values do not matter.
        run(["modprobe", "br_netfilter"], check=False)
        _sysctl(ns, "net.bridge.bridge-nf-call-iptables=1",
                "net.bridge.bridge-nf-call-ip6tables=1")
        ip4 = str(self.subnet4.network_address + 1)
        ip6 = str(self.subnet6.network_address + 1)
        # forward_delay 0: ports forward at once; mcast_snooping 0: IPv6
        # neighbour discovery multicast is flooded, never filtered.
        run_in(ns, ["ip", "link", "add", bridge, "type", "bridge",
                    "forward_delay", "0", "stp_state", "0",
                    "mcast_snooping", "0"])
        run_in(ns, ["ip", "addr", "add", f"{ip4}/{self.subnet4.prefixlen}",
                    "dev", bridge])
        run_in(ns, ["ip", "addr", "add", f"{ip6}/{self.subnet6.prefixlen}",
                    "dev", bridge, "nodad"])
        run_in(ns, ["ip", "link", "set", bridge, "up"])
        return Node(ns=ns, bridge=bridge, ipv4=ip4, ipv6=ip6)

    # -- VMs -------------------------------------------------------------
    def add_vm(self, name: str, *, port_id: str | None = None,
               tap: str | None = None, mac: str | None = None,
               ipv4: str | None = None, ipv6: str | None = "auto",
               plug: bool = True) -> VM:
        """Create a VM namespace, and plug it into the bridge unless told not.

        Defaults mimic Neutron: ``tap = "tap" + port_id[:11]``, a
        ``fa:16:3e`` MAC, the next free host address of each subnet.
        ``ipv4``/``ipv6`` may carry a prefix (``10.0.0.5/24``); ``ipv6=None``
        gives a v4-only VM. With ``plug=False`` call :meth:`plug` later, e.g.
        after the agent started, to exercise hot-plug handling.
        """
        if name in self.vms:
            raise ValueError(f"VM {name!r} exists")
        port_id = port_id or str(uuid.uuid4())
        tap = tap or f"tap{port_id[:11]}"
        if len(tap) > IFNAMSIZ:
            raise ValueError(f"tap name {tap!r} longer than {IFNAMSIZ}")
        mac = mac or "fa:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        host = self._next_host
        self._next_host += 1
        addr4, pfx4 = self._addr(ipv4, self.subnet4, host)
        if ipv6 == "auto":
            addr6: str | None
            addr6, pfx6 = self._addr(None, self.subnet6, host)
        elif ipv6 is None:
            addr6, pfx6 = None, self.subnet6.prefixlen
        else:
            addr6, pfx6 = self._addr(ipv6, self.subnet6, host)
        vm = VM(name=name, ns=self._new_ns(name), port_id=port_id, tap=tap,
                mac=mac, ipv4=addr4, ipv6=addr6, prefix4=pfx4, prefix6=pfx6,
                topology=self)
        self.vms[name] = vm
        if plug:
            self.plug(vm)
        return vm

    @staticmethod
    def _addr(given: str | None, net: ipaddress.IPv4Network | ipaddress.IPv6Network,
              host: int) -> tuple[str, int]:
        if given is None:
            return str(net.network_address + host), net.prefixlen
        iface = ipaddress.ip_interface(given if "/" in given
                                       else f"{given}/{net.prefixlen}")
        return str(iface.ip), iface.network.prefixlen

    def plug(self, vm: VM, *, bridge: str | None = None, ns: str | None = None) -> None:
        """Create the veth pair: ``vm.tap`` on the bridge, ``eth0`` in the VM.

        The peer is created in the node namespace under a temporary name and
        then moved, so ``eth0`` never clashes with anything on the node.
        ``bridge`` and ``ns`` plug into another bridge, or another namespace's
        (see :meth:`plug_hybrid` and :meth:`add_integration_bridge`).
        """
        if vm.plugged:
            return
        node = ns or self.node.ns
        self._peer_seq += 1
        peer = f"hfwtp{self._peer_seq}"
        run_in(node, ["ip", "link", "add", vm.tap, "type", "veth",
                      "peer", "name", peer])
        run_in(node, ["ip", "link", "set", peer, "netns", vm.ns])
        vm.run(["ip", "link", "set", peer, "name", "eth0"])
        _sysctl(vm.ns, "net.ipv6.conf.eth0.accept_dad=0",
                "net.ipv6.conf.eth0.accept_ra=0")
        vm.run(["ip", "link", "set", "eth0", "address", vm.mac])
        vm.run(["ip", "addr", "add", f"{vm.ipv4}/{vm.prefix4}", "dev", "eth0"])
        if vm.ipv6:
            vm.run(["ip", "addr", "add", f"{vm.ipv6}/{vm.prefix6}", "dev",
                    "eth0", "nodad"])
        vm.run(["ip", "link", "set", "eth0", "up"])
        vm.run(["ip", "route", "add", "default", "via", self.node.ipv4])
        if vm.ipv6:
            vm.run(["ip", "-6", "route", "add", "default", "via", self.node.ipv6])
        run_in(node, ["ip", "link", "set", vm.tap, "master", bridge or self.node.bridge])
        run_in(node, ["ip", "link", "set", vm.tap, "up"])
        vm.plugged = True

    # -- OVS hybrid plugging ---------------------------------------------
    def add_integration_bridge(self, bridge: str = "brint") -> str:
        """A namespace standing in for Open vSwitch's br-int; returns its name.

        A Linux bridge with br_netfilter off (per namespace), so, as with
        OVS, nothing on it is seen by iptables: only the node's per-port
        ``qbr`` bridges are. Plug hosts "elsewhere on the network" into it
        with ``plug(vm, bridge=bridge, ns=<this namespace>)``.
        """
        ns = self._new_ns("brint")
        run(["modprobe", "br_netfilter"], check=False)
        _sysctl(ns, "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0")
        run_in(ns, ["ip", "link", "add", bridge, "type", "bridge", "forward_delay", "0",
                    "stp_state", "0", "mcast_snooping", "0"])
        run_in(ns, ["ip", "link", "set", bridge, "up"])
        return ns

    def plug_hybrid(self, vm: VM, integration_ns: str, integration_bridge: str = "brint") -> str:
        """Plug ``vm`` as Nova does for Neutron's OVS hybrid plugging; returns its qbr.

        The VM's tap goes on a bridge of its own, ``qbr<id>``, in the node;
        a veth pair ``qvb<id>`` (on the qbr) / ``qvo<id>`` (on the
        integration bridge, in ``integration_ns``) leads to the rest of the
        network. ``<id>`` is the tap's name after ``tap``.
        """
        suffix = vm.tap.removeprefix("tap")
        qbr, qvb, qvo = f"qbr{suffix}", f"qvb{suffix}", f"qvo{suffix}"
        node = self.node.ns
        run_in(node, ["ip", "link", "add", qbr, "type", "bridge", "forward_delay", "0",
                      "stp_state", "0", "mcast_snooping", "0"])
        run_in(node, ["ip", "link", "set", qbr, "up"])
        run_in(node, ["ip", "link", "add", qvb, "type", "veth", "peer", "name", qvo])
        run_in(node, ["ip", "link", "set", qvo, "netns", integration_ns])
        run_in(node, ["ip", "link", "set", qvb, "master", qbr])
        run_in(node, ["ip", "link", "set", qvb, "up"])
        run_in(integration_ns, ["ip", "link", "set", qvo, "master", integration_bridge])
        run_in(integration_ns, ["ip", "link", "set", qvo, "up"])
        self.plug(vm, bridge=qbr)
        return qbr

    def unplug(self, vm: VM) -> None:
        """Delete the node-side device; the VM's ``eth0`` goes with it."""
        if not vm.plugged:
            return
        run_in(self.node.ns, ["ip", "link", "del", vm.tap], check=False)
        vm.plugged = False

    def add_tap(self, name: str, *, up: bool = True) -> str:
        """Create a real tun/tap device on the bridge (no VM behind it).

        For tests that only need a ``tap…`` device to exist (device
        discovery, rule generation); it has no carrier, so no traffic.
        """
        if len(name) > IFNAMSIZ:
            raise ValueError(f"device name {name!r} longer than {IFNAMSIZ}")
        node = self.node.ns
        run_in(node, ["ip", "tuntap", "add", "dev", name, "mode", "tap"])
        run_in(node, ["ip", "link", "set", name, "master", self.node.bridge])
        if up:
            run_in(node, ["ip", "link", "set", name, "up"])
        return name

    def remove_device(self, name: str) -> None:
        """Delete a node-side device (tap from :meth:`add_tap`, or a veth)."""
        run_in(self.node.ns, ["ip", "link", "del", name], check=False)

    def node_devices(self) -> list[str]:
        """Names of the devices in the node namespace."""
        out = run_in(self.node.ns, ["ip", "-o", "link", "show"]).stdout
        return [line.split(":", 2)[1].strip().split("@")[0]
                for line in out.splitlines()]

    # -- cleanup ---------------------------------------------------------
    def close(self) -> None:
        """Stop servers, delete every namespace made here (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        for server in self._servers:
            server.stop()
        for ns in reversed(self.namespaces):
            _delete_ns(ns)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@atexit.register
def _close_all() -> None:
    for topo in list(_LIVE):
        topo.close()


# --------------------------------------------------------------------------
# servers and probes

def serve(vm: VM, tcp: Iterable[int] = (), udp: Iterable[int] = ()) -> Server:
    """Start a recording echo :class:`Server` in ``vm`` on several ports."""
    return Server(vm, tcp, udp)


def tcp_listen(vm: VM, port: int) -> Server:
    """Start a TCP echo server on ``port`` (v4 and v6) in ``vm``."""
    return Server(vm, tcp=[port])


def udp_listen(vm: VM, port: int) -> Server:
    """Start a UDP echo server on ``port`` (v4 and v6) in ``vm``."""
    return Server(vm, udp=[port])


def _probe(src: VM, argv: list[str], timeout: float) -> bool:
    proc = run_in(src.ns, [*_PY, NETPROBE, *argv], check=False,
                  timeout=timeout + 10)
    return proc.returncode == 0


def tcp_connect(src_vm: VM, dst_ip: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP handshake from ``src_vm`` to ``dst_ip:port`` completes.

    A refused connection (RST, or REJECT --reject-with tcp-reset) is False.
    """
    return _probe(src_vm, ["tcp", dst_ip, str(port), "--timeout", str(timeout)],
                  timeout)


def udp_probe(src_vm: VM, dst_ip: str, port: int, timeout: float = 1.0) -> bool:
    """True when a datagram to ``dst_ip:port`` is echoed back in time.

    Needs a UDP :class:`Server` at the destination; proves both directions.
    """
    return _probe(src_vm, ["udp", dst_ip, str(port), "--timeout", str(timeout)],
                  timeout)


def ping(src_vm: VM, dst_ip: str, timeout: float = 1.0) -> bool:
    """One ICMP/ICMPv6 echo from ``src_vm``; True when answered."""
    proc = run_in(src_vm.ns, ["ping", "-n", "-q", "-c1", "-W", str(timeout), dst_ip],
                  check=False, timeout=timeout + 10)
    return proc.returncode == 0


def send_spoofed(src_vm: VM, spoofed_ip: str, dst_vm: VM, port: int, *,
                 timeout: float = 1.0, spoofed_mac: str | None = None) -> bool:
    """Whether a UDP datagram with a forged source reaches ``dst_vm``.

    The forged address is added to ``src_vm``'s eth0 as a /32 (/128, nodad)
    for the duration, so an ordinary socket can bind to it; with
    ``spoofed_mac`` eth0's MAC is swapped too. UDP rather than TCP because a
    reply to a forged source may never come back, yet arrival is what counts:
    a UDP server on ``port`` of ``dst_vm`` (started here if the VM has none)
    records the source it saw. Address and MAC are restored afterwards.
    """
    ip = ipaddress.ip_address(spoofed_ip)
    family = ip.version
    dst_ip = dst_vm.ip_for(family)
    topo = dst_vm.topology
    server = next((s for s in topo._servers
                   if s.vm is dst_vm and port in s.udp and s.proc.poll() is None),
                  None) or udp_listen(dst_vm, port)
    plen = 32 if family == 4 else 128
    own = {src_vm.ipv4, src_vm.ipv6}
    added = str(ip) not in own
    if added:
        cmd = ["ip", "addr", "add", f"{ip}/{plen}", "dev", "eth0"]
        src_vm.run(cmd + (["nodad"] if family == 6 else []))
    if spoofed_mac:
        src_vm.run(["ip", "link", "set", "eth0", "address", spoofed_mac])
    try:
        _probe(src_vm, ["udp", dst_ip, str(port), "--bind", str(ip),
                        "--no-reply", "--timeout", str(timeout)], timeout)
        return server.saw(str(ip), "udp", port, timeout=timeout)
    finally:
        if spoofed_mac:
            src_vm.run(["ip", "link", "set", "eth0", "address", src_vm.mac],
                       check=False)
        if added:
            src_vm.run(["ip", "addr", "del", f"{ip}/{plen}", "dev", "eth0"],
                       check=False)
