"""The verdicts, the machine and versions, the plots and the markdown table.

Rules of this room: everything here reads the results dict only (no kernel,
no timing), so a `latest.json` from another run can be re-judged and
re-plotted: `python -m bench --report-only`.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import baseline_report, e2e_report, peer
from bench.stats import median

ROOT = Path(__file__).resolve().parents[1]
MB = 1024.0

# Issue 8's goals.
COLD_OVER_FLOOR = 3.0
COLD_OVER_NEUTRON = 0.2
ADD_PORT_P50_S = 0.030
FLAT_FACTOR = 2.0
RULE_LINES = 50
RULE_S = 0.050
MEMBER_S = 0.010
PPS_RATIO = 0.9  # issue 13: 1,000 ports keep 90% of the 2-port rate
RSS_MB = 150.0
# Issue 13's new-flows goal.
NEWFLOWS_RATIO = 0.8
# Issue 12's fleet goals.
FLEET_AGENTS = 100
FLEET_P99_S = 1.0
STORM_P99_S = 1.0


# ---------------------------------------------------------------- machine and versions

def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def loadavg() -> list[float]:
    return [float(x) for x in _read("/proc/loadavg").split()[:3]] or [0.0, 0.0, 0.0]


def machine() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)', _read("/etc/os-release"), re.M)
    return {"hostname": socket.gethostname(), "os": pretty.group(1) if pretty else None,
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu_model": model.group(1) if model else None,
            "mem_total_mb": round(int(mem.group(1)) / MB) if mem else None,
            "virtualised": "hypervisor" in cpuinfo}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    git = ["git", "-C", str(ROOT)]
    out["hostfw_commit"] = _first_line([*git, "rev-parse", "--short", "HEAD"])
    status = subprocess.run([*git, "status", "--porcelain", "agent"], capture_output=True,
                            text=True, check=False).stdout
    out["hostfw_agent_tree_dirty"] = bool(status.strip())
    for tool in ("iptables-legacy", "iptables-nft", "ipset", "iperf3"):
        out[tool] = _first_line([tool, "--version"])
    for dist in ("pyroute2", "python-iptables", "oslo.config", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------- verdicts

def _row(what: str, workload: str, backend: str, ours: float | None, unit: str, goal: str,
         met: bool | None, spread: str = "", floor: float | None = None,
         neutron: float | None = None, note: str = "") -> dict[str, Any]:
    return {"what": what, "workload": workload, "backend": backend, "ours": ours, "unit": unit,
            "spread": spread, "floor": floor, "neutron": neutron, "goal": goal, "met": met,
            "note": note}


def _spread(summ: dict[str, Any] | None, scale: float = 1.0) -> str:
    if not summ:
        return ""
    return f"{summ['min'] * scale:.3g}-{summ['max'] * scale:.3g} (n={summ['n']})"


def _ports_of(workload: str) -> int:
    return int(re.match(r"w(\d+)", workload).group(1))  # type: ignore[union-attr]


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal of issue 8 (and per extra measurement of issue 3; new flows: 13)."""
    rows: list[dict[str, Any]] = []
    peer_data = results.get("peer", {})
    engine = results.get("engine", {})
    for backend, by_workload in engine.items():
        for name, res in by_workload.items():
            if "error" in res:
                rows.append(_row("cold start to enforced", name, backend, None, "s", "", False,
                                 note=res["error"][:200]))
                continue
            ports = _ports_of(name)
            plain = "-m" not in name
            cold = res["cold"]["total_s"]
            floor = median(res["floor"]["total_s"])
            neu = peer.figure(peer_data, backend, ports, "cold") if plain else None
            ours = median(cold)
            over_floor = ours is not None and floor and ours <= COLD_OVER_FLOOR * floor
            met: bool | None = bool(over_floor)
            note = f"{ours / floor:.2f}x floor" if ours and floor else ""
            if neu and neu.get("median"):
                met = met and ours <= COLD_OVER_NEUTRON * neu["median"]
                note += f", {ours / neu['median']:.2f}x Neutron"
            elif plain:
                note += ", no peer figure at this size"
            rows.append(_row("cold start to enforced (parse+compile+apply)", name, backend, ours,
                             "s", "<= 3x floor, <= 1/5 Neutron sync", met, _spread(cold),
                             floor, neu and neu.get("median"), note))
            steps = res.get("steps", {})
            if "add_port" in steps:
                step = steps["add_port"]
                neu = peer.figure(peer_data, backend, ports, "add_port") if plain else None
                rows.append(_row("one port added, in process (compile+apply)", name, backend,
                                 median(step["total_s"]), "s", "(issue 3: measure)", None,
                                 _spread(step["total_s"]), None, neu and neu.get("median"),
                                 f"{max(step['lines_written'])} lines max"))
            if "rule_change" in steps:
                step = steps["rule_change"]
                total = median(step["total_s"])
                lines = max(step["lines_written"])
                neu = peer.figure(peer_data, backend, ports, "rule_change") if plain else None
                rows.append(_row("one rule changed in the group every port uses", name, backend,
                                 total, "s", "< 50 kernel lines, < 50 ms",
                                 lines < RULE_LINES and total is not None and total < RULE_S,
                                 _spread(step["total_s"]), None, neu and neu.get("median"),
                                 f"{lines} lines max; compile "
                                 f"{median(step['compile_s']) * 1000:.0f} ms + apply "
                                 f"{median(step['apply_s']) * 1000:.0f} ms"))
            if "rule_replace" in steps:
                step = steps["rule_replace"]
                total = median(step["daemon_s"])
                lines = max(step["lines_written"])
                rows.append(_row("one rule replaced in the group every port uses, with the "
                                 "daemon's conntrack cleanup", name, backend, total, "s",
                                 "< 50 kernel lines, < 50 ms",
                                 lines < RULE_LINES and total is not None and total < RULE_S,
                                 _spread(step["daemon_s"]), None, None,
                                 f"{lines} lines max; compile+apply "
                                 f"{median(step['total_s']) * 1000:.0f} ms, "
                                 f"{max(step['flow_cuts'])} conntrack cuts "
                                 f"{median(step['conntrack_s']) * 1000:.0f} ms"))
            if "member_add" in steps:
                step = steps["member_add"]
                total = median(step["total_s"])
                writes = max(step["tables_written"])
                neu = peer.figure(peer_data, backend, ports, "member_add") if plain else None
                rows.append(_row("one member added to a remote group", name, backend, total, "s",
                                 "0 iptables writes, < 10 ms",
                                 writes == 0 and total is not None and total < MEMBER_S,
                                 _spread(step["total_s"]), None, neu and neu.get("median"),
                                 f"{writes} tables written max, "
                                 f"ipset +{max(step['ipset_members_added'])}"))
            if "port_remove" in steps:
                step = steps["port_remove"]
                neu = peer.figure(peer_data, backend, ports, "port_remove") if plain else None
                rows.append(_row("one port removed, in process", name, backend,
                                 median(step["total_s"]), "s", "(issue 3: measure)", None,
                                 _spread(step["total_s"]), None, neu and neu.get("median"),
                                 f"+ {max(step['flow_cuts'])} conntrack cuts, "
                                 f"{median(step['conntrack_s']) * 1000:.0f} ms"))
            if "noop_resync" in steps:
                step = steps["noop_resync"]
                writes = max(step["lines_written"]) + max(step["ipset_members_added"]) + \
                    max(step["ipset_members_removed"])
                rows.append(_row("no-op resync (re-read, nothing to write)", name, backend,
                                 median(step["total_s"]), "s", "0 kernel writes", writes == 0,
                                 _spread(step["total_s"]), note=f"{writes} lines/members written"))
    rows += _agent_rows(results.get("agent", {}))
    rows += _datapath_rows(results.get("datapath", {}))
    rows += _newflows_rows(results.get("newflows", {}))
    rows += e2e_report.rows(results.get("e2e", {}))
    rows += _fleet_rows(results.get("fleet", {}))
    rows += baseline_report.rows(results.get("baseline", {}))
    return rows


def _agent_rows(agent: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for variant, by_size in agent.items():
        p50s = {}
        for size, res in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            workload = f"w{size}"
            if "error" in res:
                rows.append(_row("one port added (netlink event -> committed)", workload,
                                 variant, None, "s", "p50 < 30 ms, flat", False,
                                 note=res["error"][:200]))
                continue
            lat = res.get("add_port_latency_s")
            p50 = median(lat)
            p50s[int(size)] = p50
            note = (f"p90 {lat['p90'] * 1000:.0f} ms; engine apply "
                    f"{median(res['add_port_apply_s']) * 1000:.0f} ms") if lat else ""
            rows.append(_row("one port added (netlink event -> committed)", workload, variant,
                             p50, "s", "p50 < 30 ms, flat",
                             p50 is not None and p50 < ADD_PORT_P50_S, _spread(lat), note=note))
            noop_writes = max(res.get("noop_resync_lines_written", [0])) + \
                max(res.get("noop_resync_ipset_changes", [0]))
            rows.append(_row("no-op resync, agent (`resync --wait`)", workload, variant,
                             median(res.get("noop_resync_s")), "s", "0 kernel writes",
                             noop_writes == 0, _spread(res.get("noop_resync_s")),
                             note=f"{noop_writes} lines/members written"))
            rows.append(_row("agent process start to enforced", workload, variant,
                             res.get("cold_start_s"), "s", "(measure)", None,
                             note="includes interpreter start-up and imports"))
            rss = res.get("rss_kb", {})
            if int(size) >= 1000 and rss:
                rows.append(_row("agent RSS", workload, variant, rss["VmRSS"] / MB, "MB",
                                 "< 150 MB", rss["VmRSS"] / MB < RSS_MB,
                                 note=f"peak (VmHWM) {rss['VmHWM'] / MB:.0f} MB"))
        if len(p50s) > 1 and all(p50s.values()):
            low, high = min(p50s), max(p50s)
            factor = p50s[high] / p50s[low]
            rows.append(_row("one port added: flat across sizes", f"w{low} -> w{high}", variant,
                             factor, "x", f"p50 at {high} <= {FLAT_FACTOR:g}x p50 at {low}",
                             factor <= FLAT_FACTOR, note="ratio of p50s"))
    return rows


def _datapath_rows(datapath: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for backend, res in datapath.items():
        if "error" in res:
            rows.append(_row("64-byte UDP pps, max ports vs min", "datapath", backend, None, "x",
                             ">= 80%", False, note=res["error"][:200]))
            continue
        counts = res["counts"]
        low, high = str(min(counts)), str(max(counts))
        ratio = res.get("ratio_max_over_min")
        base = median(res["no_rules"]["received_pps"])
        got_low = median(res["programmed"][low]["received_pps"])
        got_high = median(res["programmed"][high]["received_pps"])
        rows.append(_row(f"64-byte UDP pps, {high} ports programmed vs {low}", "datapath",
                         backend, ratio, "x", ">= 90%", ratio is not None and ratio >= PPS_RATIO,
                         _spread(res["programmed"][high]["received_pps"]),
                         note=f"{got_high:,.0f} vs {got_low:,.0f} pps; no rules at all "
                              f"{base:,.0f} pps{_overlapped(res)}"))
    return rows


def _overlapped(res: dict[str, Any]) -> str:
    """A note for the samples `programmed.quiet` could not keep clear of the agent's work."""
    return f"; {res['overlapped']} samples overlapped the agent's work" \
        if res.get("overlapped") else ""


def _newflows_rows(newflows: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for backend, res in newflows.items():
        if "error" in res:
            rows.append(_row("new flows/s (fresh source ports), max ports vs min", "newflows",
                             backend, None, "x", f">= {NEWFLOWS_RATIO:.0%}", False,
                             note=res["error"][:200]))
            continue
        counts = res["counts"]
        low, high = str(min(counts)), str(max(counts))
        ratio = res.get("ratio_max_over_min")
        top = res["programmed"][high]
        rows.append(_row(f"new flows/s (fresh source ports), {high} ports programmed vs {low}",
                         "newflows", backend, ratio, "x", f">= {NEWFLOWS_RATIO:.0%}",
                         ratio is not None and ratio >= NEWFLOWS_RATIO,
                         _spread(top["accepted_fps"]),
                         note=f"{median(top['accepted_fps']):,.0f} vs "
                              f"{median(res['programmed'][low]['accepted_fps']):,.0f} flows/s, "
                              f"{median(top['accepted_percent']):.1f}% of those sent accepted; "
                              f"no rules at all "
                              f"{median(res['no_rules']['accepted_fps']):,.0f} flows/s"
                              f"{_overlapped(res)}"))
    return rows


def _fleet_rows(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    what = "fleet: agents converge after one rule change (file write -> first packet), p99"
    converge = fleet.get("converge", {})
    if "error" in converge or "error" in fleet:
        rows.append(_row(what, "fleet", "-", None, "s", f"p99 <= {FLEET_P99_S:g} s", False,
                         note=(converge.get("error") or fleet["error"])[:200]))
    for size, res in sorted(converge.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        p99 = res.get("p99_s")
        judged = int(size) == FLEET_AGENTS
        met = p99 is not None and p99 <= FLEET_P99_S and not res["not_converged"]
        reload = res.get("controller_reload") or {}
        pull = (res.get("agents_logged") or {}).get("pull_took_s")
        rows.append(_row(what, f"{size} agents x 10 ports", converge.get("backend", "-"), p99,
                         "s", f"p99 <= {FLEET_P99_S:g} s at {FLEET_AGENTS}" if judged
                         else "(measure)", met if judged else None,
                         _spread(res.get("convergence_s")),
                         note=f"p50 {_fmt(res.get('p50_s'), 's')}; {res['not_converged']} not "
                              f"converged; controller reload logged "
                              f"{_fmt(reload.get('logged_after_write_s'), 's')} after the write; "
                              f"agents' pulls took {_fmt(median(pull), 's')} (p50)"))
    what = "fleet: 1,000 simulated agents pull 10 devices each at once, controller answer p99"
    for key, storm in sorted(fleet.items()):
        if not key.startswith("storm"):
            continue
        workers = storm.get("controller_rpc_workers", key.rpartition("_")[2])
        label = f"rpc_workers={workers}" if key != "storm" else "rpc_workers=0"
        if "error" in storm:
            rows.append(_row(what, "storm", label, None, "s", f"p99 <= {STORM_P99_S:g} s", False,
                             note=storm["error"][:200]))
            continue
        p99 = storm.get("p99_s")
        failed = sum(r["failed_count"] for r in storm["rounds"])
        cpu = storm["rounds"][-1].get("cpu_s", {}) if storm["rounds"] else {}
        rows.append(_row(what, f"{storm['policy']['ports']} ports", label, p99, "s",
                         f"p99 <= {STORM_P99_S:g} s", p99 is not None and p99 <= STORM_P99_S
                         and not failed,
                         note=f"p50 {_fmt(storm.get('p50_s'), 's')}; worst of "
                              f"{len(storm['rounds'])} storms; {failed} failed; CPU s in the "
                              f"last: controller {cpu.get('controller')}, broker "
                              f"{cpu.get('broker')}, clients {cpu.get('simulated_agents')}"))
    return rows


# ---------------------------------------------------------------- text

def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:g} {unit}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The verdict table, as the README's performance section shows it."""
    out = ["| what | workload | backend | ours (median) | spread | floor | Neutron | goal | met |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        out.append(f"| {r['what']} | {r['workload']} | {r['backend']} | "
                   f"{_fmt(r['ours'], r['unit'])}{note} | {r['spread']} | "
                   f"{_fmt(r['floor'], 's')} | {_fmt(r['neutron'], 's')} | {r['goal']} | {met} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- plots

def plots(results: dict[str, Any], out: Path) -> list[str]:
    """apply_vs_ports.png, datapath_pps.png and newflows_fps.png; the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    engine = results.get("engine", {})
    agent = results.get("agent", {})
    peer_figs = results.get("peer", {}).get("figures", {})
    if engine or agent:
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
        ax = axes[0]
        for i, (backend, by_workload) in enumerate(sorted(engine.items())):
            color = f"C{i}"
            pts = sorted((_ports_of(n), r) for n, r in by_workload.items()
                         if "-m" not in n and "error" not in r)
            if not pts:
                continue
            xs = [p for p, _ in pts]
            ax.plot(xs, [median(r["cold"]["total_s"]) for _, r in pts], "o-", color=color,
                    label=f"hostfw {backend}")
            ax.plot(xs, [median(r["floor"]["total_s"]) for _, r in pts], "s--", color=color,
                    alpha=0.6, label=f"floor ({pts[0][1]['floor_tool']})")
        for marker, backend in (("x", "nft"), ("+", "legacy")):
            sizes = sorted(int(s) for s in peer_figs.get(backend, {}))
            ys = [peer_figs[backend][str(s)].get("cold", {}).get("median") for s in sizes]
            if sizes:
                ax.plot(sizes, ys, marker, color="grey", markersize=10, linestyle=":",
                        label=f"Neutron full sync, {backend} (quoted)")
        ax.set(xscale="log", yscale="log", xlabel="ports", ylabel="seconds",
               title="cold start to enforced (in process)")
        ax.legend(fontsize=7)
        ax = axes[1]
        for i, (variant, by_size) in enumerate(sorted(agent.items())):
            pts = sorted((int(s), r) for s, r in by_size.items()
                         if r.get("add_port_latency_s"))
            if pts:
                ax.errorbar([p for p, _ in pts],
                            [r["add_port_latency_s"]["median"] * 1000 for _, r in pts],
                            yerr=[[(r["add_port_latency_s"]["median"] -
                                    r["add_port_latency_s"]["min"]) * 1000 for _, r in pts],
                                  [(r["add_port_latency_s"]["max"] -
                                    r["add_port_latency_s"]["median"]) * 1000 for _, r in pts]],
                            fmt="o-", color=f"C{i}", capsize=3, label=variant)
        ax.axhline(ADD_PORT_P50_S * 1000, color="red", linestyle=":", label="goal p50 30 ms")
        ax.set(xscale="log", yscale="log", xlabel="ports", ylabel="ms",
               title="one port added: netlink event -> committed (agent)")
        ax.legend(fontsize=7)
        ax = axes[2]
        for i, (backend, by_workload) in enumerate(sorted(engine.items())):
            pts = sorted((_ports_of(n), r) for n, r in by_workload.items()
                         if "-m" not in n and "steps" in r)
            for style, step in (("o-", "rule_change"), ("^--", "member_add"),
                                ("v:", "add_port")):
                if pts:
                    ax.plot([p for p, _ in pts],
                            [median(r["steps"][step]["total_s"]) * 1000 for _, r in pts],
                            style, color=f"C{i}", label=f"{step} {backend}")
        ax.axhline(RULE_S * 1000, color="red", linestyle=":", label="goal rule change 50 ms")
        ax.axhline(MEMBER_S * 1000, color="orange", linestyle=":", label="goal member 10 ms")
        ax.set(xscale="log", yscale="log", xlabel="ports", ylabel="ms",
               title="incremental steps (in process: compile + apply)")
        ax.legend(fontsize=6, ncol=2)
        fig.suptitle(_caption(results), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "apply_vs_ports.png", dpi=110)
        plt.close(fig)
        written.append("apply_vs_ports.png")
    for key, rate, ylabel, title, name in (
            ("datapath", "received_pps", "kpps received",
             "64-byte UDP across the bridge (iperf3)", "datapath_pps.png"),
            ("newflows", "accepted_fps", "thousand new flows/s accepted",
             "new flows across the bridge (a datagram per fresh source port)",
             "newflows_fps.png")):
        if _series_plot(plt, results, key, rate, ylabel, title, out / name):
            written.append(name)
    return written


def _series_plot(plt: Any, results: dict[str, Any], key: str, rate: str, ylabel: str,
                 title: str, path: Path) -> bool:
    """A rate by ports programmed, per backend, with its no-rules line; False when no data."""
    series = results.get(key, {})
    if not any("programmed" in r for r in series.values()):
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (backend, res) in enumerate(sorted(series.items())):
        if "programmed" not in res:
            continue
        pts = sorted((int(c), s[rate]) for c, s in res["programmed"].items())
        ax.errorbar([c for c, _ in pts], [s["median"] / 1000 for _, s in pts],
                    yerr=[[(s["median"] - s["min"]) / 1000 for _, s in pts],
                          [(s["max"] - s["median"]) / 1000 for _, s in pts]],
                    fmt="o-", color=f"C{i}", capsize=3, label=f"hostfw {backend}")
        ax.axhline(res["no_rules"][rate]["median"] / 1000, color=f"C{i}",
                   linestyle=":", alpha=0.6, label=f"no rules ({backend} run)")
    ax.set(xscale="log", xlabel="ports programmed", ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.suptitle(_caption(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _caption(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    v = results.get("versions", {})
    return (f"{m.get('os')}, kernel {m.get('kernel')}, {m.get('cpus')} CPUs "
            f"({m.get('cpu_model')}); hostfw {v.get('hostfw_commit')}; "
            f"{results.get('started_at', '')}")
