"""The packet tracer (agent/trace.py) on compiled rulesets: no kernel needed.

Policies are parsed by agent.model.parse_policy and compiled by the real
compiler, so these tests walk exactly the rules the agent would write.
tests/e2e/test_trace_diff.py checks the same verdicts against real packets.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.compiler import NatSettings, Settings, Snapshot, compile_ruleset
from agent.compiler.spoof import eui64_link_local
from agent.model import Policy, parse_policy
from agent.trace import (
    ACCEPT,
    CONTINUE,
    DROP,
    UNDECIDED,
    Packet,
    Probe,
    Trace,
    resolve,
    trace,
)
from agent.vocab.rule_text import parse_rule_text
from agent.vocab.ruleset import Hook, Ruleset, Table

MAC = {"web": "fa:16:3e:00:00:02", "client": "fa:16:3e:00:00:03",
       "outsider": "fa:16:3e:00:00:04", "quiet": "fa:16:3e:00:00:05"}
DEVICES = frozenset({"tapweb", "tapclient", "tapoutsider", "tapquiet", "tapstranger"})
BRIDGES = {device: "br0" for device in DEVICES}


def rule(direction: str, protocol: str | None = None, port: int | None = None,
         **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"direction": direction, "ethertype": extra.pop("ethertype", "IPv4")}
    if protocol:
        out["protocol"] = protocol
    if port is not None:
        out.update(port_range_min=port, port_range_max=port)
    return {**out, **extra}


def vm(name: str, ip: str, *groups: str, **extra: Any) -> dict[str, Any]:
    return {"id": f"port-{name}", "device": f"tap{name}", "mac_address": MAC.get(name,
            "fa:16:3e:00:00:99"), "fixed_ips": [ip], "security_groups": list(groups), **extra}


RAW_POLICY = {
    "security_groups": {
        "sg-web": [rule("ingress", "tcp", 80),
                   rule("ingress", "tcp", 5432, remote_group_id="sg-client"),
                   rule("egress"), rule("egress", ethertype="IPv6")],
        "sg-client": [rule("ingress", "icmp"), rule("egress"), rule("egress", ethertype="IPv6")],
        "sg-quiet": [rule("ingress", "udp", 53, stateful=False),
                     rule("egress", stateful=False)],
    },
    "ports": [vm("web", "10.0.0.2", "sg-web") | {"fixed_ips": ["10.0.0.2", "fd00::2"]},
              vm("client", "10.0.0.3", "sg-client"),
              vm("outsider", "10.0.0.4", "sg-web"),
              vm("quiet", "10.0.0.5", "sg-quiet"),
              vm("remote", "10.0.0.9", "sg-client")],   # a member on another node
    "sg_member_ips": {"sg-client": {"IPv4": [["10.0.0.3", None], ["10.0.0.9", None]]}},
}
POLICY: Policy = parse_policy(RAW_POLICY)
RULESET: Ruleset = compile_ruleset(Snapshot(POLICY, DEVICES, Settings(), BRIDGES,
                                            {"br0": 4097})).ruleset


def probe(port: str, proto: str, **fields: Any) -> tuple[Trace, Packet]:
    packet = resolve(Probe(port, proto, **fields), POLICY, DEVICES, BRIDGES).packet
    return trace(RULESET, packet), packet


def effects(result: Trace) -> list[tuple[str, str]]:
    return [(step.chain, step.effect) for step in result.steps]


def profiles(result: Trace) -> list[str]:
    """The profile chains a trace went through, in order (their names are digests)."""
    return list(dict.fromkeys(s.chain for s in result.steps
                              if s.chain.startswith(("hostfw-pi", "hostfw-pe"))))


def test_policy_parsed_cleanly() -> None:
    assert POLICY.errors == ()


# ---------------------------------------------------------------- verdicts

def test_allowed_tcp_port_is_accepted_through_the_group_chain_and_the_mark() -> None:
    result, packet = probe("tapweb", "tcp", src="10.0.0.3", dport=80)
    assert (packet.hook, packet.physdev_in, packet.physdev_out) == \
        ("FORWARD", "tapclient", "tapweb")
    assert result.verdict == ACCEPT
    assert result.reason == "accepted in filter/hostfw-sg-chain (both ends passed)"
    steps = effects(result)
    egress, ingress = profiles(result)
    assert egress.startswith("hostfw-pe4-") and ingress.startswith("hostfw-pi4-")
    i = steps.index(("hostfw-gi4-sg-web", "go to hostfw-accept"))
    assert steps[i - 5:i] == [("hostfw-iweb", f"go to {ingress}"),
                              (ingress, "jump to hostfw-common-i4"),
                              ("hostfw-common-i4", "mark is now 0x0"),
                              ("hostfw-common-i4", f"end of chain, back to {ingress}"),
                              (ingress, "jump to hostfw-gi4-sg-web")]
    assert steps[i + 1:i + 4] == [("hostfw-accept", "mark is now 0x1000000"),
                                  ("hostfw-accept", f"end of chain, back to {ingress}"),
                                  (ingress, "RETURN to hostfw-sg-chain")]
    returned = result.steps[i + 3].rule or ""
    assert "-m mark --mark 0x1000000/0x1000000" in returned
    # The group rule that allowed it is the one for port 80.
    assert "--dport 80" in (result.steps[i].rule or "")


def test_closed_port_is_dropped_by_the_fallback() -> None:
    result, _ = probe("tapweb", "tcp", src="10.0.0.3", dport=81)
    assert result.verdict == DROP
    ingress = profiles(result)[-1]
    assert effects(result)[-3:] == [("hostfw-gi4-sg-web", f"end of chain, back to {ingress}"),
                                    (ingress, "jump to hostfw-sg-fallback"),
                                    ("hostfw-sg-fallback", DROP)]
    assert "default drop for unmatched traffic" in result.reason


def test_unknown_device_is_dropped_by_the_dispatch_tree() -> None:
    result, packet = probe("tapstranger", "icmp", direction="egress", src="10.0.0.77",
                           dst="10.0.0.3")
    assert packet.physdev_in == "tapstranger" and packet.src_mac is None
    assert result.verdict == DROP
    last = result.steps[-1]
    assert (last.chain, last.effect) == ("hostfw-from", DROP)
    assert "unknown device" in result.reason


def test_remote_group_member_is_accepted_and_a_non_member_dropped() -> None:
    member, _ = probe("tapweb", "tcp", src="10.0.0.3", dport=5432)
    assert member.verdict == ACCEPT
    assert any("--match-set hfw4gsg-client src" in (s.rule or "") for s in member.steps)
    stranger, _ = probe("tapweb", "tcp", src="10.0.0.4", dport=5432)
    assert stranger.verdict == DROP
    # A member on another node arrives from outside and is admitted by the ipset too.
    remote, packet = probe("tapweb", "tcp", src="10.0.0.9", dport=5432)
    assert packet.physdev_in is None and remote.verdict == ACCEPT
    assert probe("tapweb", "tcp", src="10.0.0.50", dport=5432)[0].verdict == DROP


def test_spoofed_source_is_dropped_by_the_port_chain() -> None:
    honest, _ = probe("tapweb", "udp", direction="egress", dst="10.0.0.3", dport=9999)
    assert honest.verdict == DROP  # sg-client does not open 9999, but the spoof check passed
    assert "allowed IP and MAC pair" in (honest.steps[effects(honest).index(
        ("hostfw-oweb", f"go to {profiles(honest)[0]}"))].rule or "")
    forged, _ = probe("tapweb", "udp", direction="egress", src="10.0.0.200", dst="10.0.0.3",
                      dport=9999)
    assert forged.verdict == DROP
    assert effects(forged)[-2:] == [("hostfw-oweb", "go to hostfw-bad-source4"),
                                    ("hostfw-bad-source4", DROP)]
    assert forged.reason == "dropped in filter/hostfw-bad-source4 (spoofed source)"
    assert profiles(forged) == []  # no group rule, no known session looked at
    wrong_mac, _ = probe("tapweb", "icmp", direction="egress", dst="10.0.0.3",
                         src_mac="fa:16:3e:99:99:99")
    assert wrong_mac.steps[-1].chain == "hostfw-bad-source4" and wrong_mac.verdict == DROP
    right_mac, _ = probe("tapweb", "icmp", direction="egress", dst="10.0.0.3")
    assert right_mac.verdict == ACCEPT


def test_a_known_session_is_accepted_without_walking_any_group() -> None:
    """The fast path: after the sender's pair, the shared checks accept it."""
    reply, _ = probe("tapweb", "tcp", direction="egress", dst="10.0.0.3", sport=80,
                     dport=40000, ctstate="ESTABLISHED")
    assert reply.verdict == ACCEPT
    assert not any(s.chain.startswith(("hostfw-gi", "hostfw-ge")) for s in reply.steps)
    assert [s.chain for s in reply.steps if "known session" in (s.rule or "")] == \
        ["hostfw-common-e4", "hostfw-common-i4"]
    # tcp/81 is open in no group: NEW is dropped, the established reply is not.
    assert probe("tapclient", "tcp", src="10.0.0.2", dport=81)[0].verdict == DROP
    assert probe("tapclient", "tcp", src="10.0.0.2", dport=81,
                 ctstate="ESTABLISHED")[0].verdict == ACCEPT


def test_a_forged_known_session_stops_at_the_senders_pairs() -> None:
    """outsider forges client's address on client's established flow to web."""
    forged, _ = probe("tapweb", "tcp", src="10.0.0.3", dport=80, peer="tapoutsider",
                      ctstate="ESTABLISHED")
    assert forged.verdict == DROP
    assert effects(forged)[-2:] == [("hostfw-ooutsider", "go to hostfw-bad-source4"),
                                    ("hostfw-bad-source4", DROP)]
    assert not any("known session" in (s.rule or "") for s in forged.steps)


def test_ipv6_neighbour_discovery_is_allowed_and_echo_is_not() -> None:
    client_ll = eui64_link_local(MAC["client"])
    solicit, packet = probe("tapweb", "icmpv6", src=client_ll, dst="ff02::1:ff00:2",
                            icmp_type=135)
    assert packet.proto == "ipv6-icmp" and packet.physdev_in is None  # found by fixed IP only
    assert solicit.verdict == ACCEPT
    assert any("neighbour discovery and MLD" in (s.rule or "") for s in solicit.steps)
    # From the client's own link-local address through its IPv6 spoof chain.
    from_client, _ = probe("tapweb", "icmp", src=client_ll, dst="ff02::1:ff00:2",
                           icmp_type=135, peer="tapclient")
    assert from_client.verdict == ACCEPT
    assert effects(from_client)[8:10] == [("hostfw-from", "go to hostfw-oclient"),
                                         ("hostfw-oclient",
                                           f"go to {profiles(from_client)[0]}")]
    assert "-s fe80::" in (from_client.steps[9].rule or "")
    echo, packet = probe("tapweb", "icmp", src="fd00::77")
    assert (packet.proto, packet.icmp_type, echo.verdict) == ("ipv6-icmp", 128, DROP)


def test_icmp_allowed_by_the_receiving_group() -> None:
    ping, packet = probe("tapclient", "icmp", src="10.0.0.2")
    assert (packet.icmp_type, ping.verdict) == (8, ACCEPT)
    assert probe("tapweb", "icmp", src="10.0.0.3")[0].verdict == DROP


def test_either_end_describes_the_same_packet() -> None:
    ingress, to_web = probe("tapweb", "tcp", src="10.0.0.3", dport=80)
    egress, from_client = probe("tapclient", "tcp", direction="egress", dst="10.0.0.2",
                                dport=80)
    assert to_web == from_client
    assert ingress == egress


def test_traffic_to_the_node_crosses_input_and_the_egress_chain() -> None:
    allowed, packet = probe("tapweb", "udp", direction="egress", dst="10.0.0.1", dport=53,
                            peer="node")
    assert (packet.hook, packet.physdev_out) == ("INPUT", None)
    assert allowed.verdict == CONTINUE  # hostfw let it through; INPUT's own rules decide
    assert ("hostfw-INPUT", "jump to hostfw-from") in effects(allowed)
    stranger, _ = probe("tapstranger", "udp", direction="egress", src="10.0.0.77",
                        dst="10.0.0.1", dport=53, peer="node")
    assert stranger.verdict == DROP
    from_node, packet = probe("tapweb", "tcp", src="10.0.0.1", dport=81, peer="node")
    assert (packet.hook, from_node.verdict) == ("OUTPUT", CONTINUE)


def test_stateless_group_is_not_tracked() -> None:
    query, packet = probe("tapquiet", "udp", src="10.0.0.50", sport=40000, dport=53,
                          ctstate="ESTABLISHED")
    assert query.verdict == ACCEPT
    assert effects(query)[1:4] == [
        ("hostfw-PREROUTING", "not tracked: conntrack state UNTRACKED"),
        ("hostfw-PREROUTING", "jump to hostfw-zone-in"),
        # Only the first CT rule a packet meets counts: the bridge's zone rule does nothing.
        ("hostfw-zone-in", "no effect: an earlier CT rule already set this packet's "
                           "conntrack")]
    # Without tracking an "established" reply has no session to ride on.
    reply, _ = probe("tapquiet", "udp", src="10.0.0.50", sport=40000, dport=54,
                     ctstate="ESTABLISHED")
    assert reply.verdict == DROP


def test_established_reply_rides_on_conntrack() -> None:
    reply, _ = probe("tapweb", "tcp", src="10.0.0.3", sport=81, dport=40000,
                     ctstate="ESTABLISHED")
    assert reply.verdict == ACCEPT
    assert any("known session" in (s.rule or "") for s in reply.steps)


def test_with_nat_on_bridged_traffic_is_decided_and_translation_is_refused() -> None:
    nat = NatSettings(fixed_range="10.0.0.0/24", routing_source_ip="203.0.113.1",
                      metadata_host="127.0.0.1", dhcp_bridges=("br0",))
    ruleset = compile_ruleset(Snapshot(POLICY, DEVICES, Settings(nat=nat), BRIDGES,
                                       {"br0": 4097})).ruleset

    def verdict(probe_: Probe) -> Trace:
        return trace(ruleset, resolve(probe_, POLICY, DEVICES, BRIDGES).packet)

    assert verdict(Probe("tapweb", "tcp", src="10.0.0.3", dport=80)).verdict == ACCEPT
    assert verdict(Probe("tapweb", "tcp", src="10.0.0.3", dport=81)).verdict == DROP
    dns = verdict(Probe("tapweb", "udp", direction="egress", dst="10.0.0.1", dport=53,
                        peer="node"))
    assert (dns.verdict, dns.reason) == \
        (ACCEPT, "accepted in filter/hostfw-network-accept (a service of this node)")
    metadata = verdict(Probe("tapweb", "tcp", direction="egress", dst="169.254.169.254",
                             dport=80))
    assert metadata.verdict == UNDECIDED and "target REDIRECT" in metadata.reason


# ---------------------------------------------------------------- walker semantics

def table(hooks: list[str], builtin: str = "FORWARD", **chains: list[str]) -> Ruleset:
    """A filter table from rules in iptables-save notation; `hooks` are `-j <chain>`."""
    return Ruleset({(4, "filter"): Table(
        4, "filter", {k.replace("_", "-"): tuple(parse_rule_text(r) for r in v)
                      for k, v in chains.items()},
        tuple(Hook(builtin, h.removeprefix("-j ")) for h in hooks))})


PLAIN = Packet(hook="FORWARD", family=4, proto="tcp", src="10.0.0.3", dst="10.0.0.2",
               dport=80, physdev_in="tapclient", physdev_out="tapweb", in_iface="br0",
               out_iface="br0", src_mac=MAC["client"])


def test_goto_returns_to_the_last_jump_not_to_the_goto() -> None:
    ruleset = table(["-j hostfw-a", "-j hostfw-z"],
                    hostfw_a=["-g hostfw-b", "-j DROP"],
                    hostfw_b=["-j hostfw-c", "-j RETURN", "-j DROP"],
                    hostfw_c=["-p udp -j DROP"],
                    hostfw_z=["-j ACCEPT"])
    result = trace(ruleset, PLAIN)
    assert effects(result) == [
        ("FORWARD", "jump to hostfw-a"),
        ("hostfw-a", "go to hostfw-b"),
        ("hostfw-b", "jump to hostfw-c"),
        ("hostfw-c", "end of chain, back to hostfw-b"),
        ("hostfw-b", "RETURN to FORWARD"),      # hostfw-a's DROP is never reached
        ("FORWARD", "jump to hostfw-z"),
        ("hostfw-z", ACCEPT),
    ]
    assert result.verdict == ACCEPT


def test_falling_off_our_hooks_continues() -> None:
    result = trace(table(["-j hostfw-a"], hostfw_a=["-s 192.0.2.0/24 -j DROP"]), PLAIN)
    assert result.verdict == CONTINUE
    assert "the rest of filter/FORWARD" in result.reason


def test_mark_is_set_with_xmark_semantics() -> None:
    ruleset = table(["-j hostfw-a"], hostfw_a=[
        "-j MARK --set-xmark 0x3/0xff", "-j MARK --set-xmark 0x0/0x1",
        "-m mark ! --mark 0x2/0x2 -j DROP", "-m mark --mark 0x2/0xff -j ACCEPT"])
    result = trace(ruleset, replace(PLAIN, mark=0x100))
    assert [e for _, e in effects(result)][1:3] == ["mark is now 0x103", "mark is now 0x102"]
    assert result.verdict == ACCEPT


def test_unknown_match_module_cannot_be_decided_unless_another_condition_fails() -> None:
    ruleset = table(["-j hostfw-a"], hostfw_a=[
        "-p udp -m hashlimit --hashlimit-upto 5/sec -j DROP",     # tcp: cannot match anyway
        "-m hashlimit --hashlimit-upto 5/sec -j ACCEPT"])
    result = trace(ruleset, PLAIN)
    assert result.verdict == UNDECIDED
    assert "-m hashlimit is not modelled" in result.reason
    assert result.steps[-1].effect.startswith("cannot decide")


def test_unknown_target_cannot_be_decided() -> None:
    result = trace(table(["-j hostfw-a"], hostfw_a=["-j LOG --log-prefix x"]), PLAIN)
    assert result.verdict == UNDECIDED
    assert "target LOG --log-prefix x is neither modelled" in result.reason


def test_what_the_packet_description_lacks_is_not_guessed() -> None:
    no_mac = trace(RULESET, replace(PLAIN, src_mac=None))
    assert no_mac.verdict == UNDECIDED
    assert "MAC address is not known" in no_mac.reason
    source_port = table(["-j hostfw-a"], hostfw_a=["-p tcp -m tcp --sport 2000 -j DROP"])
    assert trace(source_port, PLAIN).verdict == UNDECIDED         # any unprivileged port
    assert trace(source_port, replace(PLAIN, sport=2001)).verdict == CONTINUE
    privileged = table(["-j hostfw-a"], hostfw_a=["-p tcp -m tcp --sport 68 -j DROP"])
    assert trace(privileged, PLAIN).verdict == CONTINUE


def test_physdev_follows_the_kernel() -> None:
    ruleset = table(["-j hostfw-a"], "INPUT", hostfw_a=[
        "-m physdev --physdev-out tapweb -j DROP",          # output port unknown at INPUT: true
    ])
    to_node = replace(PLAIN, hook="INPUT", physdev_out=None, out_iface=None)
    assert trace(ruleset, to_node).verdict == DROP
    from_node = replace(PLAIN, hook="OUTPUT", physdev_in=None, physdev_out=None)
    only_negated = table(["-j hostfw-a"], "OUTPUT", hostfw_a=[
        "-m physdev --physdev-is-bridged -j DROP", "-m physdev ! --physdev-in tap+ -j ACCEPT",
    ])
    assert trace(only_negated, from_node).verdict == ACCEPT
    uplink = table(["-j hostfw-a"], hostfw_a=["-m physdev --physdev-in eth+ -j DROP"])
    assert trace(uplink, replace(PLAIN, physdev_in=None)).verdict == UNDECIDED


# ---------------------------------------------------------------- resolving a probe

@pytest.mark.parametrize(("fields", "message"), [
    ({"port": "nope"}, "no port with id or device 'nope'"),
    ({"direction": "sideways"}, "direction 'sideways'"),
    ({"proto": "any"}, "'any' cannot be traced"),
    ({"src": None}, "give --src or --dst"),
    ({"dst": "fd00::2"}, "different families"),
    ({"peer": "tapweb"}, "the peer is the traced port itself"),
    ({"src": None, "dst": "10.0.0.2", "peer": "tapstranger"}, "has no IPv4 address"),
])
def test_resolve_says_what_is_wrong(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"port": "tapweb", "proto": "tcp", "src": "10.0.0.3"}
    with pytest.raises(ValueError, match=message):
        resolve(Probe(**{**base, **fields}), POLICY, DEVICES, BRIDGES)


def test_resolve_finds_a_port_that_is_not_on_this_node() -> None:
    absent = parse_policy({**RAW_POLICY, "ports": [*RAW_POLICY["ports"],
                                                  vm("gone", "10.0.0.8", "sg-web")]})
    with pytest.raises(ValueError, match="has no device on this node"):
        resolve(Probe("port-gone", "tcp", src="10.0.0.3"), absent, DEVICES, BRIDGES)
