"""The new-flows series' pure parts, and the quiet wait's reading of the agent."""

from __future__ import annotations

import struct

import pytest

from agent.reconciler import CHECK_DELAY
from bench import newflows, programmed, report
from bench.__main__ import parse_args
from bench.stats import summary


def test_a_datagram_is_a_udp_header_from_the_fresh_port_to_the_bench_port() -> None:
    data = newflows.datagram(40000, programmed.BENCH_PORT, payload=64)
    sport, dport, length, checksum = struct.unpack("!HHHH", data[:8])
    assert (sport, dport, length, checksum) == (40000, programmed.BENCH_PORT, 72, 0)
    assert len(data) == length


def test_a_burst_is_every_unprivileged_source_port_when_conntrack_has_room() -> None:
    ports = newflows.burst_ports(262144, 10)
    assert (ports.start, ports.stop, len(ports)) == (1024, 65536, 64512)


def test_a_burst_shrinks_to_the_room_conntrack_has_left() -> None:
    ports = newflows.burst_ports(20000, 5000)
    assert len(ports) == 20000 - 5000 - newflows.CONNTRACK_SPARE
    assert ports.start == 1024


def test_a_full_conntrack_table_is_an_error_not_a_rate() -> None:
    with pytest.raises(RuntimeError, match="no room in conntrack"):
        newflows.burst_ports(2000, 1500)


def test_the_rate_is_the_flows_over_the_time_of_all_bursts() -> None:
    got = newflows.rates([(64512, 64512, 0.5), (64512, 32256, 1.0)])
    assert got["sent_fps"] == pytest.approx(129024 / 1.5)
    assert got["accepted_fps"] == pytest.approx(96768 / 1.5)
    assert got["accepted_percent"] == pytest.approx(75.0)
    assert got["flows"] == 129024


def test_proc_stat_ticks_survive_a_name_with_spaces_and_parens() -> None:
    # pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17) ...
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0",
              "7", "3", "20", "5", "20", "0", "4"]
    assert programmed.stat_ticks(f"4242 (hostfw (x) a) {' '.join(fields)}") == 7 + 3 + 20 + 5


def test_the_read_back_is_due_check_delay_after_the_last_apply() -> None:
    assert programmed.read_back_due({"last_apply_ok_at": 1000.0}) == 1000.0 + CHECK_DELAY
    assert programmed.read_back_due({"last_apply_ok_at": None}) is None


def test_summaries_keep_the_keys_every_sample_has_and_drop_the_overlap_mark() -> None:
    got = programmed.summaries([{"a": 1.0, "b": 2.0}, {"a": 3.0, "overlapped": 1.0}])
    assert set(got) == {"a"}
    assert got["a"]["median"] == 2.0


def test_the_ratio_is_the_largest_count_over_the_smallest() -> None:
    rows = {"2": {"r": summary([100.0, 120.0, 110.0])},
            "1000": {"r": summary([80.0, 90.0, 99.0])}}
    assert programmed.ratio(rows, [2, 1000], "r") == round(90.0 / 110.0, 3)
    assert programmed.ratio({"2": {"r": summary([0.0])}, "9": rows["1000"]}, [2, 9], "r") is None


def test_newflows_is_a_default_section_and_follows_the_datapath_counts() -> None:
    args = parse_args([])
    assert "newflows" in args.sections.split(",")
    assert args.newflows_counts == args.datapath_counts == [2, 10, 100, 1000]
    quick = parse_args(["--quick"])
    assert (quick.newflows_counts, quick.newflows_repeats) == ([2, 10], 1)
    assert parse_args(["--newflows-counts", "2,100"]).newflows_counts == [2, 100]


def _newflows_result(low: float, high: float) -> dict:
    def rates(fps: float) -> dict:
        return {"accepted_fps": summary([fps]), "accepted_percent": summary([100.0])}

    return {"counts": [2, 1000], "no_rules": rates(180000.0),
            "programmed": {"2": rates(low), "1000": rates(high)},
            "ratio_max_over_min": round(high / low, 3), "overlapped": 0}


@pytest.mark.parametrize(("high", "met"), [(85000.0, True), (70000.0, False)])
def test_the_newflows_row_judges_the_ratio_against_80_percent(high: float, met: bool) -> None:
    rows = [r for r in report.verdicts({"newflows": {"iptables-nft":
                                                     _newflows_result(100000.0, high)}})
            if r["workload"] == "newflows"]
    assert [(r["backend"], r["ours"], r["met"]) for r in rows] == \
        [("iptables-nft", round(high / 100000.0, 3), met)]
    assert "1000 ports programmed vs 2" in rows[0]["what"]
    assert "| newflows |" in report.markdown(rows)


def test_a_failed_newflows_run_is_a_missed_row_naming_the_error() -> None:
    rows = report.verdicts({"newflows": {"iptables-legacy": {"error": "OSError: boom"}}})
    assert [(r["met"], r["note"]) for r in rows] == [(False, "OSError: boom")]


def test_samples_that_overlapped_the_agent_are_named_in_the_row() -> None:
    result = {**_newflows_result(100000.0, 90000.0), "overlapped": 2}
    row, = report.verdicts({"newflows": {"iptables-nft": result}})
    assert row["note"].endswith("; 2 samples overlapped the agent's work")
