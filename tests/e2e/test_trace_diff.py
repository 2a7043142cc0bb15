"""End to end: `agent-ctl trace` agrees with real packets, `agent-ctl diff` with the kernel.

The real hostfw-agent manages a node namespace (tests/support/topology.py);
for each probe the trace's verdict, asked from both ends of the packet, must
be what a real connection or ping through the node's kernel does. `diff` must
see tampering exactly and leave it in place: only a resync repairs.
Every namespace is deleted by the `topology` fixture, even on failure, and
every test checks the root namespace's firewall stayed untouched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import VM, Topology, ping, serve, tcp_connect

pytestmark = pytest.mark.kernel

FAIL = 0.4  # seconds a probe that must fail may take


def port(vm: VM, *groups: str) -> dict[str, Any]:
    return {"id": vm.port_id, "device": vm.tap, "mac_address": vm.mac,
            "fixed_ips": [vm.ipv4] + ([vm.ipv6] if vm.ipv6 else []),
            "security_groups": list(groups)}


def policy(web: VM, client: VM, outsider: VM) -> dict[str, Any]:
    return {
        "security_groups": {
            "sg-web": [
                {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                 "port_range_min": 80, "port_range_max": 80},
                {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                 "port_range_min": 5432, "port_range_max": 5432,
                 "remote_group_id": "sg-client"},
                {"direction": "egress", "ethertype": "IPv4"},
                {"direction": "egress", "ethertype": "IPv6"},
            ],
            "sg-client": [
                {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp"},
                {"direction": "egress", "ethertype": "IPv4"},
                {"direction": "egress", "ethertype": "IPv6"},
            ],
        },
        "ports": [port(web, "sg-web"), port(client, "sg-client"), port(outsider, "sg-web")],
    }


@pytest.fixture
def sandbox(topology: Topology, tmp_path) -> Iterator[tuple[Topology, AgentProcess]]:
    web, client, outsider = (topology.add_vm(n) for n in ("web", "client", "outsider"))
    topology.add_vm("stranger")  # plugged, in no policy: an unknown device
    # A long resync interval: drift checks come rarely, so tampering stays for diff to see.
    agent = AgentProcess(tmp_path, topology.node.ns, policy(web, client, outsider),
                         resync_interval=3600)
    try:
        agent.start()
        agent.wait_for(lambda: topology.vms["stranger"].tap in
                       agent.status()["unknown_devices"], what="the unknown device")
        yield topology, agent
    finally:
        agent.stop()
        assert_root_clean()


def trace(agent: AgentProcess, *args: str) -> dict[str, Any]:
    reply = json.loads(agent.ctl("trace", *args, "--json").stdout)
    assert reply["ok"], reply
    return reply


# ---------------------------------------------------------------- trace

def test_trace_verdicts_match_real_packets(sandbox) -> None:
    topo, agent = sandbox
    web, client, outsider, stranger = (topo.vms[n] for n in
                                       ("web", "client", "outsider", "stranger"))
    serve(web, tcp=[80, 81, 5432])
    node = topo.node
    # (receiver, sender, trace options, what real packets do)
    probes: list[tuple[VM, VM, list[str], Callable[[], bool]]] = [
        (web, client, ["--proto", "tcp", "--dport", "80"],
         lambda: tcp_connect(client, web.ipv4, 80)),
        (web, client, ["--proto", "tcp", "--dport", "81"],
         lambda: tcp_connect(client, web.ipv4, 81, timeout=FAIL)),
        (client, web, ["--proto", "icmp"], lambda: ping(web, client.ipv4)),
        (web, client, ["--proto", "icmp"], lambda: ping(client, web.ipv4, timeout=FAIL)),
        (web, client, ["--proto", "tcp", "--dport", "5432"],
         lambda: tcp_connect(client, web.ipv4, 5432)),
        (web, outsider, ["--proto", "tcp", "--dport", "5432"],
         lambda: tcp_connect(outsider, web.ipv4, 5432, timeout=FAIL)),
        (client, stranger, ["--proto", "icmp"], lambda: ping(stranger, client.ipv4,
                                                             timeout=FAIL)),
    ]
    for receiver, sender, options, real in probes:
        family_ips = ["--src", sender.ipv4, "--dst", receiver.ipv4]
        to_it = trace(agent, receiver.tap, *family_ips, *options,
                      *(["--peer", sender.tap] if sender is stranger else []))
        from_it = trace(agent, sender.tap, "--direction", "egress", *family_ips, *options)
        assert to_it["verdict"] == from_it["verdict"], (options, to_it, from_it)
        assert to_it["verdict"] in ("ACCEPT", "DROP"), to_it
        passed = real()
        assert passed == (to_it["verdict"] == "ACCEPT"), \
            (f"{sender.name} -> {receiver.name} {options}: trace says {to_it['verdict']} "
             f"({to_it['reason']}), real packets {'pass' if passed else 'do not pass'}")

    # IPv6: sg-client lets in ICMP over IPv4 only.
    v6 = trace(agent, client.tap, "--src", web.ipv6 or "", "--dst", client.ipv6 or "",
               "--proto", "icmp")
    assert (v6["packet"]["proto"], v6["verdict"]) == ("ipv6-icmp", "DROP")
    assert not ping(web, client.ipv6 or "", timeout=FAIL)

    # To the node itself: hostfw checks the sender, the node's INPUT (ACCEPT here) does the rest.
    for sender, expected in ((client, "CONTINUE"), (stranger, "DROP")):
        to_node = trace(agent, sender.tap, "--direction", "egress", "--src", sender.ipv4,
                        "--dst", node.ipv4, "--peer", "node", "--proto", "icmp")
        assert to_node["verdict"] == expected, to_node
        assert ping(sender, node.ipv4, timeout=1.0 if expected != "DROP" else FAIL) == \
            (expected == "CONTINUE")


def test_trace_human_output_and_errors(sandbox) -> None:
    topo, agent = sandbox
    web, client = topo.vms["web"], topo.vms["client"]
    text = agent.ctl("trace", web.port_id, "--proto", "tcp", "--src", client.ipv4,
                     "--dport", "81").stdout
    assert f"from     port {client.port_id} ({client.tap})" in text
    assert " filter/hostfw-sg-fallback: DROP\n" in text
    assert text.rstrip().endswith("verdict: DROP (dropped in filter/hostfw-sg-fallback "
                                  "(default drop for unmatched traffic))")
    bad = agent.ctl("trace", "nope", "--proto", "tcp", "--src", client.ipv4, check=False)
    assert bad.returncode == 1
    assert "no port with id or device 'nope'" in bad.stderr
    usage = agent.ctl("trace", web.tap, "--src", client.ipv4, check=False)
    assert usage.returncode == 2  # --proto is required


# ---------------------------------------------------------------- diff

def diff(agent: AgentProcess) -> tuple[dict[str, Any], str]:
    """The socket's answer (what `diff --json` prints) and the CLI's text."""
    return agent.request({"command": "diff"}), agent.ctl("diff").stdout


def generation(agent: AgentProcess) -> int:
    return agent.request({"command": "status"})["generation"]


def quiet_window(agent: AgentProcess, still: float = 1.5, timeout: float = 60.0) -> None:
    """Return once no apply ran for `still` s.

    With no change and a long resync interval the agent does not touch the
    kernel: the read-back after a write comes 1 s after it (agent/reconciler.py
    CHECK_DELAY), and the next full re-read is an hour away. So after a quiet
    `still` there is time to tamper and diff before anything repairs.
    """
    deadline = time.monotonic() + timeout
    last, since = generation(agent), time.monotonic()
    while time.monotonic() < deadline:
        now_generation = generation(agent)
        if now_generation != last:
            last, since = now_generation, time.monotonic()
        elif time.monotonic() - since >= still:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no quiet window within {timeout} s\n{agent.log()}")


def tamper_and_diff(agent: AgentProcess, tamper: Callable[[], Any],
                    evidence: Callable[[], Any]) -> tuple[dict[str, Any], str, Any]:
    """Tamper, diff, read the kernel back, with no apply in between.

    Every apply bumps `generation`; an unchanged generation proves that only
    `diff` ran between the tampering and the read-back.
    """
    quiet_window(agent)
    before = generation(agent)
    tamper()
    reply, text = diff(agent)
    seen = evidence()
    assert generation(agent) == before, "an apply ran in the quiet window"
    return reply, text, seen


def test_diff_is_empty_in_sync_and_shows_tampering_without_repairing_it(sandbox) -> None:
    topo, agent = sandbox
    web, client = topo.vms["web"], topo.vms["client"]
    reply, text = diff(agent)
    assert (reply["in_sync"], reply["tables"], reply["ipsets"]) == (True, [], [])
    assert text.startswith("no changes")

    chain = "hostfw-i" + web.tap[3:]
    reply, text, saved = tamper_and_diff(
        agent, lambda: topo.node.run(["iptables-legacy", "-F", chain]), agent.save)
    assert reply["in_sync"] is False and reply["ipsets"] == []
    [table] = reply["tables"]
    assert (table["table"], table["hooks_inserted"], table["hooks_deleted"]) == \
        ("ipv4/filter", [], [])
    [change] = table["chains"]
    assert (change["chain"], change["action"], change["kernel"]) == (chain, "rewrite", [])
    assert change["desired"] and all(f"-A {chain} {r}" in table["script"]
                                     for r in change["desired"])
    assert f"=== ipv4/filter {chain}: rewrite" in text
    assert sum(line.startswith(f"+-A {chain} ") for line in text.splitlines()) == \
        len(change["desired"])
    assert f"-A {chain} " not in saved          # diff wrote nothing: still flushed
    agent.resync()
    assert diff(agent)[0]["in_sync"] is True

    member = f"{client.ipv4}/32"
    reply, text, listed = tamper_and_diff(
        agent, lambda: topo.node.run(["ipset", "del", "hfw4gsg-client", client.ipv4]),
        lambda: topo.node.run(["ipset", "list", "hfw4gsg-client"]).stdout)
    assert reply["tables"] == []
    assert reply["ipsets"] == [{"name": "hfw4gsg-client", "create": False, "rebuild": False,
                                "destroy": False, "add": [member], "del": []}]
    assert text.splitlines() == ["=== ipset hfw4gsg-client: members", f"+{member}"]
    assert client.ipv4 not in listed             # still missing after diff
    agent.ctl("resync", "--wait")
    assert diff(agent)[0]["in_sync"] is True
    assert client.ipv4 in topo.node.run(["ipset", "list", "hfw4gsg-client"]).stdout
