"""The end-to-end series' rows of the verdict table (issue 12's goals).

Rules of this room: reads the results dict only, like bench/report.py, so
`python -m bench --report-only` re-judges an old latest.json.
"""

from __future__ import annotations

from typing import Any

from bench.stats import median

CHANGE_P50_S = 0.100   # every change at 1,000 ports, both modes
COLD_OVER_FLOOR = 1.5
CHANGES = {
    "rule_add": "rule added to a group -> first packet through",
    "member_add": "member added to a remote group -> first packet through",
    "port_add": "tap plugged -> first packet through",
    "port_remove": "port removed from the policy -> first packet dropped",
    "port_bound": "port back in the policy (tap present) -> first packet through",
}


def _row(what: str, workload: str, backend: str, ours: float | None, unit: str, goal: str,
         met: bool | None, spread: str = "", floor: float | None = None,
         note: str = "") -> dict[str, Any]:
    return {"what": what, "workload": workload, "backend": backend, "ours": ours, "unit": unit,
            "spread": spread, "floor": floor, "neutron": None, "goal": goal, "met": met,
            "note": note}


def _spread(summ: dict[str, Any] | None) -> str:
    if not summ:
        return ""
    return f"{summ['min'] * 1000:.0f}-{summ['max'] * 1000:.0f} ms (n={summ['n']})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def rows(e2e: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per change and size and mode, plus cold start and the member-add writes."""
    out: list[dict[str, Any]] = []
    for variant, by_size in e2e.items():
        mode, _, backend = variant.partition(" ")
        for size, res in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            workload = f"w{size}"
            if "error" in res:
                out.append(_row(f"e2e {mode}", workload, backend, None, "s", "", False,
                                note=res["error"][:200]))
                continue
            trigger = f"; trigger {res['trigger']}" if mode == "standalone" else ""
            for change, label in CHANGES.items():
                got = res.get("changes", {}).get(change)
                if not got:
                    continue
                lat = got["latency_s"]
                p50 = median(lat)
                goal = "(measure)" if change == "port_bound" else "p50 <= 100 ms"
                met = None if change == "port_bound" or p50 is None else p50 <= CHANGE_P50_S
                note = (f"p90 {_ms(lat and lat['p90'])}; apply {_ms(median(got['apply_s']))}"
                        + (f", pull {_ms(median(got['pull_s']))}" if got["pull_s"] else "")
                        + trigger + (f"; {len(got['errors'])} failed" if got["errors"] else ""))
                out.append(_row(f"e2e {mode}: {label}", workload, backend, p50, "s", goal, met,
                                _spread(lat), note=note))
            member = res.get("changes", {}).get("member_add")
            if member:
                lines = [a["lines"] for s in member["samples"]
                         for a in s.get("breakdown", {}).get("applies", [])]
                out.append(_row(f"e2e {mode}: member add, iptables lines written", workload,
                                backend, max(lines) if lines else None, "lines", "0",
                                max(lines) == 0 if lines else None,
                                note=f"{len(lines)} applies logged"))
            cold = res.get("cold_start", {})
            floor = res.get("floor", {})
            own = floor.get("iptables-legacy" if backend == "iptc" else backend, {})
            floor_s = median(own.get("total_s"))
            ratio = res.get("cold_over_floor")
            other = {m: median(f.get("total_s")) for m, f in floor.items()
                     if isinstance(f, dict) and "total_s" in f}
            out.append(_row(f"e2e {mode}: cold start to in sync", workload, backend,
                            median(cold.get("in_sync_s")), "s",
                            f"<= {COLD_OVER_FLOOR:g}x the restore floor",
                            None if ratio is None else ratio <= COLD_OVER_FLOOR,
                            _spread(cold.get("in_sync_s")), floor_s,
                            note=f"{ratio}x; enforced {_ms(median(cold.get('enforced_s')))}; "
                                 f"allowed flows cut {max(cold.get('allowed_lost') or [0])} "
                                 f"packets, back {_ms(median(cold.get('allowed_back_s')))}; "
                                 "floors " + ", ".join(f"{m} {v:.2f} s"
                                                       for m, v in other.items() if v)))
    return out
