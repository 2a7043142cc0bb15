"""The end-to-end benchmark's sandbox: a node with N taps and four probe VMs, waiters, floors.

Rules of this room:

1. One node namespace holds the workload's N ports as plain tun/tap devices
   on its bridge (one `ip -batch`, bench/sandbox.py) and four real VMs
   (veth, tests/support/topology.py) whose ports are in the policy too:
   `srv` runs the echo server, `cli`, `plug` and `rm` send. Only these four
   carry packets; the N taps give the agent its real load.
2. "The first packet that shows it" is seen by a waiter in a VM namespace
   (bench/e2e_probe.py): a stream of numbered UDP datagrams every few
   milliseconds whose echoes are reported as they arrive. A change that
   allows is seen at the first echo after the action; one that blocks at the
   first datagram after the action that is lost together with every later
   one (a lone loss before it is noise, not the change). Both also check the
   state before the action (blocked before an allow, flowing before a block),
   so a sample can never time a change that had already happened.
3. Every clock is `time.time()` (the same in every namespace, and the
   agent's log's clock), so action, packets and log lines line up.
4. The floor is the kernel's own time to load our ruleset: `ipset restore`
   of `ipset save`, then `iptables-restore` and `ip6tables-restore` of the
   agent's own saved tables, into the same namespace after a flush, in the
   same run.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.sandbox import add_taps
from tests.support.topology import VM, Topology, kill_process, popen_in, run_in

PROBE = str(Path(__file__).with_name("e2e_probe.py"))
PY = (sys.executable, "-I", "-S")
SUBNET4 = "10.251.0.0/24"
SUBNET6 = "fd00:251::/64"
MEMBER_NET = "10.251.0.192/26"     # cli's extra addresses, one per member-add sample
MEMBER_FIRST = 200

# UDP ports of srv's echo server, one per purpose.
PORT_OK = 31001        # allowed from cli by the policy from the start
PORT_BLOCKED = 31002   # never allowed: the cold start's enforcement stream
PORT_MEMBER = 31003    # allowed from the members of the remote group
PORT_PLUG = 31004      # allowed from plug
PORT_RM = 31005        # allowed from rm
RULE_BASE = 32000      # the k-th rule-change sample allows RULE_BASE + k from cli
MAX_SAMPLES = 40


def member_address(k: int) -> str:
    """The address of cli's the k-th member-add sample adds to the remote group."""
    return f"10.251.0.{MEMBER_FIRST + k}"


# ---------------------------------------------------------------- the sandbox

@dataclass
class Node:
    """The topology, the probe VMs and srv's echo server."""

    topo: Topology
    vms: dict[str, VM]
    taps: list[str]
    echo: subprocess.Popen[str]

    @property
    def ns(self) -> str:
        return self.topo.node.ns

    def close(self) -> None:
        kill_process(self.echo)
        self.topo.close()


def build_node(taps: list[str], member_samples: int) -> Node:
    """N taps and the four probe VMs; everything is deleted on error (and by `close`)."""
    topo = Topology(subnet4=SUBNET4, subnet6=SUBNET6)
    try:
        add_taps(topo.node.ns, taps, topo.node.bridge)
        vms = {name: topo.add_vm(name, ipv6=None) for name in ("srv", "cli", "plug", "rm")}
        for k in range(min(member_samples, MAX_SAMPLES)):
            vms["cli"].run(["ip", "addr", "add", f"{member_address(k)}/32", "dev", "eth0"])
        ports = [PORT_OK, PORT_BLOCKED, PORT_MEMBER, PORT_PLUG, PORT_RM,
                 *range(RULE_BASE, RULE_BASE + MAX_SAMPLES)]
        echo = popen_in(vms["srv"].ns, [*PY, PROBE, "echo",
                                        *(a for p in ports for a in ("--udp", str(p)))],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_ready(echo, "echo server")
        return Node(topo, vms, taps, echo)
    except BaseException:
        topo.close()
        raise


def _wait_ready(proc: subprocess.Popen[str], what: str, timeout: float = 10.0) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "READY":
        kill_process(proc)
        raise RuntimeError(f"{what} did not start: {line!r}")


def static_neighbours(node: Node, members: int = MAX_SAMPLES) -> None:
    """Permanent ARP entries between the probe VMs (and for cli's member addresses).

    A VM whose ARP request went nowhere while its tap was off the bridge, or
    blocked, retries only after a second: a packet would then wait for ARP,
    not for the firewall.
    """
    vms = node.vms.values()
    for vm in vms:
        lines = [f"neigh replace {other.ipv4} lladdr {other.mac} dev eth0 nud permanent"
                 for other in vms if other is not vm]
        if vm.name == "srv":
            lines += [f"neigh replace {member_address(k)} lladdr {node.vms['cli'].mac} "
                      f"dev eth0 nud permanent" for k in range(members)]
        run_in(vm.ns, ["ip", "-batch", "-"], input="\n".join(lines) + "\n")


def unplug(node: Node, vm: VM) -> None:
    """Take the VM's tap off the node (into the VM's own namespace, kept for `plug`)."""
    run_in(node.ns, ["ip", "link", "set", vm.tap, "netns", vm.ns])


def plug(node: Node, vm: VM) -> None:
    """Nova's plug: the tap appears in the node, on the bridge, up (two commands)."""
    run_in(vm.ns, ["ip", "link", "set", vm.tap, "netns", node.ns])
    run_in(node.ns, ["ip", "link", "set", vm.tap, "master", node.topo.node.bridge, "up"])


# ---------------------------------------------------------------- waiters

@dataclass
class Stream:
    """A waiter sending from `vm` to dst:port; see e2e_probe.py `stream`."""

    vm: VM
    dst: str
    port: int
    bind: str | None = None
    interval: float = 0.002
    fresh: bool = False
    sport_base: int = 40000
    replies: list[tuple[int, float, float]] = field(default_factory=list)  # seq, sent, got
    sent: list[float] | None = None

    def __post_init__(self) -> None:
        argv = [*PY, PROBE, "stream", self.dst, str(self.port), "--interval",
                str(self.interval)]
        argv += ["--bind", self.bind] if self.bind else []
        argv += ["--fresh", "--sport-base", str(self.sport_base)] if self.fresh else []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.proc = popen_in(self.vm.ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        _wait_ready(self.proc, f"stream from {self.vm.name}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("R "):
                _, seq, sent, got = line.split()
                with self._lock:
                    self.replies.append((int(seq), float(sent), float(got)))
            elif line.startswith("S "):
                self.sent = json.loads(line[2:])
        self._done.set()

    def snapshot(self) -> list[tuple[int, float, float]]:
        with self._lock:
            return list(self.replies)

    def wait_through(self, after: float, timeout: float) -> float | None:
        """The arrival time of the first echo at or after `after`, or None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [r[2] for r in self.snapshot() if r[2] >= after]
            if got:
                return min(got)
            time.sleep(0.002)
        return None

    def wait_quiet(self, after: float, quiet: float, timeout: float) -> bool:
        """Until no echo has arrived for `quiet` seconds (counted from `after` at least)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replies = self.snapshot()
            last = max([after] + [r[2] for r in replies])
            if time.time() - last >= quiet:
                return True
            time.sleep(0.01)
        return False

    def finish(self, timeout: float = 10.0) -> list[float]:
        """Stop sending; every send time (the echoes are in `replies`)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self._done.wait(timeout)
        finally:
            kill_process(self.proc)
        return self.sent or []


def through_latency(replies: list[tuple[int, float, float]], action: float,
                    got: float | None) -> dict[str, Any]:
    """An allow's sample: action -> first echo, checking nothing passed before the action."""
    before = [r for r in replies if r[2] < action]
    if before:
        return {"error": f"{len(before)} packets got through before the action"}
    if got is None:
        return {"error": "no packet got through"}
    return {"latency_s": got - action}


def cut_latency(sent: list[float], replies: list[tuple[int, float, float]],
                action: float) -> dict[str, Any]:
    """A block's sample: action -> the first datagram lost along with every later one."""
    answered = {r[0] for r in replies}
    if not any(action - 0.2 <= sent[s] < action for s in answered if s < len(sent)):
        return {"error": "the stream was not flowing before the action"}
    after = [s for s, t in enumerate(sent) if t >= action]
    if not after or after[-1] in answered:
        return {"error": "packets still got through at the end"}
    first = after[-1]
    for seq in reversed(after):
        if seq in answered:
            break
        first = seq
    early_losses = sum(1 for s in after if s < first and s not in answered)
    return {"latency_s": sent[first] - action, "lost_before_cut": early_losses}


def interruption(sent: list[float], replies: list[tuple[int, float, float]],
                 start: float) -> dict[str, Any]:
    """A stream that should flow: how many datagrams after `start` were lost, and when it
    flowed again for good (the first echo after the last loss)."""
    answered = {r[0] for r in replies}
    lost = [s for s, t in enumerate(sent) if t >= start and s not in answered]
    if not lost:
        return {"lost": 0}
    back = next((s for s in range(lost[-1] + 1, len(sent)) if s in answered), None)
    return {"lost": len(lost), "first_lost_s": round(sent[lost[0]] - start, 4),
            "back_s": None if back is None else round(sent[back] - start, 4)}


# ---------------------------------------------------------------- logs

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[.,]\d{3})\S* (.*)$")
PULLED = re.compile(r"pulled (\d+) devices in ([\d.]+) s")
APPLIED = re.compile(r"applied generation (\d+): (.*?), \d+ chains, (\d+) lines, "
                     r"ipset \+(\d+)/-(\d+), ([\d.]+) s")
RELOAD = re.compile(r"reload \((.*?)\): (.*)")


class LogTail:
    """New lines of a log file since the last `mark`, with their wall-clock times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        try:
            self.offset = self.path.stat().st_size
        except OSError:
            self.offset = 0

    def lines(self) -> list[tuple[float, str]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            match = LOG_LINE.match(line)
            if match:
                stamp = datetime.strptime(match.group(1).replace(",", "."),
                                          "%Y-%m-%d %H:%M:%S.%f").timestamp()
                out.append((stamp, match.group(2)))
        return out


def breakdown(agent_lines: list[tuple[float, str]], controller_lines: list[tuple[float, str]],
              action: float, until: float) -> dict[str, Any]:
    """What the logs say happened between the action and `until` (seconds after the action)."""
    out: dict[str, Any] = {"pulls": [], "applies": [], "lines": []}
    for stamp, text in controller_lines:
        match = RELOAD.search(text)
        if match and action - 0.01 <= stamp <= until:
            out.setdefault("controller_reload_at_s", round(stamp - action, 4))
    for stamp, text in agent_lines:
        if not action - 0.01 <= stamp <= until:
            continue
        at = round(stamp - action, 4)
        if match := PULLED.search(text):
            out["pulls"].append({"at_s": at, "devices": int(match.group(1)),
                                 "seconds": float(match.group(2))})
        if match := APPLIED.search(text):
            out["applies"].append({"at_s": at, "generation": int(match.group(1)),
                                   "tables": match.group(2), "lines": int(match.group(3)),
                                   "ipset_added": int(match.group(4)),
                                   "ipset_removed": int(match.group(5)),
                                   "seconds": float(match.group(6))})
        if len(out["lines"]) < 12:
            out["lines"].append(f"+{at * 1000:.0f} ms {text[:200]}")
    return out


# ---------------------------------------------------------------- kernel: flush, save, floor

TOOLS = {"iptables-legacy": ("iptables-legacy", "ip6tables-legacy"),
         "iptables-nft": ("iptables-nft", "ip6tables-nft")}


def _empty_tables_script(saved: str) -> str:
    """A restore script that empties every table of `saved`: built-ins ACCEPT, no chains."""
    out: list[str] = []
    for line in saved.splitlines():
        if line.startswith("*"):
            out.append(line)
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy != "-":
                out.append(f":{name} ACCEPT [0:0]")
        elif line == "COMMIT":
            out.append(line)
    return "\n".join(out) + "\n" if out else ""


def flush_kernel(ns: str) -> None:
    """Empty every iptables table (legacy and nft, both families) and destroy every ipset.

    Only for the bench's private node namespace, where everything is ours.
    """
    for tools in TOOLS.values():
        for tool in tools:
            saved = run_in(ns, [f"{tool}-save"], check=False).stdout
            script = _empty_tables_script(saved)
            if script:
                run_in(ns, [f"{tool}-restore"], input=script)
    run_in(ns, ["ipset", "destroy"], check=False)


def flush_conntrack(ns: str) -> None:
    """Forget every flow of the node (private namespace), so no old flow passes as known."""
    run_in(ns, ["conntrack", "-F"], check=False)


@dataclass(frozen=True)
class Dump:
    """The agent's ruleset as the save tools print it."""

    ipsets: str
    v4: str
    v6: str

    def counts(self) -> dict[str, int]:
        return {"ipset_lines": self.ipsets.count("\n"), "v4_lines": self.v4.count("\n"),
                "v6_lines": self.v6.count("\n")}


def save(ns: str, mode: str) -> Dump:
    """`ipset save`, `iptables-save`, `ip6tables-save` of `mode` in `ns`."""
    v4, v6 = TOOLS[mode]
    return Dump(run_in(ns, ["ipset", "save"]).stdout, run_in(ns, [f"{v4}-save"]).stdout,
                run_in(ns, [f"{v6}-save"]).stdout)


def restore_floor(ns: str, dump: Dump, mode: str) -> dict[str, float]:
    """Flush, then time the tools loading `dump` with `mode`'s restore tools."""
    flush_kernel(ns)
    v4, v6 = TOOLS[mode]
    t0 = time.perf_counter()
    run_in(ns, ["ipset", "restore"], input=dump.ipsets)
    t1 = time.perf_counter()
    run_in(ns, [f"{v4}-restore"], input=dump.v4)
    t2 = time.perf_counter()
    run_in(ns, [f"{v6}-restore"], input=dump.v6)
    t3 = time.perf_counter()
    return {"total_s": t3 - t0, "ipset_s": t1 - t0, "v4_s": t2 - t1, "v6_s": t3 - t2}
