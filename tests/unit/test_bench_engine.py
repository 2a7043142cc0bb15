"""bench/engine_bench.py's cache reset: a "cold" sample must compile from nothing."""

from __future__ import annotations

from agent.compiler import compile_ruleset
from agent.model import parse_policy
from bench import engine_bench

POLICY = {
    "security_groups": {"sg-web": [{"direction": "ingress", "ethertype": "IPv4",
                                    "protocol": "tcp", "port_range_min": 80,
                                    "port_range_max": 80},
                                   {"direction": "egress", "ethertype": "IPv4"}]},
    "ports": [{"id": "6f1c2a4e-0000-0000-0000-000000000001", "device": "tap6f1c2a4e-00",
               "mac_address": "fa:16:3e:00:00:01", "fixed_ips": ["10.0.0.5"],
               "security_groups": ["sg-web"]}],
}


def _filter_table(snapshot: object) -> object:
    return compile_ruleset(snapshot).ruleset.tables[(4, "filter")]  # type: ignore[arg-type]


def test_the_same_input_reuses_the_memoised_tables() -> None:
    """The premise: without a reset, a second compile hands back the very same table."""
    snap = engine_bench.snapshot(parse_policy(POLICY, strict=True), ["tap6f1c2a4e-00"])
    assert _filter_table(snap) is _filter_table(snap)


def test_clear_caches_empties_the_last_call_memos() -> None:
    snap = engine_bench.snapshot(parse_policy(POLICY, strict=True), ["tap6f1c2a4e-00"])
    first = _filter_table(snap)
    engine_bench.clear_caches()
    second = _filter_table(snap)
    assert second is not first
    assert second == first
