"""The end-to-end bench's pure parts: reading a probe stream, the logs, the policy it writes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from agent.model import parse_policy
from bench import e2e, e2e_net

ACTION = 100.0


def _stream(answered: set[int], count: int = 20, start: float = 99.9, step: float = 0.01
            ) -> tuple[list[float], list[tuple[int, float, float]]]:
    sent = [start + i * step for i in range(count)]
    return sent, [(i, sent[i], sent[i] + 0.0005) for i in sorted(answered)]


def test_an_allow_is_seen_at_the_first_echo_after_the_action() -> None:
    _, replies = _stream({15, 16})
    got = min(r[2] for r in replies)
    assert e2e_net.through_latency(replies, ACTION, got)["latency_s"] == got - ACTION


def test_an_allow_that_had_already_happened_is_an_error() -> None:
    _, replies = _stream({5, 15})
    assert "error" in e2e_net.through_latency(replies, ACTION, replies[-1][2])


def test_a_block_is_the_first_loss_that_lasts() -> None:
    # 0-9 before the action, all answered; a lone loss at 12 is noise; cut from 15 on.
    sent, replies = _stream(set(range(10)) | {10, 11, 13, 14})
    res = e2e_net.cut_latency(sent, replies, ACTION)
    assert abs(res["latency_s"] - (sent[15] - ACTION)) < 1e-9
    assert res["lost_before_cut"] == 1


def test_a_block_needs_the_stream_flowing_before_and_cut_at_the_end() -> None:
    sent, replies = _stream(set())
    assert "error" in e2e_net.cut_latency(sent, replies, ACTION)
    sent, replies = _stream(set(range(20)))
    assert "error" in e2e_net.cut_latency(sent, replies, ACTION)


def test_breakdown_reads_pulls_applies_and_the_controller_reload() -> None:
    agent = [(ACTION + 0.05, "123 INFO agent.sources.rpc [-] pulled 3 devices in 0.007 s (x)"),
             (ACTION + 0.07, "123 INFO hostfw.agent [writer] applied generation 7: "
                             "['filter/v4'], 1 chains, 9 lines, ipset +0/-0, 0.012 s, "
                             "in_sync=True"),
             (ACTION - 5, "old line")]
    controller = [(ACTION + 0.03, "INFO hostfw.controller reload (change): 1 rule, 0 member")]
    out = e2e_net.breakdown(agent, controller, ACTION, ACTION + 1)
    assert out["controller_reload_at_s"] == 0.03
    assert out["pulls"] == [{"at_s": 0.05, "devices": 3, "seconds": 0.007}]
    assert out["applies"][0]["seconds"] == 0.012
    assert out["applies"][0]["lines"] == 9
    assert len(out["lines"]) == 2


def test_the_empty_tables_script_keeps_builtins_and_drops_our_chains() -> None:
    saved = ("# Generated\n*filter\n:INPUT DROP [3:4]\n:FORWARD ACCEPT [0:0]\n"
             ":hostfw-FORWARD - [0:0]\n-A FORWARD -j hostfw-FORWARD\nCOMMIT\n")
    assert e2e_net._empty_tables_script(saved) == (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n")
    assert e2e_net._empty_tables_script("") == ""


def _vm(name: str, host: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, port_id=f"e2e-{name}-0000", tap=f"tape2e{name}",
                           mac=f"fa:16:3e:00:00:{host:02x}", ipv4=f"10.251.0.{host}")


def test_the_scenario_writes_a_clean_policy_with_each_change() -> None:
    workload = {
        "security_groups": {"sg-default": [{"direction": "ingress", "ethertype": "IPv4",
                                            "remote_group_id": "sg-default"}]},
        "ports": [{"id": "w-1", "device": "tapw1", "mac_address": "fa:16:3e:00:01:01",
                   "fixed_ips": ["10.0.0.5"], "security_groups": ["sg-default"]}],
        "sg_member_ips": {"sg-default": {"IPv4": ["10.0.0.5"]}},
    }
    vms = {n: _vm(n, i + 2) for i, n in enumerate(("srv", "cli", "plug", "rm"))}
    scen = e2e.Scenario(workload, vms)
    base = parse_policy(scen.doc(), strict=True)
    assert not base.errors
    scen.rules, scen.members, scen.rm_bound = 2, 1, False
    changed = parse_policy(scen.doc(), strict=True)
    assert not changed.errors
    assert len(changed.groups["sg-default"]) == len(base.groups["sg-default"]) + 2
    assert {p.device for p in base.ports} - {p.device for p in changed.ports} == {"tape2erm"}
    assert "10.251.0.200/32" in changed.members["sg-default"][4]
    assert workload["sg_member_ips"]["sg-default"]["IPv4"] == ["10.0.0.5"]   # not mutated


def test_an_interruption_is_counted_until_the_stream_flows_for_good() -> None:
    sent, replies = _stream(set(range(12)) | {14, 17, 18, 19})
    out = e2e_net.interruption(sent, replies, ACTION)
    assert out["lost"] == 4                       # 12, 13, 15, 16
    assert abs(out["back_s"] - (sent[17] - ACTION)) < 1e-3
    sent, replies = _stream(set(range(20)))
    assert e2e_net.interruption(sent, replies, ACTION) == {"lost": 0}


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fresh", [False, True], ids=["one-flow", "fresh-flows"])
def test_the_probe_streams_numbered_datagrams_and_reports_their_echoes(fresh: bool) -> None:
    """bench/e2e_probe.py over loopback: every echo is reported with its send time."""
    port = _free_udp_port()
    echo = subprocess.Popen([sys.executable, e2e_net.PROBE, "echo", "--udp", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "READY"
        argv = [sys.executable, e2e_net.PROBE, "stream", "127.0.0.1", str(port)]
        argv += ["--fresh", "--sport-base", str(_free_udp_port())] if fresh else []
        stream = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert stream.stdout is not None and stream.stdout.readline().strip() == "READY"
        time.sleep(0.2)
        out, _ = stream.communicate("", timeout=10)
    finally:
        echo.kill()
        echo.wait()
    lines = out.splitlines()
    sent = json.loads(lines[-1].removeprefix("S "))
    replies = [line.split() for line in lines[:-1]]
    assert len(sent) > 5
    assert replies and all(r[0] == "R" for r in replies)
    for _, seq, when, got in replies:
        assert abs(sent[int(seq)] - float(when)) < 1e-5
        assert float(got) >= float(when)
