"""Benchmark (not a test): the iptc backend against iptables-legacy-restore.

Rules of this room: everything happens inside private network namespaces
(`hfwt-<pid>-bench-<n>`) that this script creates and always deletes; the root
namespace's firewall is never read or written, and no packet is sent. The
kernel work runs on a thread that entered the namespace, as the agent's
writer thread does.

Two measurements per backend, on the same compiled ruleset (both families,
filter and raw tables, remote groups as ipsets):

- cold: an empty namespace, a new Engine, one apply of the whole ruleset;
- one chain: in the loaded namespace, alternate two policies that differ in
  one IPv4 group rule, so every apply rewrites exactly one chain of filter/v4;
- rewrite all: `apply(force=True)` in the loaded namespace, every owned chain
  written again (the engine's way out after repeated failures).

For each, `apply_s` is Engine.apply (planning, ipsets, commits) and `commit_s`
the backend's commits alone. Prints one JSON object of medians (seconds).

    sudo .venv/bin/python -m bench.iptc_vs_restore [--ports 350] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import netns
from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.dataplane.backend import Backend
from agent.dataplane.engine import Engine
from agent.dataplane.iptc_backend import IptcBackend
from agent.dataplane.plan import TablePlan
from agent.dataplane.restore_backend import RestoreBackend
from agent.model import parse_policy
from agent.vocab.ruleset import Ruleset

BACKENDS: dict[str, Callable[[], Backend]] = {
    "iptc": IptcBackend,
    "iptables-legacy-restore": lambda: RestoreBackend("iptables-legacy"),
}


def rule(direction: str, ethertype: str, protocol: str | None = None, low: int | None = None,
         high: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"direction": direction, "ethertype": ethertype, "protocol": protocol,
            "port_range_min": low, "port_range_max": high, **extra}


def policy(ports: int, variant: int) -> dict[str, Any]:
    """A web/db/ops mix; `variant` only changes one IPv4 rule of group `web`."""
    groups = {
        "web": [rule("ingress", "IPv4", "tcp", 80, 80), rule("ingress", "IPv4", "tcp", 443, 443),
                rule("ingress", "IPv4", "tcp", 8000 + variant, 8080),
                rule("ingress", "IPv4", "icmp", 8, 0),
                rule("ingress", "IPv6", "tcp", 443, 443), rule("ingress", "IPv6", "icmp", 128),
                rule("egress", "IPv4"), rule("egress", "IPv6")],
        "db": [rule("ingress", "IPv4", "tcp", 5432, 5432, remote_group_id="web"),
               rule("ingress", "IPv6", "tcp", 5432, 5432, remote_group_id="web"),
               rule("egress", "IPv4", "udp", 1, 1024, remote_ip_prefix="10.0.0.0/8")],
        "ops": [rule("ingress", "IPv4", "tcp", 22, 22, remote_address_group_id="admins"),
                rule("ingress", "IPv4", "udp", 161, 162, source_port_range_min=1024,
                     source_port_range_max=65535)],
    }
    port_list = []
    for i in range(ports):
        hi, lo = divmod(i, 256)
        port_list.append({
            "id": f"port-{i:05d}", "device": f"tap{i:05d}-00",
            "mac_address": f"fa:16:3e:00:{hi:02x}:{lo:02x}",
            "fixed_ips": [f"10.1.{hi}.{lo}", f"fd00:1::{i:x}"],
            "allowed_address_pairs": ([{"ip_address": f"10.9.{hi}.{lo}/32"}] if i % 4 == 0
                                      else []),
            "security_groups": ["web", "ops"] if i % 2 else ["db", "ops"],
        })
    members = {"web": {"IPv4": [f"10.1.{i // 256}.{i % 256}" for i in range(1, ports, 2)],
                       "IPv6": [f"fd00:1::{i:x}" for i in range(1, ports, 2)]}}
    return {"security_groups": groups, "ports": port_list, "sg_member_ips": members,
            "address_groups": {"admins": ["192.0.2.0/24", "198.51.100.7/32"]}}


def compiled(ports: int, variant: int) -> Ruleset:
    parsed = parse_policy(policy(ports, variant))
    return compile_ruleset(Snapshot(parsed, frozenset(p.device for p in parsed.ports),
                                    Settings())).ruleset


class TimedBackend:
    """A backend wrapper adding up the time spent in commit()."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.mode = inner.mode
        self.seconds = 0.0

    def save(self, family: int) -> str:
        return self.inner.save(family)

    def commit(self, plan: TablePlan) -> None:
        start = time.perf_counter()
        self.inner.commit(plan)
        self.seconds += time.perf_counter() - start


def in_namespace(ns: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on a fresh thread that entered `ns`, like the agent's writer."""
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            netns.enter(ns)
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=main, name=f"bench-{ns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_backend(name: str, ns: str, rulesets: tuple[Ruleset, Ruleset],
                repeat: int) -> dict[str, Any]:
    names = Settings().names

    def cold() -> tuple[Engine, TimedBackend, float]:
        backend = TimedBackend(BACKENDS[name]())
        engine = Engine(backend, names, (4, 6))
        start = time.perf_counter()
        engine.apply(rulesets[0])
        return engine, backend, time.perf_counter() - start

    def one_chain(engine: Engine, backend: TimedBackend) -> list[tuple[float, float]]:
        out = []
        for i in range(repeat):
            backend.seconds = 0.0
            start = time.perf_counter()
            report = engine.apply(rulesets[(i + 1) % 2])
            elapsed = time.perf_counter() - start
            if report.tables_written != ["filter/v4"] or report.chains_written != 1:
                raise RuntimeError(f"expected one chain of filter/v4, got {report}")
            out.append((elapsed, backend.seconds))
        again = engine.apply(rulesets[repeat % 2], refresh=True)
        if again.tables_written:
            raise RuntimeError(f"{name}: the kernel does not match after the changes: {again}")
        return out

    def rewrite_all(engine: Engine, backend: TimedBackend) -> list[tuple[float, float]]:
        out = []
        for _ in range(repeat):
            backend.seconds = 0.0
            start = time.perf_counter()
            engine.apply(rulesets[repeat % 2], force=True)
            out.append((time.perf_counter() - start, backend.seconds))
        return out

    runs: dict[str, list[tuple[float, float]]] = {"cold": []}
    for n in range(repeat):
        fresh = f"{ns}-{name[:4]}{n}"
        subprocess.run(["ip", "netns", "add", fresh], check=True)
        try:
            engine, backend, apply_s = in_namespace(fresh, cold)
            runs["cold"].append((apply_s, backend.seconds))
            if n == 0:
                runs["one_chain"] = in_namespace(fresh, one_chain, engine, backend)
                runs["rewrite_all"] = in_namespace(fresh, rewrite_all, engine, backend)
        finally:
            subprocess.run(["ip", "netns", "delete", fresh], check=False)
    return {what: {"apply_s": round(statistics.median(r[0] for r in times), 4),
                   "commit_s": round(statistics.median(r[1] for r in times), 4)}
            for what, times in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ports", type=int, default=350, help="ports on the node (~58 rules each)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("iptc_vs_restore: needs root (network namespaces)", file=sys.stderr)
        return 2
    # A forced rewrite of an unchanged ruleset is logged as drift repair; not news here.
    logging.getLogger("agent.dataplane.engine").setLevel(logging.ERROR)
    rulesets = (compiled(args.ports, 0), compiled(args.ports, 1))
    specs = {s for t in rulesets[0].tables.values() for c in t.chains.values() for s in c}
    result: dict[str, Any] = {"ports": args.ports, "rules": rulesets[0].rule_count(),
                              "distinct_specs": len(specs), "repeat": args.repeat}
    prefix = f"hfwt-{os.getpid()}-bench"
    for name in BACKENDS:
        result[name] = run_backend(name, prefix, rulesets, args.repeat)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
