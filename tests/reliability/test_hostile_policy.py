"""Hostile policies and hostile neighbours, judged in the kernel (issue 14).

Each case once broke the whole node, not just the object at fault:

- a stateless port with the allowed address pair 0.0.0.0/0 untracked every
  IPv4 packet of the node, so stateful ports lost their replies;
- a stateless port's address untracked the same address on every bridge, so
  another tenant reusing it lost its return traffic;
- a rule with ports but no port protocol (`{ingress, port_range_min: 22}`)
  rendered as allow-all;
- a remote group over the kernel's default ipset size (65,536) made the one
  `ipset restore` of every apply fail, so no other change landed;
- sets of other tools sharing the ipset prefix (`hfw-allow`, `hfwd_ports`)
  were destroyed, and one of a type the agent does not parse killed the
  writer thread.

Every test runs its own agent (iptables-legacy: the raw-table and ipset
behaviour under test does not depend on the backend) in a fresh topology.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.dataplane.engine import Engine
from agent.dataplane.restore_backend import RestoreBackend
from agent.model import parse_policy
from agent.sources.policy_file import derive_members
from agent.vocab.names import Names
from tests.reliability.support import vm_port
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.in_netns import call_in_netns
from tests.support.topology import VM, Topology, serve, tcp_connect

pytestmark = pytest.mark.kernel

PORT = 7301
PASS = 3.0
STATELESS = [{"direction": "ingress", "protocol": "tcp", "port_range_min": PORT,
              "stateful": False},
             {"direction": "egress", "protocol": "tcp", "stateful": False}]
SERVER = [{"direction": "ingress", "protocol": "tcp", "port_range_min": PORT},
          {"direction": "egress"}]
CLIENT = [{"direction": "egress"}]


def start_agent(tmp_path: Path, topo: Topology, policy: dict[str, Any],
                extra_conf: str = "") -> AgentProcess:
    agent = AgentProcess(tmp_path, topo.node.ns, policy, extra_conf=extra_conf)
    agent.start()
    return agent


def conntrack_lines(topo: Topology, dst: str) -> list[str]:
    out = topo.node.run(["conntrack", "-L", "-p", "tcp", "-d", dst, "--dport", str(PORT)],
                        check=False).stdout
    return [line for line in out.splitlines() if f"dport={PORT}" in line]


def on_bridge(topo: Topology, vm: VM, bridge: str) -> None:
    """Move `vm`'s tap to `bridge` (created, up, when missing)."""
    if topo.node.run(["ip", "link", "show", bridge], check=False).returncode:
        topo.node.run(["ip", "link", "add", bridge, "type", "bridge"])
        topo.node.run(["ip", "link", "set", bridge, "up"])
    topo.node.run(["ip", "link", "set", vm.tap, "master", bridge])


def test_stateless_port_with_allowed_pair_0_0_0_0_0_untracks_only_itself(
        topology: Topology, tmp_path: Path) -> None:
    """A stateless port s holds the allowed address pair 0.0.0.0/0. The
    stateful client b still reaches server c, because c's reply is tracked
    (ESTABLISHED admits it at b); the flow has its conntrack entry; the raw
    table reads back as written, so the agent is in sync and a second
    resync writes nothing.
    """
    s = topology.add_vm("s", ipv6=None)
    b = topology.add_vm("b", ipv6=None)
    c = topology.add_vm("c", ipv6=None)
    server = serve(c, tcp=[PORT])
    policy = {"security_groups": {"sl": STATELESS, "cl": CLIENT, "sv": SERVER},
              "ports": [{**vm_port(s, "sl"), "allowed_address_pairs": [
                  {"ip_address": "0.0.0.0/0"}]}, vm_port(b, "cl"), vm_port(c, "sv")]}
    agent = start_agent(tmp_path, topology, policy)
    try:
        assert tcp_connect(b, c.ipv4, PORT, PASS), agent.log()
        assert conntrack_lines(topology, c.ipv4), "the stateful flow was not tracked"
        agent.resync()
        assert agent.status()["in_sync"]
        agent.resync()
        written = agent.request({"command": "status"})["last_apply"]["tables_written"]
        assert not any(t.startswith("raw/") for t in written), written
    finally:
        server.stop()
        agent.stop()
        assert_root_clean()


def test_a_tenant_reusing_a_stateless_ports_address_on_another_bridge_keeps_its_replies(
        topology: Topology, tmp_path: Path) -> None:
    """Tenant 1's stateless port s has 10.0.0.5 on br0. Tenant 2's stateful
    server z has 10.0.0.5 too, on br1, and its client w connects to it: the
    connection completes and is tracked, in br1's zone. s's own flow stays
    untracked (its client r, on br0, has no port security).
    """
    s = topology.add_vm("s", ipv4="10.0.0.5", ipv6=None)
    r = topology.add_vm("r", ipv4="10.0.0.6", ipv6=None)
    z = topology.add_vm("z", ipv4="10.0.0.5", ipv6=None)
    w = topology.add_vm("w", ipv4="10.0.0.7", ipv6=None)
    for vm in (z, w):
        on_bridge(topology, vm, "br1")
    servers = [serve(z, tcp=[PORT]), serve(s, tcp=[PORT])]
    policy = {"security_groups": {"sl": STATELESS, "cl": CLIENT, "sv": SERVER},
              "ports": [vm_port(s, "sl"), {**vm_port(r), "port_security_enabled": False},
                        vm_port(z, "sv"),
                        vm_port(w, "cl")]}
    agent = start_agent(tmp_path, topology, policy)
    try:
        assert tcp_connect(w, "10.0.0.5", PORT, PASS), agent.log()
        entries = conntrack_lines(topology, "10.0.0.5")
        assert entries and all("zone=" in line for line in entries), entries
        topology.node.run(["conntrack", "-D", "-p", "tcp", "--dport", str(PORT)], check=False)
        assert tcp_connect(r, "10.0.0.5", PORT, PASS), "the stateless port lost its traffic"
        assert conntrack_lines(topology, "10.0.0.5") == [], "the stateless flow was tracked"
        assert agent.status()["in_sync"]
    finally:
        for server in servers:
            server.stop()
        agent.stop()
        assert_root_clean()


# ---------------------------------------------------------------- rules

@pytest.mark.parametrize("protocol", [None, "any", "0", "gre"])
def test_ports_without_a_port_protocol_open_nothing(topology: Topology, tmp_path: Path,
                                                    protocol: str | None) -> None:
    """`{ingress, port_range_min: 22}` (or with protocol any, 0, gre) is
    rejected naming the rule, so c stays closed on every port; the group's
    other rule (tcp 7301) still works."""
    b = topology.add_vm("b", ipv6=None)
    c = topology.add_vm("c", ipv6=None)
    server = serve(c, tcp=[22, PORT, PORT + 1])
    bad: dict[str, Any] = {"direction": "ingress", "port_range_min": 22, "port_range_max": 22}
    if protocol is not None:
        bad["protocol"] = protocol
    policy = {"security_groups": {"cl": CLIENT, "sv": [SERVER[0], bad]},
              "ports": [vm_port(b, "cl"), vm_port(c, "sv")]}
    agent = start_agent(tmp_path, topology, policy)
    try:
        errors = agent.status()["errors"]
        assert any("security group 'sv' rule 1 has a port range" in e for e in errors), errors
        assert tcp_connect(b, c.ipv4, PORT, PASS)
        assert not tcp_connect(b, c.ipv4, PORT + 1, 0.5)
        assert not tcp_connect(b, c.ipv4, 22, 0.5)
    finally:
        server.stop()
        agent.stop()
        assert_root_clean()


# ---------------------------------------------------------------- ipsets

def write_json_policy(agent: AgentProcess, policy: dict[str, Any]) -> None:
    """The policy as JSON (a YAML dump of 70,000 addresses takes seconds)."""
    tmp = agent.policy_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(policy))
    os.replace(tmp, agent.policy_path)


def ipset_header(topo: Topology, name: str) -> str:
    return topo.node.run(["ipset", "list", "-t", name]).stdout


def ipset_count(topo: Topology, name: str) -> int:
    header = ipset_header(topo, name)
    return int(header.split("Number of entries:")[1].split()[0])


def big_group_policy(members: int, extra_rule: bool = False) -> dict[str, Any]:
    web = [{"direction": "ingress", "protocol": "tcp", "port_range_min": 22,
            "remote_group_id": "big"}]
    if extra_rule:
        web.append({"direction": "ingress", "protocol": "tcp", "port_range_min": 8443})
    return {"security_groups": {"web": web, "big": []},
            "ports": [{"id": "p1", "device": "tapbig1", "mac_address": "fa:16:3e:00:00:01",
                       "fixed_ips": ["10.0.0.2"], "security_groups": ["web"]}],
            "sg_member_ips": {"big": {"IPv4": [
                f"10.{64 + (i >> 16)}.{i >> 8 & 255}.{i & 255}" for i in range(members)]}}}


def test_a_group_of_70000_members_lands_with_the_default_settings(
        topology: Topology, tmp_path: Path) -> None:
    """The kernel's default maxelem is 65,536: the set is created big enough,
    the apply succeeds, and a later change elsewhere lands too."""
    topology.add_tap("tapbig1")
    agent = AgentProcess(tmp_path, topology.node.ns, {})
    write_json_policy(agent, big_group_policy(70000))
    agent.start()
    try:
        agent.resync(timeout=120)
        status = agent.status()
        assert status["in_sync"] and not status["errors"], (status, agent.log())
        assert ipset_count(topology, "hfw4gbig") == 70000
        assert "maxelem 262144" in ipset_header(topology, "hfw4gbig")
        write_json_policy(agent, big_group_policy(70000, extra_rule=True))
        agent.resync(timeout=60)
        assert "--dport 8443" in agent.save(4)
    finally:
        agent.stop()
        assert_root_clean()


def run_in_writer(ns: str, fn: Callable[[Engine], Any], engine: list[Engine]) -> Any:
    """`fn(engine)` on a thread inside `ns`, as the daemon's writer runs it."""
    def body() -> Any:
        if not engine:
            engine.append(Engine(RestoreBackend("iptables-legacy"), Names(), (4,)))
        return fn(engine[0])
    return call_in_netns(ns, body)


def compiled(raw: dict[str, Any], limit: int) -> Any:
    policy = parse_policy(raw)
    policy = replace(policy, members=derive_members(policy.ports, policy.members))
    return compile_ruleset(Snapshot(policy, frozenset({"tapbig1"}), Settings(
        enable_ipv6=False, max_set_members=limit)))


def test_a_group_over_the_limit_is_refused_alone_and_other_changes_land(
        topology: Topology) -> None:
    """With a limit of 1,000 (the setting; the default is 1,048,576): the
    group of 1,500 gets an empty set, so its rule matches nothing, the error
    names it, and a new rule and a new group's members in the same apply are
    in the kernel. The dns set, made by hand with maxelem 2, is rebuilt and
    swapped in under the rule that uses it when it needs a third member.
    """
    ns, engine = topology.node.ns, []
    # Someone made the dns group's set with room for 2: 3 members must not fail.
    topology.node.run(["ipset", "create", "hfw4gdns", "hash:net", "maxelem", "2"])
    raw = big_group_policy(500)
    raw["security_groups"]["web"].append({"direction": "ingress", "protocol": "udp",
                                          "port_range_min": 53, "remote_group_id": "dns"})
    raw["sg_member_ips"]["dns"] = {"IPv4": ["10.9.0.1", "10.9.0.2"]}
    raw["security_groups"]["dns"] = []
    first = compiled(raw, 1000)
    assert first.errors == ()
    run_in_writer(ns, lambda e: e.apply(first.ruleset), engine)
    assert ipset_count(topology, "hfw4gbig") == 500 and ipset_count(topology, "hfw4gdns") == 2

    grown = big_group_policy(1500, extra_rule=True)
    grown["security_groups"]["web"] += raw["security_groups"]["web"][1:]
    grown["security_groups"]["dns"] = []
    grown["sg_member_ips"]["dns"] = {"IPv4": ["10.9.0.1", "10.9.0.2", "10.9.0.3"]}
    second = compiled(grown, 1000)
    assert [e.split(":")[0] for e in second.errors] == ["security group 'big'"]
    report = run_in_writer(ns, lambda e: e.apply(second.ruleset, refresh=True, verify=True),
                           engine)
    assert report.in_sync
    assert ipset_count(topology, "hfw4gbig") == 0
    assert ipset_count(topology, "hfw4gdns") == 3
    assert "maxelem 65536" in ipset_header(topology, "hfw4gdns")  # swapped in under its rule
    assert "~" not in topology.node.run(["ipset", "list", "-n"]).stdout
    saved = topology.node.run(["iptables-legacy-save"]).stdout
    assert "--dport 8443" in saved and "--match-set hfw4gdns src" in saved


FOREIGN_SETS = {"hfw-allow": ("hash:net", "192.0.2.0/24"),
                "hfwd_ports": ("hash:ip,port", "10.0.0.1,tcp:22"),
                "hfwbits": ("bitmap:port range 0-1024", "22")}


def test_foreign_sets_sharing_the_prefix_are_never_touched(
        topology: Topology, tmp_path: Path) -> None:
    """Another tool's sets named hfw-allow (hash:net), hfwd_ports
    (hash:ip,port) and hfwbits (a type the agent does not parse) outlive the
    agent's applies and resyncs with their members, and the agent is in sync.
    """
    for name, (kind, member) in FOREIGN_SETS.items():
        topology.node.run(["ipset", "create", name, *kind.split()])
        topology.node.run(["ipset", "add", name, member])
    b = topology.add_vm("b", ipv6=None)
    c = topology.add_vm("c", ipv6=None)
    policy = {"security_groups": {"cl": CLIENT, "sv": [
                  {"direction": "ingress", "protocol": "tcp", "port_range_min": PORT,
                   "remote_group_id": "cl"}]},
              "ports": [vm_port(b, "cl"), vm_port(c, "sv")]}
    agent = start_agent(tmp_path, topology, policy)
    try:
        agent.resync()
        agent.resync()
        assert agent.status()["in_sync"], agent.log()
        saved = topology.node.run(["ipset", "save"]).stdout
        for name, (_, member) in FOREIGN_SETS.items():
            assert f"add {name} {member}" in saved, (name, saved, agent.log())
        assert "hfw4gcl" in saved
    finally:
        agent.stop()
    saved = topology.node.run(["ipset", "save"]).stdout
    for name in FOREIGN_SETS:
        assert f"create {name} " in saved
    assert_root_clean()
