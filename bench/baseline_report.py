"""The baseline section's verdict rows and its before/after table (issue 13's goals).

Rules of this room: reads the results dict only, like bench/report.py, so
`python -m bench --report-only` re-judges an old latest.json.
"""

from __future__ import annotations

from typing import Any

from bench.stats import median

RULES_MAX = 23_000          # 1/3 of Neutron's 69,098 at 1,000 ports
COLD_RATIO_MAX = 0.5        # half of today's cold start
JUDGED_PORTS = 1000
LABELS = {"rules": "rules in the kernel after the cold apply",
          "cold_apply_s": "cold apply in process (parse+compile+apply, taps present)",
          "e2e_in_sync_s": "e2e cold start: agent spawned -> in sync",
          "e2e_enforced_s": "e2e cold start: agent spawned -> enforced (first packet dropped)"}


def _row(what: str, workload: str, backend: str, ours: float | None, unit: str, goal: str,
         met: bool | None, note: str = "") -> dict[str, Any]:
    return {"what": what, "workload": workload, "backend": backend, "ours": ours, "unit": unit,
            "spread": "", "floor": None, "neutron": None, "goal": goal, "met": met,
            "note": note}


def _value(fig: dict[str, Any], tree: str) -> float | None:
    return median(fig.get(tree))


def rows(baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Rules (<= 23,000) and cold start (<= 0.5x the baseline), per backend."""
    if not baseline:
        return []
    rev = baseline.get("rev")
    if "skipped" in baseline:
        return [_row(f"before/after against {rev}", "-", "-", None, "x", "(measure)", None,
                     note=f"skipped: {baseline['skipped']}")]
    out = []
    for backend, res in baseline.get("backends", {}).items():
        workload = f"w{res.get('ports', baseline.get('ports'))}"
        if "error" in res:
            out.append(_row(f"before/after against {rev}", workload, backend, None, "x",
                            "(measure)", False, note=res["error"][:200]))
            continue
        judged = res["ports"] == JUDGED_PORTS
        rules = res["rules"]
        ours = _value(rules, "head")
        out.append(_row(LABELS["rules"], workload, backend, ours, "rules",
                        f"<= {RULES_MAX:,}", None if not judged or ours is None
                        else ours <= RULES_MAX,
                        note=f"{rev}: {_fmt_count(_value(rules, 'base'))}, ratio "
                             f"{_fmt_ratio(rules['ratio'])}"))
        for name in ("cold_apply_s", "e2e_in_sync_s", "e2e_enforced_s"):
            fig = res[name]
            ratio = fig["ratio"]
            out.append(_row(f"{LABELS[name]}, against {rev}", workload, backend, ratio, "x",
                            f"<= {COLD_RATIO_MAX:g}x {rev}",
                            None if not judged or ratio is None else ratio <= COLD_RATIO_MAX,
                            note=f"head {_fmt_s(_value(fig, 'head'))}, {rev} "
                                 f"{_fmt_s(_value(fig, 'base'))}; medians of "
                                 f"{_n(fig)} interleaved pairs"))
    return out


def _n(fig: dict[str, Any]) -> str:
    head, base = fig.get("head"), fig.get("base")
    return f"{head['n'] if head else 0}/{base['n'] if base else 0}"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _fmt_count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(baseline: dict[str, Any]) -> str:
    """The before/after table for latest.md; empty when the section did not run."""
    if not baseline:
        return ""
    rev = baseline.get("rev")
    head = baseline.get("head_rev") or "working tree"
    out = [f"## Before/after: working tree ({head[:10]}) against {rev}", ""]
    if "skipped" in baseline:
        return "\n".join(out + [f"Skipped: {baseline['skipped']}", ""])
    out += [f"{baseline.get('ports')} ports of the peer workload; medians of "
            f"{baseline.get('repeats')} interleaved repeats (head, base, head, base ...).", "",
            "| backend | figure | head | base | head/base |",
            "| --- | --- | --- | --- | --- |"]
    for backend, res in baseline.get("backends", {}).items():
        if "error" in res:
            out.append(f"| {backend} | error | {res['error'][:120]} | | |")
            continue
        for name, label in LABELS.items():
            fig = res[name]
            fmt = _fmt_count if name == "rules" else _fmt_s
            out.append(f"| {backend} | {label} | {fmt(_value(fig, 'head'))} | "
                       f"{fmt(_value(fig, 'base'))} | {_fmt_ratio(fig['ratio'])} |")
    return "\n".join(out) + "\n"
