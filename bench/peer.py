"""The peer: Neutron's own iptables firewall driver on the same workloads.

Rules of this room:

1. Run live only when a Python with neutron importable is at hand (a venv
   the peer harness documents, e.g. /tmp/neutron-venv); installing neutron
   is not this benchmark's business.
2. Otherwise quote the figures measured earlier on this machine with the
   same harness (peers/neutron_results/*.json, summarised in
   peers/neutron_results.md), labelled as quoted: they are not from this run.
3. The peer's steps map to ours: full_sync -> cold apply, add_port ->
   add_port, sg_rule_update -> rule_change, sg_member_add -> member_add,
   remove_port -> port_remove. Its backends map as nft -> iptables-nft and
   legacy -> iptables-legacy; iptc writes legacy tables, so it is held
   against the legacy figures.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from bench.workloads import PEERS

STEP_MAP = {"full_sync": "cold", "add_port": "add_port", "sg_rule_update": "rule_change",
            "sg_member_add": "member_add", "remove_port": "port_remove"}
BACKEND_MAP = {"iptables-nft": "nft", "iptables-legacy": "legacy", "iptc": "legacy"}
QUOTED_FILES = {("nft", 50): "nft_50.json", ("nft", 200): "nft_200.json",
                ("nft", 1000): "nft_1000.json", ("legacy", 50): "legacy_50.json",
                ("legacy", 200): "legacy_200.json", ("legacy", 1000): "legacy_1000.json"}
# neutron_results.md, main and variant tables (median s), should the JSON files be missing.
QUOTED_MEDIANS = {
    ("nft", 50): {"full_sync": 0.374, "add_port": 0.206, "sg_rule_update": 0.229,
                  "sg_member_add": 0.235, "remove_port": 0.270},
    ("nft", 200): {"full_sync": 1.057, "add_port": 1.316, "sg_rule_update": 1.186,
                   "sg_member_add": 1.164, "remove_port": 1.356},
    ("nft", 1000): {"full_sync": 5.626, "add_port": 14.490, "sg_rule_update": 16.843,
                    "sg_member_add": 17.978, "remove_port": 20.182},
    ("legacy", 50): {"full_sync": 0.214, "add_port": 0.192, "sg_rule_update": 0.204,
                     "sg_member_add": 0.219, "remove_port": 0.196},
    ("legacy", 200): {"full_sync": 0.756, "add_port": 1.078, "sg_rule_update": 1.160,
                      "sg_member_add": 1.245, "remove_port": 1.236},
    ("legacy", 1000): {"full_sync": 4.385, "add_port": 13.736, "sg_rule_update": 15.171,
                       "sg_member_add": 16.328, "remove_port": 21.627},
}
VENV_CANDIDATES = ("/tmp/neutron-venv/bin/python", "/work/neutron-venv/bin/python",
                   "/opt/neutron-venv/bin/python")


def find_python() -> str | None:
    """A Python that can import neutron's firewall driver, or None."""
    candidates = [os.environ.get("HOSTFW_NEUTRON_PYTHON", "")]
    candidates += [str(PEERS / d / "bin" / "python") for d in ("venv", ".venv", "neutron-venv")]
    candidates += list(VENV_CANDIDATES)
    for python in filter(None, candidates):
        if not os.path.exists(python):
            continue
        probe = subprocess.run([python, "-c", "import neutron.agent.linux.iptables_firewall"],
                               capture_output=True, timeout=120)
        if probe.returncode == 0:
            return python
    return None


def run_live(python: str, workload_file: Path, backend: str, sync_repeats: int, repeats: int,
             timeout: float) -> dict[str, Any]:
    """One run of the peer harness; its per-step timings mapped to our step names."""
    proc = subprocess.run([python, str(PEERS / "neutron_fw_bench.py"), str(workload_file),
                           "--backend", backend, "--sync-repeats", str(sync_repeats),
                           "--repeats", str(repeats), "--timeout", str(int(timeout))],
                          capture_output=True, text=True, timeout=timeout * sync_repeats + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"neutron_fw_bench.py failed: {proc.stderr[-1500:]}")
    data = json.loads(proc.stdout)
    return {"timings_s": _mapped(data["timings_s"]), "versions": data.get("versions"),
            "counts_after_full_sync": data.get("counts_after_full_sync"),
            "outer_wall_s": data.get("outer_wall_s")}


def quoted() -> dict[str, Any]:
    """The earlier figures: {backend: {ports: {our step: {median, min, max, n}}}}."""
    out: dict[str, Any] = {}
    source = "peers/neutron_results/*.json"
    for (backend, ports), name in QUOTED_FILES.items():
        path = PEERS / "neutron_results" / name
        try:
            timings = json.loads(path.read_text())["timings_s"]
        except (OSError, ValueError, KeyError):
            timings = {step: {"median": value, "min": None, "max": None, "n": None}
                       for step, value in QUOTED_MEDIANS[(backend, ports)].items()}
            source = "peers/neutron_results.md (medians only)"
        out.setdefault(backend, {})[str(ports)] = _mapped(timings)
    return {"mode": "quoted",
            "label": "Neutron 29.0.0 IptablesFirewallDriver (ipset on), measured earlier on "
                     "this machine with peers/neutron_fw_bench.py; quoted, not from this run",
            "source": source, "figures": out}


def _mapped(timings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for step, ours in STEP_MAP.items():
        if timings.get(step):
            stats = timings[step]
            out[ours] = {k: stats.get(k) for k in ("median", "min", "max", "n")}
    return out


def figure(peer: dict[str, Any], backend: str, ports: int, step: str) -> dict[str, Any] | None:
    """The peer's figure for our backend, size and step, if it measured that."""
    by_size = peer.get("figures", {}).get(BACKEND_MAP.get(backend, ""), {})
    return by_size.get(str(ports), {}).get(step)
