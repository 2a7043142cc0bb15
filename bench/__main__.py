"""`python -m bench` (`make bench`): run every benchmark, write latest.json, plots, verdicts.

Sections, each run per backend and recorded even when another fails:

- engine:   the engine in process on gen_workload.py's workloads (10, 50, 100,
            200 and 1,000 ports; 10, 100 and 1,000 ports with 1,000-member
            remote groups): cold apply against the floor, then every
            incremental step (bench/engine_bench.py);
- agent:    the real agent: start to enforced, netlink event -> committed for
            one new tap, no-op resync, RSS, at 10 / 100 / 1,000 ports
            (bench/agent_bench.py);
- datapath: 64-byte UDP pps across the bridge with 2 ... 1,000 ports
            programmed (bench/datapath.py);
- newflows: new flows per second (one datagram per fresh source port) across
            the bridge, at the datapath's port counts (bench/newflows.py);
- peer:     Neutron's driver, live when its venv is at hand, else its earlier
            figures, quoted (bench/peer.py);
- fleet:    N real agents on one broker and controller converging after one
            rule change, and 1,000 simulated agents' pull storm against the
            controller (bench/fleet.py);
- e2e:      what users see: the real agent, standalone and RPC, with the taps
            present, from the operator's action to the first packet that shows
            it, and cold start against the restore floor (bench/e2e.py);
- baseline: a baseline git revision (issue 13's "today": 4e890fc) beside the
            working tree in the same run, interleaved: rules in the kernel,
            cold apply in process, the real agent's cold start
            (bench/baseline.py; `--baseline-rev ''` skips it).

`--quick` is a small smoke run (minutes); `--report-only` re-judges and
re-plots an existing latest.json without touching the kernel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import baseline_report, report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results"


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--sections", default="engine,agent,datapath,newflows,e2e,fleet,baseline",
                    help="comma list of engine, agent, datapath, newflows, e2e, fleet, "
                         "baseline")
    ap.add_argument("--backends", default="",
                    help="comma list (default: iptables-legacy, iptables-nft, and iptc "
                         "when agent/dataplane/iptc_backend.py exists)")
    ap.add_argument("--sizes", type=_csv_ints, default=[10, 50, 100, 200, 1000],
                    help="engine workload sizes (ports)")
    ap.add_argument("--member-sizes", type=_csv_ints, default=[10, 100, 1000],
                    help="sizes also run with 1,000-member remote groups")
    ap.add_argument("--cold-repeats", type=int, default=5)
    ap.add_argument("--cold-repeats-large", type=int, default=3,
                    help="cold repeats at 1,000 ports and more")
    ap.add_argument("--step-repeats", type=int, default=5)
    ap.add_argument("--agent-sizes", type=_csv_ints, default=[10, 100, 1000])
    ap.add_argument("--agent-samples", type=int, default=10)
    ap.add_argument("--datapath-counts", type=_csv_ints, default=[2, 10, 100, 1000])
    ap.add_argument("--datapath-repeats", type=int, default=3)
    ap.add_argument("--datapath-seconds", type=float, default=3.0)
    ap.add_argument("--newflows-counts", type=_csv_ints, default=None,
                    help="ports programmed (default: --datapath-counts)")
    ap.add_argument("--newflows-repeats", type=int, default=3)
    ap.add_argument("--newflows-seconds", type=float, default=2.0,
                    help="seconds of sending per sample (whole bursts of 64,512 flows)")
    ap.add_argument("--neutron", choices=("auto", "quote"), default="auto",
                    help="auto: run the peer live when a neutron venv is found")
    ap.add_argument("--neutron-sizes", type=_csv_ints, default=[10, 100, 1000])
    ap.add_argument("--e2e-sizes", type=_csv_ints, default=[10, 100, 1000])
    ap.add_argument("--e2e-modes", default="standalone,rpc")
    ap.add_argument("--e2e-backends", default="iptables-nft",
                    help="the e2e series' backends (--backends does not apply)")
    ap.add_argument("--e2e-repeats", type=int, default=5)
    ap.add_argument("--e2e-repeats-large", type=int, default=5,
                    help="e2e repeats at 1,000 ports and more")
    ap.add_argument("--e2e-cold", type=int, default=3, help="cold starts (at least 2)")
    ap.add_argument("--e2e-trigger", choices=("auto", "write", "sighup"), default="auto",
                    help="standalone: a bare write, write + SIGHUP, or auto (SIGHUP only "
                         "when a bare write is not seen)")
    ap.add_argument("--fleet-sizes", type=_csv_ints, default=[10, 50, 100],
                    help="real agents in the fleet convergence runs")
    ap.add_argument("--fleet-storm-agents", type=int, default=1000)
    ap.add_argument("--fleet-storm-rounds", type=int, default=3)
    ap.add_argument("--baseline-rev", default="4e890fc",
                    help="git revision measured beside the working tree ('': skip)")
    ap.add_argument("--baseline-ports", type=int, default=1000)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    ap.add_argument("--baseline-backends", default="iptables-legacy,iptables-nft")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--report-only", action="store_true",
                    help="re-judge and re-plot OUT/latest.json")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.member_sizes = [10, 100], [10]
        args.cold_repeats = args.cold_repeats_large = 2
        args.step_repeats = 2
        args.agent_sizes, args.agent_samples = [10, 100], 3
        args.datapath_counts, args.datapath_repeats, args.datapath_seconds = [2, 10], 1, 2.0
        args.newflows_repeats, args.newflows_seconds = 1, 1.0
        args.neutron_sizes = [10]
        args.e2e_sizes, args.e2e_repeats, args.e2e_repeats_large = [10, 1000], 3, 2
        args.e2e_cold = 2
        args.fleet_sizes, args.fleet_storm_rounds = [10], 1
        args.baseline_ports, args.baseline_repeats = 100, 1
    if args.newflows_counts is None:
        args.newflows_counts = args.datapath_counts
    return args


class Run:
    """The results being built, saved after every section so a crash keeps what ran."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="hostfw-bench-"))
        self.started = time.monotonic()
        self.results: dict[str, Any] = {
            "schema": 1,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": report.machine(),
            "versions": report.versions(),
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()},
            "load": {"start": report.loadavg()},
            "errors": [],
        }

    def say(self, text: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.0f}s] {text}", file=sys.stderr,
              flush=True)

    def guarded(self, where: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; an exception is recorded and the run goes on."""
        try:
            return fn()
        except Exception as exc:  # one broken backend must not lose the others' figures
            self.say(f"{where}: FAILED: {exc}")
            traceback.print_exc()
            self.results["errors"].append({"where": where, "error": f"{type(exc).__name__}: "
                                                                   f"{exc}"[:2000]})
            return {"error": f"{type(exc).__name__}: {exc}"[:2000]}

    def checkpoint(self) -> None:
        (self.work / "progress.json").write_text(json.dumps(self.results, indent=1))


def run_engine(run: Run, backends: list[str] | None) -> None:
    from bench import engine_bench, workloads

    specs, missing = engine_bench.available_backends(backends)
    run.results["backends_missing"] = missing
    out = run.results.setdefault("engine", {})
    cases = [(f"w{n}", n, None) for n in run.args.sizes]
    cases += [(f"w{n}-m1000", n, 1000) for n in run.args.member_sizes]
    cache = run.work / "workloads"
    run.results["workloads"] = {}
    largest = max(n for _, n, _ in cases)
    for name, ports, members in cases:
        workload = workloads.load(ports, cache, members)
        run.results["workloads"][name] = workloads.counts(workload)
        for backend, spec in specs.items():
            repeats = run.args.cold_repeats_large if ports >= 1000 else run.args.cold_repeats
            run.say(f"engine {name} {backend}: {repeats} cold + floor, "
                    f"{run.args.step_repeats} x steps")
            profile = ports == largest and members is None
            res = run.guarded(f"engine {name} {backend}", lambda w=workload, s=spec, n=name,
                              r=repeats, p=profile: engine_bench.bench_workload(
                                  n, w, s, r, run.args.step_repeats, profile=p))
            out.setdefault(backend, {})[name] = res
            if "cold" in res:
                run.say(f"  cold {res['cold']['total_s']['median']:.3f} s, floor "
                        f"{res['floor']['total_s']['median']:.3f} s, rule change "
                        f"{res['steps']['rule_change']['total_s']['median'] * 1000:.1f} ms")
            run.checkpoint()


def run_agent(run: Run, backends: list[str] | None) -> None:
    from bench import agent_bench, workloads

    names = backends or ["iptables-legacy", "iptables-nft", "iptc"]
    variants: list[tuple[str, str, dict[str, Any] | None]] = []
    for backend in names:
        reason = agent_bench.agent_accepts(backend)
        if reason:
            run.results.setdefault("agent_skipped", {})[backend] = reason
            run.say(f"agent {backend}: skipped ({reason})")
            continue
        variants.append((backend, backend, None))
    if any(b == "iptables-legacy" for _, b, _ in variants):
        variants.append(("iptables-legacy batch_window=0", "iptables-legacy",
                         {"batch_window": 0}))
    out = run.results.setdefault("agent", {})
    cache = run.work / "workloads"
    for label, backend, options in variants:
        for size in run.args.agent_sizes:
            workload = workloads.load(size, cache)
            run.say(f"agent {label} {size} ports: {run.args.agent_samples} taps")
            res = run.guarded(f"agent {label} {size}", lambda w=workload, b=backend, o=options:
                              agent_bench.bench_size(b, w, run.args.agent_samples, o))
            out.setdefault(label, {})[str(size)] = res
            if "add_port_latency_s" in res:
                run.say(f"  start {res['cold_start_s']:.2f} s, add port p50 "
                        f"{res['add_port_latency_s']['median'] * 1000:.1f} ms, RSS "
                        f"{res['rss_kb']['VmRSS'] / 1024:.0f} MB")
            run.checkpoint()


def run_datapath(run: Run, backends: list[str] | None) -> None:
    from bench import datapath, workloads

    names = [b for b in (backends or ["iptables-legacy", "iptables-nft"]) if b != "iptc"]
    workload = workloads.load(max(run.args.datapath_counts), run.work / "workloads")
    out = run.results.setdefault("datapath", {})
    for backend in names:
        run.say(f"datapath {backend}: counts {run.args.datapath_counts}, "
                f"{run.args.datapath_repeats} repeats")
        res = run.guarded(f"datapath {backend}", lambda b=backend: datapath.bench_datapath(
            b, workload, run.args.datapath_counts, run.args.datapath_repeats,
            run.args.datapath_seconds))
        out[backend] = res
        if res.get("ratio_max_over_min") is not None:
            run.say(f"  pps ratio {res['ratio_max_over_min']:.2f}")
        run.checkpoint()


def run_newflows(run: Run, backends: list[str] | None) -> None:
    from bench import newflows, workloads

    names = [b for b in (backends or ["iptables-legacy", "iptables-nft"]) if b != "iptc"]
    counts = run.args.newflows_counts
    workload = workloads.load(max(counts), run.work / "workloads")
    out = run.results.setdefault("newflows", {})
    for backend in names:
        run.say(f"newflows {backend}: counts {counts}, {run.args.newflows_repeats} repeats")
        res = run.guarded(f"newflows {backend}", lambda b=backend: newflows.bench_newflows(
            b, workload, counts, run.args.newflows_repeats, run.args.newflows_seconds))
        out[backend] = res
        if res.get("ratio_max_over_min") is not None:
            run.say(f"  new flows/s ratio {res['ratio_max_over_min']:.2f}")
        run.checkpoint()


def run_fleet(run: Run, backends: list[str] | None) -> None:
    from bench import fleet

    backend = next((b for b in backends or [] if b != "iptc"), "iptables-legacy")
    run.say(f"fleet {backend}: agents {run.args.fleet_sizes}, storm of "
            f"{run.args.fleet_storm_agents} simulated agents x {run.args.fleet_storm_rounds}")
    res = run.results["fleet"] = run.guarded("fleet", lambda: fleet.bench_fleet(
        run.args.fleet_sizes, run.args.fleet_storm_agents, run.args.fleet_storm_rounds, backend))
    for size, sized in res.get("converge", {}).get("sizes", {}).items():
        run.say(f"  {size} agents: convergence p50 {sized['p50_s']} s, p99 {sized['p99_s']} s")
    for key, storm in res.items():
        if key.startswith("storm") and "p99_s" in storm:
            run.say(f"  {key}: answer p50 {storm['p50_s']} s, p99 {storm['p99_s']} s")
    run.checkpoint()


def run_peer(run: Run) -> None:
    from bench import peer, workloads

    data = peer.quoted()
    python = peer.find_python() if run.args.neutron == "auto" else None
    if python:
        live: dict[str, Any] = {}
        for backend in ("nft", "legacy"):
            for size in run.args.neutron_sizes:
                path = workloads.generate(size, run.work / "workloads")
                run.say(f"peer: Neutron live, {backend}, {size} ports")
                res = run.guarded(f"peer {backend} {size}", lambda p=path, b=backend, s=size:
                                  peer.run_live(python, p, b, 1 if s >= 1000 else 2, 3, 3600))
                if "timings_s" in res:
                    live.setdefault(backend, {})[str(size)] = res["timings_s"]
        data = {"mode": "live", "python": python,
                "label": "Neutron IptablesFirewallDriver, run live in this run",
                "figures": live, "quoted_earlier": data}
    else:
        run.say("peer: no neutron venv at hand; quoting the earlier figures")
    run.results["peer"] = data


def run_e2e(run: Run, backends: list[str] | None) -> None:
    from bench import e2e, workloads

    out = run.results.setdefault("e2e", {})
    modes = [m for m in run.args.e2e_modes.split(",") if m]
    broker = None
    if "rpc" in modes:
        from tests.rpc.broker import Broker, skip_reason

        reason = skip_reason()
        if reason:
            run.results.setdefault("e2e_skipped", {})["rpc"] = reason
            modes.remove("rpc")
        else:
            broker = Broker()
            if run.guarded("e2e broker", broker.setup) is not None:   # it failed
                broker.teardown()
                broker = None
                modes.remove("rpc")
    try:
        for mode in modes:
            for backend in [b for b in run.args.e2e_backends.split(",") if b]:
                for size in run.args.e2e_sizes:
                    repeats = run.args.e2e_repeats_large if size >= 1000 else run.args.e2e_repeats
                    opts = e2e.Options(repeats=repeats, cold_repeats=run.args.e2e_cold,
                                       floor_repeats=2 if run.args.quick else 3,
                                       trigger=run.args.e2e_trigger)
                    workload = workloads.load(size, run.work / "workloads")
                    run.say(f"e2e {mode} {backend} {size} ports: {repeats} x each change")
                    res = run.guarded(f"e2e {mode} {backend} {size}", lambda w=workload, m=mode,
                                      b=backend, o=opts: e2e.bench_size(
                                          m, b, w, o, broker and broker.url, run.say))
                    out.setdefault(f"{mode} {backend}", {})[str(size)] = res
                    run.checkpoint()
    finally:
        if broker is not None:
            broker.teardown()


def run_baseline(run: Run, backends: list[str] | None) -> None:
    from bench import baseline

    rev = run.args.baseline_rev
    if not rev:
        run.results["baseline"] = {"skipped": "--baseline-rev ''", "rev": None}
        return
    names = [b for b in run.args.baseline_backends.split(",") if b]
    run.say(f"baseline {rev}: {names}, {run.args.baseline_ports} ports, "
            f"{run.args.baseline_repeats} interleaved repeats")
    run.results["baseline"] = run.guarded("baseline", lambda: baseline.bench_baseline(
        rev, names, run.args.baseline_ports, run.args.baseline_repeats, run.work, run.say))
    run.checkpoint()


def finish(results: dict[str, Any], out: Path, plots: bool) -> None:
    results["goals"] = report.verdicts(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    (out / "latest.md").write_text(report.markdown(results["goals"]) + "\n" +
                                   baseline_report.markdown(results.get("baseline", {})))
    if plots:
        try:
            results["plots"] = report.plots(results, out)
        except ImportError as exc:
            print(f"bench: no plots ({exc}); pip install '.[bench]'", file=sys.stderr)
    met = sum(1 for g in results["goals"] if g["met"] is True)
    missed = [g for g in results["goals"] if g["met"] is False]
    print(report.markdown(results["goals"]))
    print(f"bench: {met} goals met, {len(missed)} missed; {out / 'latest.json'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if args.report_only:
        results = json.loads((args.out / "latest.json").read_text())
        finish(results, args.out, not args.no_plots)
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    run = Run(args)
    backends = [b for b in args.backends.split(",") if b] or None
    sections = set(args.sections.split(","))
    run.say(f"work dir {run.work}; load {run.results['load']['start']}")
    run_peer(run)
    for name, fn in (("engine", run_engine), ("agent", run_agent),
                     ("datapath", run_datapath), ("newflows", run_newflows), ("e2e", run_e2e),
                     ("fleet", run_fleet), ("baseline", run_baseline)):
        if name in sections:
            run.results["load"][f"{name}_start"] = report.loadavg()
            fn(run, backends)
    run.results["load"]["end"] = report.loadavg()
    run.results["duration_s"] = round(time.monotonic() - run.started)
    finish(run.results, args.out, not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
