"""The engine in process: cold applies against the floor, and the incremental steps.

Rules of this room:

1. What is timed is what the daemon's writer does for the same event:
   compile the whole snapshot (`compile_ruleset`), then `Engine.apply`
   (no re-read for events, a re-read for a resync), from a thread that
   entered a private namespace. A cold start also counts parsing the policy,
   with the compiler's render caches emptied first, as in a fresh process.
2. The floor is the same compiled ruleset written by the tools alone: the
   per-table `iptables-restore --noflush --wait 5` scripts the engine itself
   would send to an empty kernel, and one `ipset restore` of every set, in a
   fresh namespace. Floor and engine samples alternate, so a busy minute on
   this shared machine hits both.
3. Time inside the backend (save, commit) and ipset (save, restore) is also
   clocked, so each step splits into "kernel tools" and "Python".
4. Steps mirror the peer's harness (neutron_fw_bench.py): (b) add one port
   whose addresses join its groups, (c) one rule added to the group every
   port uses, (d) one IPv4 member added to the most referenced remote group,
   (e) remove a port added in (b); plus a no-op resync (re-read, nothing to
   write) and a no-op event (nothing re-read, nothing to write).
"""

from __future__ import annotations

import cProfile
import importlib
import logging
import pstats
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.compiler.flows import flows_to_cut
from agent.dataplane.backend import Backend
from agent.dataplane.command import run
from agent.dataplane.engine import ApplyReport, Engine
from agent.dataplane.flowcut import cut
from agent.dataplane.ipsets import plan_ipsets
from agent.dataplane.plan import TablePlan, plan_table
from agent.dataplane.restore_backend import BINARIES, RestoreBackend
from agent.model import Policy, Port, parse_member_map, parse_port, parse_rule
from agent.sources.policy_file import derive_members
from agent.vocab.ruleset import TABLE_ORDER, Ruleset
from bench import workloads
from bench.sandbox import NetnsWorker, private_netns
from bench.stats import summary

LOG = logging.getLogger("bench.engine")
SETTINGS = Settings()
BRIDGE = "br0"
ZONE = 4097
STEPS = ("add_port", "rule_change", "rule_replace", "member_add", "port_remove", "noop_resync",
         "noop_event")


# ---------------------------------------------------------------- backends

@dataclass(frozen=True)
class BackendSpec:
    """A backend the bench can build, and which restore tool is its floor."""

    name: str
    factory: Callable[[], Backend]
    floor_mode: str  # a key of restore_backend.BINARIES


def available_backends(wanted: Iterable[str] | None = None) -> tuple[dict[str, BackendSpec],
                                                                     dict[str, str]]:
    """The backends to run, and why any wanted one cannot run."""
    specs = {
        "iptables-legacy": BackendSpec("iptables-legacy",
                                       lambda: RestoreBackend("iptables-legacy"),
                                       "iptables-legacy"),
        "iptables-nft": BackendSpec("iptables-nft", lambda: RestoreBackend("iptables-nft"),
                                    "iptables-nft"),
    }
    missing: dict[str, str] = {}
    try:
        iptc_module = importlib.import_module("agent.dataplane.iptc_backend")
        # libiptc writes legacy tables, so the legacy restore tool is its floor.
        specs["iptc"] = BackendSpec("iptc", iptc_module.IptcBackend, "iptables-legacy")
    except Exception as exc:  # not written yet, or python-iptables cannot load
        missing["iptc"] = f"agent.dataplane.iptc_backend unavailable: {exc}"
    if wanted is not None:
        wanted = list(wanted)
        for name in wanted:
            if name not in specs and name not in missing:
                missing[name] = "unknown backend"
        specs = {n: s for n, s in specs.items() if n in wanted}
    return specs, missing


class IoClock:
    """Seconds spent inside kernel tools (backend save/commit, ipset save/restore)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


class TimedBackend:
    """A backend whose save and commit are clocked."""

    def __init__(self, inner: Backend, clock: IoClock) -> None:
        self.inner = inner
        self.mode = inner.mode
        self.save = clock.wrap(inner.save)
        self.commit = clock.wrap(inner.commit)


def make_engine(spec: BackendSpec, clock: IoClock) -> Engine:
    """An Engine over `spec`'s backend with every kernel call clocked."""
    engine = Engine(TimedBackend(spec.factory(), clock), SETTINGS.names, SETTINGS.families)
    engine.ipsets.save = clock.wrap(engine.ipsets.save)  # type: ignore[method-assign]
    engine.ipsets.restore = clock.wrap(engine.ipsets.restore)  # type: ignore[method-assign]
    return engine


def clear_caches() -> None:
    """Empty every module-level memo of the agent, as a fresh process has them.

    Both kinds: `functools` caches (`cache_clear`) and the compiler's
    single-slot `LastCall` memos, which would otherwise hand a "cold" repeat
    the previous repeat's tables.
    """
    for name, module in list(sys.modules.items()):
        if not (name == "agent" or name.startswith("agent.")) or module is None:
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, type) and hasattr(obj, "cache_clear"):
                obj.cache_clear()   # functools caches, LastCall and SizedLru memos


def snapshot(policy: Policy, devices: Iterable[str]) -> Snapshot:
    devs = frozenset(devices)
    return Snapshot(policy, devs, SETTINGS, {d: BRIDGE for d in devs}, {BRIDGE: ZONE})


# ---------------------------------------------------------------- floor

@dataclass
class FloorInput:
    """The scripts the floor sends: per-table restore scripts and one ipset restore."""

    tables: list[TablePlan] = field(default_factory=list)
    ipset_lines: list[str] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return sum(len(p.lines()) for p in self.tables)


def floor_input(ruleset: Ruleset) -> FloorInput:
    """What writing `ruleset` into an empty kernel takes, as the engine would plan it."""
    out = FloorInput()
    for family in SETTINGS.families:
        names = sorted((t for f, t in ruleset.tables if f == family),
                       key=lambda t: TABLE_ORDER.index(t) if t in TABLE_ORDER else 99)
        for table in names:
            out.tables.append(plan_table(ruleset.tables[(family, table)], None, family, table,
                                         SETTINGS.names.owns_chain))
    out.ipset_lines = plan_ipsets(ruleset.ipsets, {}).before
    return out


def run_floor(data: FloorInput, mode: str) -> dict[str, float]:
    """Raw tool time for `data` (call on a worker in an empty namespace)."""
    start = time.perf_counter()
    run(["ipset", "restore"], "\n".join(data.ipset_lines) + "\n")
    mid = time.perf_counter()
    for plan in data.tables:
        run([BINARIES[(mode, plan.family)] + "-restore", "--noflush", "--wait", "5"],
            plan.script())
    end = time.perf_counter()
    return {"total_s": end - start, "ipset_s": mid - start, "iptables_s": end - mid}


# ---------------------------------------------------------------- engine samples

def _report_fields(report: ApplyReport) -> dict[str, Any]:
    return {"lines_written": report.lines_written, "chains_written": report.chains_written,
            "tables_written": len(report.tables_written),
            "ipset_members_added": report.ipset_members_added,
            "ipset_members_removed": report.ipset_members_removed}


def cold_sample(doc: dict[str, Any], devices: list[str], spec: BackendSpec,
                clock: IoClock) -> tuple[dict[str, Any], Engine, Policy]:
    """Parse, compile and apply into an empty namespace (runs on the worker)."""
    clear_caches()
    clock.reset()
    t0 = time.perf_counter()
    policy = workloads.parse(doc)
    t1 = time.perf_counter()
    compiled = compile_ruleset(snapshot(policy, devices))
    t2 = time.perf_counter()
    engine = make_engine(spec, clock)
    report = engine.apply(compiled.ruleset)
    t3 = time.perf_counter()
    sample = {"parse_s": t1 - t0, "compile_s": t2 - t1, "apply_s": t3 - t2, "total_s": t3 - t0,
              "io_s": clock.seconds, **_report_fields(report)}
    return sample, engine, policy


@dataclass
class StepState:
    """The policy as the steps change it: ports, groups, explicit members, devices."""

    ports: list[Port]
    groups: dict[str, tuple[Any, ...]]
    extra_members: dict[str, dict[int, frozenset[str]]]
    devices: list[str]

    def policy(self) -> Policy:
        return Policy(ports=tuple(self.ports), groups=dict(self.groups),
                      members=derive_members(self.ports, self.extra_members))


def run_steps(engine: Engine, clock: IoClock, policy: Policy, workload: dict[str, Any],
              repeats: int, profile: bool = False, replace_repeats: int | None = None,
              conntrack_budget: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every incremental step `repeats` times on the worker; (samples, profiles).

    The daemon's conntrack cleanup after each step is run and timed in at most
    `conntrack_budget` samples per step (None: all): at 1,000 ports one
    removed port makes about 2,600 cuts (one conntrack dump per family, in process).
    """
    state = StepState(list(policy.ports), dict(policy.groups),
                      parse_member_map(workload["sg_member_ips"], []),
                      [p.device for p in policy.ports])
    extras = [parse_port(raw, strict=True) for raw in workload.get("extra_ports", [])]
    rule_group = workloads.default_group(workload)
    member_group = workloads.most_referenced_remote_group(workload)
    samples: dict[str, list[dict[str, Any]]] = {step: [] for step in STEPS}
    profiles: dict[str, Any] = {}
    last_snap = snapshot(state.policy(), state.devices)
    conntrack_runs: dict[str, int] = {}

    def measure(step: str, refresh: bool = False, keep: bool = True) -> None:
        """Compile + apply (the engine's part), then the daemon's conntrack cleanup."""
        nonlocal last_snap
        snap = snapshot(state.policy(), state.devices)
        clock.reset()
        t0 = time.perf_counter()
        compiled = compile_ruleset(snap)
        t1 = time.perf_counter()
        report = engine.apply(compiled.ruleset, refresh=refresh)
        t2 = time.perf_counter()
        cuts = flows_to_cut(last_snap, snap)
        t3 = time.perf_counter()
        last_snap = snap
        failures: list[str] = []
        ran = bool(cuts) and keep and (conntrack_budget is None or
                                 conntrack_runs.get(step, 0) < conntrack_budget)
        if ran:  # the daemon's cleanup: one dump per family, deletes of matching entries
            conntrack_runs[step] = conntrack_runs.get(step, 0) + 1
            failures = cut(cuts).errors
        t4 = time.perf_counter()
        if keep:
            timed = ran or not cuts
            samples[step].append({"compile_s": t1 - t0, "apply_s": t2 - t1, "total_s": t2 - t0,
                                  "io_s": clock.seconds, "flow_plan_s": t3 - t2,
                                  "conntrack_s": t4 - t3 if timed else None,
                                  "daemon_s": t4 - t0 if timed else None,
                                  "flow_cuts": len(cuts),
                                  "flow_cut_failures": len(failures) if ran else 0,
                                  **_report_fields(report)})

    def profiled(step: str, change: Callable[[], None], undo: Callable[[], None] | None,
                 refresh: bool = False) -> None:
        change()
        prof = cProfile.Profile()
        prof.enable()
        measure(step, refresh=refresh, keep=False)
        prof.disable()
        profiles[step] = profile_top(prof)
        if undo:
            undo()
            measure(step, keep=False)

    count = min(repeats, len(extras))
    for k in range(count):                                     # (b) add one port
        state.ports.append(extras[k])
        state.devices.append(extras[k].device)
        measure("add_port")
    for k in range(repeats):                                   # (c) one rule added
        rule = parse_rule(workloads.bench_rule(k), "bench rule")
        state.groups[rule_group] = state.groups[rule_group] + (rule,)
        measure("rule_change")
    # (c') one rule replaced: the old rule's flows are cut on every port of the group
    for k in range(replace_repeats if replace_repeats is not None else repeats):
        rule = parse_rule(workloads.bench_rule(100 + k), "bench rule")
        state.groups[rule_group] = state.groups[rule_group][:-1] + (rule,)
        measure("rule_replace")
    for k in range(repeats):                                   # (d) one member added
        by_family = dict(state.extra_members.get(member_group, {}))
        by_family[4] = by_family.get(4, frozenset()) | {workloads.bench_member(k) + "/32"}
        state.extra_members[member_group] = by_family
        measure("member_add")
    for k in reversed(range(count)):                           # (e) remove a port
        state.ports.remove(extras[k])
        state.devices.remove(extras[k].device)
        measure("port_remove")
    for _ in range(repeats):
        measure("noop_resync", refresh=True)
        measure("noop_event")

    if profile and len(extras) > count:
        spare = extras[count]

        def plug() -> None:
            state.ports.append(spare)
            state.devices.append(spare.device)

        def unplug() -> None:
            state.ports.remove(spare)
            state.devices.remove(spare.device)

        def add_rule() -> None:
            rule = parse_rule(workloads.bench_rule(repeats), "bench rule")
            state.groups[rule_group] = state.groups[rule_group] + (rule,)

        profiled("add_port", plug, unplug)
        profiled("rule_change", add_rule, None)
        profiled("noop_resync", lambda: None, None, refresh=True)
    return samples, profiles


def profile_top(prof: cProfile.Profile, limit: int = 12) -> dict[str, Any]:
    """The functions that took the most time, by own time and by cumulative time."""
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(filename.split("/")[-3:])
        rows.append({"function": f"{short}:{line}({func})", "calls": calls,
                     "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})
    by_own = sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:limit]
    by_cum = sorted((r for r in rows if "/agent/" in r["function"] or
                     r["function"].startswith("agent/")),
                    key=lambda r: r["cumtime_s"], reverse=True)[:limit]
    return {"total_s": round(stats.total_tt, 4), "by_own_time": by_own,  # type: ignore[attr-defined]
            "agent_by_cumulative": by_cum}


# ---------------------------------------------------------------- one workload, one backend

def bench_workload(name: str, workload: dict[str, Any], spec: BackendSpec, cold_repeats: int,
                   step_repeats: int, profile: bool = False) -> dict[str, Any]:
    """Floor and cold samples side by side, then the steps; one JSON-able dict."""
    doc = workloads.policy_doc(workload)
    devices = [p["device"] for p in workload["ports"]]
    compiled = compile_ruleset(snapshot(workloads.parse(doc), devices))
    floor_data = floor_input(compiled.ruleset)
    floors: list[dict[str, float]] = []
    colds: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "workload": name,
        "backend": spec.name,
        "floor_tool": BINARIES[(spec.floor_mode, 4)] + "-restore",
        "kernel_objects": {
            "rules": compiled.ruleset.rule_count(),
            "chains": sum(len(t.chains) for t in compiled.ruleset.tables.values()),
            "ipsets": len(compiled.ruleset.ipsets),
            "ipset_members": sum(len(s.members) for s in compiled.ruleset.ipsets.values()),
            "restore_lines": floor_data.lines,
        },
    }
    profiles: dict[str, Any] = {}
    for rep in range(cold_repeats):
        last = rep == cold_repeats - 1
        order = ("floor", "engine") if rep % 2 == 0 else ("engine", "floor")
        for what in order:
            with private_netns(what) as ns, NetnsWorker(ns) as worker:
                if what == "floor":
                    floors.append(worker.call(run_floor, floor_data, spec.floor_mode))
                    continue
                clock = IoClock()
                sample, engine, policy = worker.call(cold_sample, doc, devices, spec, clock)
                colds.append(sample)
                if last:  # the steps start from the last cold apply's kernel
                    # a replaced rule forks one `conntrack -D` per port: fewer samples
                    big = len(devices) >= 1000
                    replace = min(step_repeats, 2) if big else step_repeats
                    steps, step_profiles = worker.call(run_steps, engine, clock, policy,
                                                       workload, step_repeats, profile, replace,
                                                       2 if big else None)
                    result["steps"] = {step: _step_summary(rows) for step, rows in steps.items()}
                    profiles.update(step_profiles)
    if profile:  # one more cold apply under cProfile, not counted in the timings
        with private_netns("profile") as ns, NetnsWorker(ns) as worker:
            prof = cProfile.Profile()

            def profiled_cold() -> None:
                prof.enable()
                try:
                    cold_sample(doc, devices, spec, IoClock())
                finally:
                    prof.disable()

            worker.call(profiled_cold)
            profiles["cold"] = profile_top(prof)
    result["floor"] = {key: summary([f[key] for f in floors])
                       for key in ("total_s", "iptables_s", "ipset_s")}
    result["cold"] = {key: summary([c[key] for c in colds])
                      for key in ("total_s", "parse_s", "compile_s", "apply_s", "io_s")}
    result["cold"]["lines_written"] = colds[-1]["lines_written"] if colds else None
    floor_median = result["floor"]["total_s"]["median"] if floors else None
    if floor_median and colds:
        result["cold_over_floor"] = round(result["cold"]["total_s"]["median"] / floor_median, 3)
        result["apply_over_floor"] = round(result["cold"]["apply_s"]["median"] / floor_median, 3)
    if profiles:
        result["profiles"] = profiles
    return result


def _step_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {key: summary([r[key] for r in rows if r[key] is not None])
                           for key in ("total_s", "compile_s", "apply_s", "io_s", "flow_plan_s",
                                       "conntrack_s", "daemon_s")}
    for key in ("lines_written", "chains_written", "tables_written", "ipset_members_added",
                "ipset_members_removed", "flow_cuts", "flow_cut_failures"):
        out[key] = [r[key] for r in rows]
    return out
