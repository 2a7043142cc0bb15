"""Shared pieces of the reliability suite: scale, backends, streams, kernel checks.

Rules of this room:

1. Sizes come from `scaled(n)`: `make test` runs the bounded sizes, `make
   soak` sets HOSTFW_SOAK_SCALE (10 by default there) and every loop runs
   that many times longer.
2. The kernel is judged the way the engine judges it: `iptables-save` parsed
   by `agent.dataplane.plan.parse_save` with the engine's protocol
   normalisation, compared with what `compile_ruleset` makes of a policy the
   test wrote. A table that equals one compiled generation is "whole".
3. Everything runs in the sandbox's namespaces (tests/support/topology.py);
   nothing here reads or writes the root namespace's firewall.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.dataplane.plan import BUILTIN_CHAINS, KernelTable, jump_target, parse_save
from agent.dataplane.restore_backend import normalise_proto
from agent.model import parse_policy
from agent.sources.policy_file import derive_members
from tests.support.agent import AgentProcess
from tests.support.topology import VM, kill_process, popen_in, run_in

SCALE = max(1, int(os.environ.get("HOSTFW_SOAK_SCALE", "1") or 1))
UDPSTREAM = str(Path(__file__).with_name("udpstream.py"))
_PY = (sys.executable, "-I", "-S")
SETTINGS = Settings()
NAMES = SETTINGS.names
# The command-line tool that reads and writes the tables each backend programs.
TOOL = {"iptables-legacy": "iptables-legacy", "iptc": "iptables-legacy",
        "iptables-nft": "iptables-nft"}


def tool(backend: str, family: int = 4) -> str:
    """iptables-legacy, ip6tables-nft, ...: the CLI for `backend`'s tables of `family`."""
    name = TOOL[backend]
    return name.replace("iptables", "ip6tables") if family == 6 else name


def scaled(n: int) -> int:
    return n * SCALE


def backend_params(*names: str) -> list[Any]:
    """pytest params for backends; iptc is skipped when python-iptables cannot load."""
    params = []
    for name in names:
        marks = []
        if name == "iptc" and importlib.util.find_spec("agent.dataplane.iptc_backend") is None:
            marks.append(pytest.mark.skip(reason="agent/dataplane/iptc_backend.py not present"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


# ---------------------------------------------------------------- sandbox helpers

def add_taps(ns: str, names: list[str], bridge: str = "br0") -> None:
    """tun/tap devices on the node bridge, made in one `ip -batch`."""
    lines = []
    for name in names:
        lines += [f"tuntap add dev {name} mode tap", f"link set dev {name} master {bridge}",
                  f"link set dev {name} up"]
    if lines:
        run_in(ns, ["ip", "-batch", "-"], input="\n".join(lines) + "\n")


def vm_port(vm: VM, *groups: str) -> dict[str, Any]:
    return {"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
            "fixed_ips": [vm.ipv4] + ([vm.ipv6] if vm.ipv6 else []),
            "security_groups": list(groups)}


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")


def wait_tools_done(ns: str, timeout: float = 10.0) -> None:
    """Until no iptables/ipset process runs in `ns` (a killed agent's orphans finish)."""
    def idle() -> bool:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(("iptables", "ip6tables", "ipset", "xtables")):
                return False
        return True
    wait_for(idle, timeout, f"kernel tools in {ns} to finish")


# ---------------------------------------------------------------- streams

class EchoServer:
    """udpstream.py echo in a VM: which (port, source) pairs got through."""

    def __init__(self, vm: VM, ports: list[int]) -> None:
        self.log = vm.topology.tmpdir / f"stream-{vm.name}.log"
        self.log.touch()
        argv = [*_PY, UDPSTREAM, "echo", "--log", str(self.log)]
        argv += [a for p in ports for a in ("--port", str(p))]
        self.proc = popen_in(vm.ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.stop()
            raise RuntimeError(f"udpstream echo did not start in {vm.ns}")

    def arrivals(self, port: int | None = None, src: str | None = None) -> int:
        count = 0
        for line in self.log.read_text().splitlines():
            got_port, got_src, _ = (line.split() + ["", "", ""])[:3]
            if (port is None or int(got_port) == port) and (src is None or got_src == src):
                count += 1
        return count

    def stop(self) -> None:
        kill_process(self.proc)


class Stream:
    """udpstream.py send from a VM; `finish()` returns its JSON report."""

    def __init__(self, vm: VM, dst: str, port: int, rate: float = 200.0) -> None:
        self.proc = popen_in(vm.ns, [*_PY, UDPSTREAM, "send", dst, str(port), "--rate",
                                     str(rate)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)

    def finish(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        if not out.strip():
            raise RuntimeError(f"udpstream send failed: {err}")
        return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- policies

@dataclass
class TapPort:
    """A synthetic port on a tun/tap device (no VM behind it)."""

    index: int

    @property
    def device(self) -> str:
        return f"tapr{self.index:04d}"

    def raw(self, groups: list[str]) -> dict[str, Any]:
        i = self.index
        return {"id": f"port-{i:04d}", "device": self.device,
                "mac_address": f"fa:16:3e:10:{i >> 8:02x}:{i & 0xff:02x}",
                "fixed_ips": [f"10.77.{i >> 8}.{(i & 0xff) + 1}", f"fd00:77::{i + 1:x}"],
                "security_groups": groups}


def plug_tap_ports(ns: str, count: int) -> list[TapPort]:
    """`count` synthetic ports, their taps created on the node's bridge."""
    taps = [TapPort(i) for i in range(count)]
    add_taps(ns, [t.device for t in taps])
    return taps


GROUPS = ("sg-a", "sg-b", "sg-c", "sg-d")
TCP = (22, 80, 443, 3306, 5432, 6379, 8080, 9090)


def random_policy(rng: random.Random, taps: list[TapPort],
                  base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A random policy over `taps`: group rules, memberships and which ports are known.

    `base` (VM ports and groups that must stay as they are) is merged in.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for group in GROUPS:
        rules: list[dict[str, Any]] = [{"direction": "egress", "ethertype": "IPv4"},
                                       {"direction": "egress", "ethertype": "IPv6"}]
        for _ in range(rng.randint(1, 8)):
            port = rng.choice(TCP)
            kind = rng.random()
            if kind < 0.3:
                rules.append({"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                              "port_range_min": port, "port_range_max": port,
                              "remote_group_id": rng.choice(GROUPS)})
            elif kind < 0.7:
                rules.append({"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                              "port_range_min": port, "port_range_max": port + rng.randint(0, 9),
                              "remote_ip_prefix": f"203.0.113.{rng.randrange(0, 256, 16)}/28"})
            else:
                rules.append({"direction": "ingress", "ethertype": "IPv6", "protocol": "udp",
                              "port_range_min": port, "port_range_max": port,
                              "remote_ip_prefix": f"2001:db8:{rng.randrange(1, 0xfff):x}::/48"})
        groups[group] = rules
    ports = [t.raw(rng.sample(GROUPS, rng.randint(1, 2))) for t in taps if rng.random() < 0.9]
    doc: dict[str, Any] = {"security_groups": groups, "ports": ports}
    if base:
        doc["security_groups"] = {**groups, **base.get("security_groups", {})}
        doc["ports"] = ports + list(base.get("ports", []))
    return doc


# ---------------------------------------------------------------- kernel checks

def read_kernel(ns: str, backend: str) -> dict[int, dict[str, KernelTable]]:
    """Every table of both families, parsed as the engine parses them."""
    out = {}
    for family in (4, 6):
        text = run_in(ns, [tool(backend, family) + "-save"]).stdout
        out[family] = parse_save(text, normalise_proto)
    return out


def owned(table: KernelTable | None) -> dict[str, list[str]]:
    if table is None:
        return {}
    return {name: rules for name, rules in table.chains.items() if NAMES.owns_chain(name)}


def expected_tables(doc: dict[str, Any], devices: set[str],
                    zone: int = 4097) -> dict[tuple[int, str], dict[str, list[str]]]:
    """The owned chains a policy document compiles to, per (family, table).

    Every device sits on br0, which the agent gives the first conntrack zone.
    """
    policy = parse_policy(doc, strict=True)
    policy = replace(policy, members=derive_members(policy.ports, policy.members))
    devs = frozenset(devices)
    snap = Snapshot(policy, devs, SETTINGS, {d: "br0" for d in devs}, {"br0": zone})
    ruleset = compile_ruleset(snap).ruleset
    return {key: {name: [rule.text for rule in rules] for name, rules in table.chains.items()}
            for key, table in ruleset.tables.items()}


def kernel_owned(tables: dict[int, dict[str, KernelTable]]
                 ) -> dict[tuple[int, str], dict[str, list[str]]]:
    """The owned chains the kernel holds, per (family, table) that has any."""
    out = {}
    for family, by_name in tables.items():
        for name, table in by_name.items():
            chains = owned(table)
            if chains:
                out[(family, name)] = chains
    return out


def reference_problems(tables: dict[int, dict[str, KernelTable]]) -> list[str]:
    """Owned chains that are jumped to but missing, or exist but nothing reaches.

    Each table is committed in one transaction, so neither can happen in a
    table the agent wrote whole, whatever moment it was killed at.
    """
    problems = []
    for family, by_name in tables.items():
        for name, table in by_name.items():
            chains = table.chains
            mine = set(owned(table))
            if not mine:
                continue
            reached = set()
            for chain, rules in chains.items():
                for spec in rules:
                    target = jump_target(spec)
                    if target and NAMES.owns_chain(target):
                        reached.add(target)
                        if target not in chains:
                            problems.append(f"v{family} {name}: {chain} jumps to missing "
                                            f"{target}")
            hooks = {jump_target(s) for c in BUILTIN_CHAINS for s in chains.get(c, [])}
            for chain in sorted(mine - reached - hooks):
                problems.append(f"v{family} {name}: {chain} exists but nothing jumps to it")
    return problems


def ipset_members(ns: str) -> dict[str, set[str]]:
    """Owned ipsets and their members."""
    out: dict[str, set[str]] = {}
    for line in run_in(ns, ["ipset", "save"]).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and NAMES.owns_ipset(parts[1]):
            if parts[0] == "create":
                out.setdefault(parts[1], set())
            elif parts[0] == "add":
                out.setdefault(parts[1], set()).add(parts[2])
    return out


# ---------------------------------------------------------------- agent observability

METRICS_PORT_RE = re.compile(r"metrics, /healthz and /readyz on \S+ \(port (\d+)\)")


def metrics_conf() -> str:
    """Extra config turning the Prometheus endpoint on (loopback, any free port)."""
    if importlib.util.find_spec("agent.metrics") is None:
        return ""
    return "[metrics]\nlisten = 127.0.0.1:0\n"


def metric(agent: AgentProcess, name: str) -> float | None:
    """One sample of /metrics (loopback of the agent's own namespace), or None if off."""
    match = METRICS_PORT_RE.search(agent.log_path.read_text(errors="replace"))
    if not match:
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics",
                                timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


def drift_repairs_logged(agent: AgentProcess) -> int:
    """"repaired drift" lines in the agent's log (the engine logs every repair)."""
    return agent.log_path.read_text(errors="replace").count("repaired drift")
