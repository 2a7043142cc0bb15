"""The compiler: golden rulesets for a few ports, and the properties that make it scale.

Why: the compiler is where Neutron's semantics become iptables text. The
golden tests pin whole chains (reviewed line by line against Neutron's
layout, research/neutron.md 1.3-1.7), so any change of order or wording is a
visible diff. The property tests pin what the layout promises: names fit the
kernel and carry our prefixes, compiles are deterministic, a rule change
touches one group's chains only, and the dispatch trees find every device.

Goldens compare the rules' rendered text (`IptablesRule.text`), which is
what iptables-save prints for them.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import pytest

from agent.compiler import Compiled, Settings, Snapshot, compile_ruleset
from agent.compiler import filter as filter_module
from agent.compiler.dispatch import FANOUT
from agent.dataplane.plan import parse_save
from agent.model import Policy, parse_policy
from agent.sources.policy_file import derive_members
from agent.vocab.names import MAX_CHAIN, MAX_IPSET, Names
from agent.vocab.rules import IptablesRule, call, jump, ports
from agent.vocab.ruleset import Ruleset

TARGET = re.compile(r" -[jg] (\S+)")
PHYSDEV = re.compile(r"-m physdev --physdev-(in|out) (\S+)")
BUILTIN_TARGETS = {"ACCEPT", "DROP", "RETURN", "REJECT", "MARK", "CT", "LOG", "DNAT", "SNAT",
                   "MASQUERADE", "REDIRECT", "NOTRACK"}


# ---------------------------------------------------------------- helpers

def load(doc: Mapping[str, Any]) -> Policy:
    """Parse a policy dict as the policy file does (members derived), insisting it is clean."""
    policy = parse_policy(doc)
    assert policy.errors == ()
    return replace(policy, members=derive_members(policy.ports, policy.members))


def compile_doc(doc: Mapping[str, Any], devices: Iterable[str],
                settings: Settings | None = None) -> Compiled:
    return compile_ruleset(Snapshot(load(doc), frozenset(devices), settings or Settings()))


def chains(compiled: Compiled, family: int, table: str = "filter") -> dict[str, list[str]]:
    return {name: [r.text for r in rules]
            for name, rules in compiled.ruleset.tables[(family, table)].chains.items()}


def chain_diff(a: Ruleset, b: Ruleset) -> set[tuple[int, str, str]]:
    """(family, table, chain) of every chain that differs or exists on one side only."""
    out = set()
    for key in set(a.tables) | set(b.tables):
        left = a.tables[key].chains if key in a.tables else {}
        right = b.tables[key].chains if key in b.tables else {}
        out |= {(*key, name) for name in set(left) | set(right)
                if left.get(name) != right.get(name)}
    return out


def rule_dict(direction: str = "ingress", ethertype: str = "IPv4", **kw: Any) -> dict[str, Any]:
    return {"direction": direction, "ethertype": ethertype, **kw}


def port_dict(port_id: str, n: int, groups: list[str], **kw: Any) -> dict[str, Any]:
    return {"id": port_id, "device": f"tap{port_id}", "mac_address": f"fa:16:3e:00:01:{n:02x}",
            "fixed_ips": [f"10.0.1.{n}", f"2001:db8:1::{n:x}"], "security_groups": groups, **kw}


# ---------------------------------------------------------------- golden: v4 + v6 port

WEB_PORT = "5e4f0b1a-9c1d-4c3e-8f00-000000000001"   # device: tap5e4f0b1a-9c
PEER_PORT = "7d2c1e0f-3b4a-4d5e-9f00-000000000002"  # in the same group, on another node
WEB_DOC: dict[str, Any] = {
    "security_groups": {"sg-web": [
        rule_dict(protocol="tcp", port_range_min=22, port_range_max=22),
        rule_dict(protocol="icmp", port_range_min=8, remote_group_id="sg-web"),
        rule_dict(ethertype="IPv6", protocol="tcp", port_range_min=80, port_range_max=443,
                  remote_ip_prefix="2001:db8:1::/48"),
        rule_dict(ethertype="IPv6", protocol="icmp", remote_group_id="sg-web"),
        rule_dict("egress"),
        rule_dict("egress", "IPv6", protocol="udp", port_range_min=53,
                  remote_ip_prefix="2001:db8::53"),
    ]},
    "ports": [
        {"id": WEB_PORT, "mac_address": "fa:16:3e:aa:bb:01",
         "fixed_ips": ["10.0.0.5", "2001:db8::5"], "security_groups": ["sg-web"]},
        {"id": PEER_PORT, "mac_address": "fa:16:3e:aa:bb:02",
         "fixed_ips": ["10.0.0.6", "2001:db8::6"], "security_groups": ["sg-web"]},
    ],
}

# Identical for IPv4 and IPv6, whatever the ports.
SKELETON = {
    "hostfw-INPUT": [
        '-m comment --comment "traffic from a VM to this node" -m physdev --physdev-in tap+ '
        '-j hostfw-from',
    ],
    "hostfw-FORWARD": [
        '-m comment --comment "traffic to a VM" -m physdev --physdev-out tap+ '
        '--physdev-is-bridged -j hostfw-sg-chain',
        '-m comment --comment "traffic from a VM" -m physdev --physdev-in tap+ '
        '--physdev-is-bridged -j hostfw-sg-chain',
    ],
    "hostfw-OUTPUT": [],
    "hostfw-sg-chain": [
        '-m comment --comment "check the sending VM" -m physdev --physdev-in tap+ '
        '--physdev-is-bridged -j hostfw-from',
        '-m comment --comment "check the receiving VM" -m physdev --physdev-out tap+ '
        '--physdev-is-bridged -j hostfw-to',
        '-m comment --comment "both ends passed" -j ACCEPT',
    ],
    "hostfw-accept": [
        '-m comment --comment "a group allows" -j MARK --set-xmark 0x1000000/0x1000000',
    ],
    "hostfw-sg-fallback": [
        '-m comment --comment "drop invalid" -m conntrack --ctstate INVALID -j DROP',
        '-m comment --comment "default drop for unmatched traffic" -j DROP',
    ],
}
CLEAR = '-m comment --comment "clear the accept mark" -j MARK --set-xmark 0x0/0x1000000'
SESSION = ('-m comment --comment "known session" -m conntrack --ctstate RELATED,ESTABLISHED '
           '-g hostfw-accept')
ND = [f'-p ipv6-icmp -m comment --comment "neighbour discovery and MLD" -m icmp6 '
      f'--icmpv6-type {t} -g hostfw-accept' for t in (130, 135, 136)]
# What Neutron repeats in every port chain, once per family, whatever the ports.
COMMON = {
    4: {
        "hostfw-common-e4": [
            CLEAR,
            '-p udp -m comment --comment "no DHCP server on a VM" -m udp --sport 67 '
            '--dport 68 -j DROP',
            SESSION,
            '-p udp -m comment --comment "DHCP client" -m udp --sport 68 --dport 67 '
            '-g hostfw-accept',
        ],
        "hostfw-common-i4": [CLEAR, SESSION],
        "hostfw-bad-source4": [
            '-s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m comment --comment "DHCP discover '
            'before an address" -m udp --sport 68 --dport 67 -j RETURN',
            '-m comment --comment "spoofed source" -j DROP',
        ],
    },
    6: {
        "hostfw-common-e6": [
            CLEAR,
            '-p ipv6-icmp -m comment --comment "no router advertisements from a VM" -m icmp6 '
            '--icmpv6-type 134 -j DROP',
            '-p udp -m comment --comment "no DHCP server on a VM" -m udp --sport 547 '
            '--dport 546 -j DROP',
            SESSION,
            '-p ipv6-icmp -m comment --comment "other ICMPv6" -g hostfw-accept',
            '-p udp -m comment --comment "DHCP client" -m udp --sport 546 --dport 547 '
            '-g hostfw-accept',
        ],
        "hostfw-common-i6": [CLEAR, SESSION, *ND],
        "hostfw-bad-source6": [
            *(f'-s ::/128 -d ff02::/16 -p ipv6-icmp -m comment --comment "MLD and DAD before '
              f'an address" -m icmp6 --icmpv6-type {t} -j RETURN' for t in (131, 135, 143)),
            '-m comment --comment "spoofed source" -j DROP',
        ],
    },
}
ON_MARK = "-m mark --mark 0x1000000/0x1000000 -j RETURN"


def profile(direction: str, family: int, groups: list[str], provider: Iterable[str] = ()
            ) -> list[str]:
    """A profile chain: the shared checks, the address-free provider rules, the groups."""
    d = direction[0]
    rules = [f'-m comment --comment "checks every port shares" -j hostfw-common-{d}{family}',
             f'-m comment --comment "allowed by a shared check" {ON_MARK}', *provider]
    for group in groups:
        rules += [f'-m comment --comment "group {group}" -j hostfw-g{d}{family}-{group}',
                  f'-m comment --comment "allowed by a group" {ON_MARK}']
    return [*rules, '-m comment --comment "unmatched traffic" -j hostfw-sg-fallback']


def goes_to(chain: str) -> str:
    return f'-m comment --comment "its security groups" -g {chain}'


def pair(src: str | None, mac: str, profile_chain: str) -> str:
    head = f"-s {src} " if src else ""
    return (f'{head}-m comment --comment "allowed IP and MAC pair" -m mac --mac-source {mac} '
            f'-g {profile_chain}')


def no_pair(family: int) -> str:
    return f'-m comment --comment "no allowed pair" -g hostfw-bad-source{family}'


DHCP_BROADCAST = ('-d 255.255.255.255/32 -p udp -m comment --comment "udp 68" -m udp --sport 67 '
                  '--dport 68 -j RETURN')
DHCP_LINK_LOCAL = ('-d fe80::/64 -p udp -m comment --comment "udp 546" -m udp --sport 547 '
                   '--dport 546 -j RETURN')
RA = '-p ipv6-icmp -m comment --comment "ipv6-icmp 134" -m icmp6 --icmpv6-type 134 -j RETURN'


def dispatch(device: str, target: str, note: str, unknown: str = "DROP") -> dict[str, list[str]]:
    """The two dispatch chains of a node with one port."""
    chain = target[len("-g hostfw-o"):] if target.startswith("-g") else ""
    to_target = f"-g hostfw-i{chain}" if chain else target
    note = f'"{note}"' if " " in note else note
    # A leaf that goes to the port's chain carries no comment (dispatch.py says why).
    from_note = "" if target.startswith("-g") else f"-m comment --comment {note} "
    to_note = "" if to_target.startswith("-g") else f"-m comment --comment {note} "
    return {
        "hostfw-from": [
            f'{from_note}-m physdev --physdev-in {device} {target}',
            f'-m comment --comment "unknown device" -j {unknown}',
        ],
        "hostfw-to": [
            f'{to_note}-m physdev --physdev-out {device} '
            f'--physdev-is-bridged {to_target}',
            f'-m comment --comment "unknown device" -j {unknown}',
        ],
    }


# Profile chains are named by a digest of their rules: these are the web port's.
WEB_PROFILES = {(4, "i"): "hostfw-pi4-48dbcb1ab7", (4, "e"): "hostfw-pe4-d4257591c5",
                (6, "i"): "hostfw-pi6-ef06563ad2", (6, "e"): "hostfw-pe6-f603122f00"}
WEB_MAC = "fa:16:3e:aa:bb:01"

WEB_V4 = {
    **SKELETON,
    **COMMON[4],
    "hostfw-i5e4f0b1a-9c": [  # only what names the port's own address
        '-d 10.0.0.5/32 -p udp -m comment --comment "udp 68" -m udp --sport 67 --dport 68 '
        '-j RETURN',
        goes_to(WEB_PROFILES[(4, "i")]),
    ],
    "hostfw-o5e4f0b1a-9c": [
        pair("10.0.0.5/32", WEB_MAC, WEB_PROFILES[(4, "e")]),
        no_pair(4),
    ],
    WEB_PROFILES[(4, "i")]: profile("ingress", 4, ["sg-web"], [DHCP_BROADCAST]),
    WEB_PROFILES[(4, "e")]: profile("egress", 4, ["sg-web"]),
    "hostfw-gi4-sg-web": [
        '-p tcp -m comment --comment "tcp 22" -m tcp --dport 22 -g hostfw-accept',
        '-p icmp -m comment --comment "icmp 8 from sg-web" -m icmp --icmp-type 8 '
        '-m set --match-set hfw4gsg-web src -g hostfw-accept',
    ],
    "hostfw-ge4-sg-web": [
        '-m comment --comment any -g hostfw-accept',
    ],
    **dispatch("tap5e4f0b1a-9c", "-g hostfw-o5e4f0b1a-9c", f"port {WEB_PORT}"),
}

WEB_V6 = {
    **SKELETON,
    **COMMON[6],
    "hostfw-i5e4f0b1a-9c": [
        '-d 2001:db8::5/128 -p udp -m comment --comment "udp 546" -m udp --sport 547 '
        '--dport 546 -j RETURN',
        goes_to(WEB_PROFILES[(6, "i")]),
    ],
    "hostfw-o5e4f0b1a-9c": [
        pair("2001:db8::5/128", WEB_MAC, WEB_PROFILES[(6, "e")]),
        pair("fe80::f816:3eff:feaa:bb01/128", WEB_MAC, WEB_PROFILES[(6, "e")]),
        no_pair(6),
    ],
    WEB_PROFILES[(6, "i")]: profile("ingress", 6, ["sg-web"], [DHCP_LINK_LOCAL, RA]),
    WEB_PROFILES[(6, "e")]: profile("egress", 6, ["sg-web"]),
    "hostfw-gi6-sg-web": [
        '-s 2001:db8:1::/48 -p tcp -m comment --comment "tcp 80-443" -m multiport '
        '--dports 80:443 -g hostfw-accept',
        '-p ipv6-icmp -m comment --comment "ipv6-icmp from sg-web" -m set --match-set '
        'hfw6gsg-web src -g hostfw-accept',
    ],
    "hostfw-ge6-sg-web": [
        '-d 2001:db8::53/128 -p udp -m comment --comment "udp 53" -m udp --dport 53 '
        '-g hostfw-accept',
    ],
    **dispatch("tap5e4f0b1a-9c", "-g hostfw-o5e4f0b1a-9c", f"port {WEB_PORT}"),
}


@pytest.fixture(scope="module")
def web() -> Compiled:
    return compile_doc(WEB_DOC, {"tap5e4f0b1a-9c", "tapnotaport"})


def test_golden_v4_v6_port_with_one_group(web: Compiled) -> None:
    assert chains(web, 4) == WEB_V4
    assert chains(web, 6) == WEB_V6


def test_golden_hooks_and_ipsets(web: Compiled) -> None:
    for family in (4, 6):
        hooks = [(h.chain, h.spec) for h in web.ruleset.tables[(family, "filter")].hooks]
        assert hooks == [("INPUT", "-j hostfw-INPUT"), ("FORWARD", "-j hostfw-FORWARD"),
                         ("OUTPUT", "-j hostfw-OUTPUT")]
    sets = {name: (s.family, s.kind, s.members) for name, s in web.ruleset.ipsets.items()}
    assert sets == {  # the remote group's members: both ports, local or not
        "hfw4gsg-web": (4, "hash:net", frozenset({"10.0.0.5/32", "10.0.0.6/32"})),
        "hfw6gsg-web": (6, "hash:net", frozenset({"2001:db8::5/128", "2001:db8::6/128"})),
    }


def test_golden_bookkeeping(web: Compiled) -> None:
    assert web.active_ports == (WEB_PORT,)
    assert web.port_chains == {WEB_PORT: ("hostfw-i5e4f0b1a-9c", "hostfw-o5e4f0b1a-9c",
                                          *sorted(WEB_PROFILES.values()))}
    assert web.errors == ()


def profile_of(compiled: Compiled, family: int, port_chain: str) -> str:
    """The profile chain a port chain goes to."""
    targets = {TARGET.findall(r)[-1] for r in chains(compiled, family)[port_chain]}
    (found,) = {t for t in targets if re.match(r"hostfw-p[ie]\d-", t)}
    return found


# ---------------------------------------------------------------- golden: profiles

def test_ports_with_the_same_groups_share_one_profile_per_direction_and_family() -> None:
    compiled = compile_doc({
        "security_groups": {"sg-a": [rule_dict()], "sg-b": [rule_dict("egress")]},
        "ports": [port_dict("p1", 1, ["sg-a", "sg-b"]), port_dict("p2", 2, ["sg-a", "sg-b"]),
                  port_dict("p3", 3, ["sg-b", "sg-a"])]}, {"tapp1", "tapp2", "tapp3"})
    for family in (4, 6):
        table = chains(compiled, family)
        for letter in "io":
            same = {profile_of(compiled, family, f"hostfw-{letter}p{n}") for n in (1, 2)}
            other = profile_of(compiled, family, f"hostfw-{letter}p3")
            assert len(same) == 1 and other not in same  # the order of groups matters
        profiles = sorted(c for c in table if re.match(r"hostfw-p[ie]\d-", c))
        assert len(profiles) == 4
        ingress = profile_of(compiled, family, "hostfw-ip3")
        jumps = [TARGET.findall(r)[-1] for r in table[ingress]]
        assert [j for j in jumps if "-g" in j and "-sg-" in j] == \
            [f"hostfw-gi{family}-sg-b", f"hostfw-gi{family}-sg-a"]


def test_a_port_whose_groups_change_moves_to_another_profile() -> None:
    doc = {"security_groups": {"sg-a": [rule_dict()], "sg-b": [rule_dict()]},
           "ports": [port_dict("p1", 1, ["sg-a"]), port_dict("p2", 2, ["sg-a"])]}
    before = compile_doc(doc, {"tapp1", "tapp2"})
    moved = {**doc, "ports": [port_dict("p1", 1, ["sg-a"]), port_dict("p2", 2, ["sg-b"])]}
    after = compile_doc(moved, {"tapp1", "tapp2"})
    assert profile_of(after, 4, "hostfw-ip1") == profile_of(before, 4, "hostfw-ip2")
    assert profile_of(after, 4, "hostfw-ip2") != profile_of(before, 4, "hostfw-ip2")
    changed = {chain for _, table, chain in chain_diff(before.ruleset, after.ruleset)
               if table == "filter"}
    new_profiles = {profile_of(after, f, f"hostfw-{x}p2") for f in (4, 6) for x in "io"}
    # p2's two chains, its new profiles, and sg-b's group chains (now used).
    assert changed == {"hostfw-ip2", "hostfw-op2", *new_profiles, "hostfw-gi4-sg-b",
                       "hostfw-ge4-sg-b", "hostfw-gi6-sg-b", "hostfw-ge6-sg-b"}
    # A profile and group chains nobody uses any more are gone.
    assert profile_of(before, 4, "hostfw-ip2") in chains(after, 4)  # p1 still uses it


def test_a_port_chain_holds_only_what_is_the_ports_own() -> None:
    """Spoof pairs and its own addresses; everything else is shared or in the profile."""
    compiled = compile_doc({"security_groups": {"sg": [rule_dict()]},
                            "ports": [port_dict(f"p{n}", n, ["sg"]) for n in range(1, 4)]},
                           {"tapp1", "tapp2", "tapp3"})
    for family in (4, 6):
        table = chains(compiled, family)
        for n in range(1, 4):
            own = table[f"hostfw-ip{n}"] + table[f"hostfw-op{n}"]
            assert len(own) == (4 if family == 4 else 5)
            assert not any("conntrack" in r or "MARK" in r or "mark" in r for r in own)


# ---------------------------------------------------------------- golden: a port without IPs

def test_golden_port_without_ips_gets_a_mac_only_spoof_rule() -> None:
    """test_ip_spoofing_no_fixed_ips: any source address, but only from its MAC."""
    compiled = compile_doc({"security_groups": {"sg": []}, "ports": [
        {"id": "noip", "device": "tapnoip", "mac_address": "fa:16:3e:00:00:0a",
         "security_groups": ["sg"]}]}, {"tapnoip"})
    v4, v6 = chains(compiled, 4), chains(compiled, 6)
    pe4, pe6 = profile_of(compiled, 4, "hostfw-onoip"), profile_of(compiled, 6, "hostfw-onoip")
    assert v4["hostfw-onoip"] == [
        '-m comment --comment "port without IPs any address from its MAC" -m mac '
        f'--mac-source fa:16:3e:00:00:0a -g {pe4}',
        no_pair(4),
    ]
    assert v6["hostfw-onoip"] == [
        '-m comment --comment "port without IPs any address from its MAC" -m mac '
        f'--mac-source fa:16:3e:00:00:0a -g {pe6}',
        pair("fe80::f816:3eff:fe00:a/128", "fa:16:3e:00:00:0a", pe6),
        no_pair(6),
    ]
    # DHCP replies may still reach it, on broadcast (v4) or link-local (v6) only:
    # no address of its own, so its ingress chain only goes to its profile.
    pi4, pi6 = profile_of(compiled, 4, "hostfw-inoip"), profile_of(compiled, 6, "hostfw-inoip")
    assert v4["hostfw-inoip"] == [goes_to(pi4)]
    assert v4[pi4] == profile("ingress", 4, ["sg"], [DHCP_BROADCAST])
    assert v6[pi6] == profile("ingress", 6, ["sg"], [DHCP_LINK_LOCAL])  # no RA without an address
    assert pi6 != WEB_PROFILES[(6, "i")]
    assert v4["hostfw-gi4-sg"] == v4["hostfw-ge4-sg"] == []


# ---------------------------------------------------------------- golden: allowed address pairs

def test_golden_allowed_address_pairs() -> None:
    """Pairs first (own MAC when none given), then the port's own; link-locals per v6 MAC."""
    compiled = compile_doc({"security_groups": {"sg": []}, "ports": [
        {"id": "aap", "device": "tapaap", "mac_address": "fa:16:3e:00:00:0b",
         "fixed_ips": ["10.0.0.7", "2001:db8::7"], "security_groups": ["sg"],
         "allowed_address_pairs": [
             {"ip_address": "10.0.1.0/24"},
             {"ip_address": "10.0.0.99", "mac_address": "fa:16:3e:cc:cc:cc"},
             {"ip_address": "2001:db8::99", "mac_address": "FA:16:3E:DD:DD:DD"},
             {"ip_address": "0.0.0.0/0", "mac_address": "fa:16:3e:ee:ee:ee"},
         ]}]}, {"tapaap"})
    pe4, pe6 = profile_of(compiled, 4, "hostfw-oaap"), profile_of(compiled, 6, "hostfw-oaap")
    assert chains(compiled, 4)["hostfw-oaap"] == [
        pair("10.0.1.0/24", "fa:16:3e:00:00:0b", pe4),
        pair("10.0.0.99/32", "fa:16:3e:cc:cc:cc", pe4),
        # /0 is omitted, as iptables-save omits it, or the rule would never converge.
        pair(None, "fa:16:3e:ee:ee:ee", pe4),
        pair("10.0.0.7/32", "fa:16:3e:00:00:0b", pe4),
        no_pair(4),
    ]
    assert chains(compiled, 6)["hostfw-oaap"] == [
        pair("2001:db8::99/128", "fa:16:3e:dd:dd:dd", pe6),
        pair("2001:db8::7/128", "fa:16:3e:00:00:0b", pe6),
        pair("fe80::f816:3eff:fe00:b/128", "fa:16:3e:00:00:0b", pe6),
        pair("fe80::f816:3eff:fedd:dddd/128", "fa:16:3e:dd:dd:dd", pe6),
        no_pair(6),
    ]


def test_address_pairs_are_members_of_the_ports_groups() -> None:
    compiled = compile_doc({
        "security_groups": {"sg": [rule_dict(remote_group_id="sg")]},
        "ports": [port_dict("a", 1, ["sg"], allowed_address_pairs=[
            {"ip_address": "10.9.0.0/16"}, {"ip_address": "0.0.0.0/0"}])]}, {"tapa"})
    # hash:net cannot hold /0: it becomes its two halves.
    assert compiled.ruleset.ipsets["hfw4gsg"].members == frozenset(
        {"10.0.1.1/32", "10.9.0.0/16", "0.0.0.0/1", "128.0.0.0/1"})


# ---------------------------------------------------------------- golden: port security off

PORT_SECURITY_DOC: dict[str, Any] = {
    "security_groups": {"sg-open": [rule_dict()], "sg": []},
    "ports": [
        {"id": "open", "device": "tapopen", "mac_address": "fa:16:3e:00:00:0c",
         "fixed_ips": ["10.0.0.8"], "port_security_enabled": False,
         "security_groups": ["sg-open"]},
        {"id": "shut", "device": "tapshut", "mac_address": "fa:16:3e:00:00:0d",
         "fixed_ips": ["10.0.0.9"]},
    ],
}


@pytest.mark.parametrize(("policy", "verdict"), [("drop", "DROP"), ("accept", "RETURN")])
def test_golden_port_security_off_and_unknown_device_policy(policy: str, verdict: str) -> None:
    """No chains for the open port, RETURN in both trees; unknown devices get the policy."""
    compiled = compile_doc(PORT_SECURITY_DOC, {"tapopen", "tapshut"},
                           Settings(enable_ipv6=False, unknown_device_policy=policy))
    assert (6, "filter") not in compiled.ruleset.tables
    pi, pe = profile_of(compiled, 4, "hostfw-ishut"), profile_of(compiled, 4, "hostfw-oshut")
    assert chains(compiled, 4) == {
        **SKELETON,
        **COMMON[4],
        "hostfw-ishut": [
            '-d 10.0.0.9/32 -p udp -m comment --comment "udp 68" -m udp --sport 67 --dport 68 '
            '-j RETURN',
            goes_to(pi),
        ],
        "hostfw-oshut": [pair("10.0.0.9/32", "fa:16:3e:00:00:0d", pe), no_pair(4)],
        pi: profile("ingress", 4, [], [DHCP_BROADCAST]),  # no groups: the fallback
        pe: profile("egress", 4, []),
        # sg-open is used by the open port only: no chains for it.
        "hostfw-from": [
            '-m comment --comment "port open without port security" -m physdev '
            '--physdev-in tapopen -j RETURN',
            '-m physdev --physdev-in tapshut -g hostfw-oshut',
            f'-m comment --comment "unknown device" -j {verdict}',
        ],
        "hostfw-to": [
            '-m comment --comment "port open without port security" -m physdev '
            '--physdev-out tapopen --physdev-is-bridged -j RETURN',
            '-m physdev --physdev-out tapshut --physdev-is-bridged -g hostfw-ishut',
            f'-m comment --comment "unknown device" -j {verdict}',
        ],
    }
    assert "open" not in compiled.port_chains
    assert compiled.active_ports == ("open", "shut")


# ---------------------------------------------------------------- translation details

def group_rules(rules: list[dict[str, Any]], family: int = 4,
                direction: str = "i") -> list[str]:
    """The group chain compiled from `rules` for one local port."""
    compiled = compile_doc({"security_groups": {"sg": rules},
                            "ports": [port_dict("p", 1, ["sg"])]}, {"tapp"})
    return chains(compiled, family)[f"hostfw-g{direction}{family}-sg"]


@pytest.mark.parametrize(("rule", "expected"), [
    (rule_dict(protocol="tcp", port_range_min=0, port_range_max=100),
     '-p tcp -m comment --comment "tcp 0-100" -m multiport --dports 0:100 -g hostfw-accept'),
    (rule_dict(protocol="6", port_range_min=5, port_range_max=5),
     '-p tcp -m comment --comment "tcp 5" -m tcp --dport 5 -g hostfw-accept'),
    (rule_dict(protocol="udplite", port_range_min=5),
     '-p udplite -m comment --comment "udplite 5" -m multiport --dports 5 -g hostfw-accept'),
    (rule_dict(protocol="sctp", port_range_min=9),
     '-p sctp -m comment --comment "sctp 9" -m sctp --dport 9 -g hostfw-accept'),
    (rule_dict(protocol="dccp", port_range_min=9, port_range_max=10),
     '-p dccp -m comment --comment "dccp 9-10" -m multiport --dports 9:10 -g hostfw-accept'),
    (rule_dict(protocol="udp", port_range_min=53, source_port_range_min=1000,
               source_port_range_max=2000),
     '-p udp -m comment --comment "udp 53" -m udp --dport 53 -m multiport --sports 1000:2000 '
     '-g hostfw-accept'),
    (rule_dict(protocol="vrrp"),  # a vrrp rule with ports is rejected (test_model)
     '-p 112 -m comment --comment 112 -g hostfw-accept'),
    (rule_dict(protocol="0"),
     '-m comment --comment any -g hostfw-accept'),
    (rule_dict(protocol="icmp", port_range_min=3, port_range_max=1),
     '-p icmp -m comment --comment "icmp 3-1" -m icmp --icmp-type 3/1 -g hostfw-accept'),
    (rule_dict(protocol="icmp", port_range_min=8, port_range_max=0),
     '-p icmp -m comment --comment "icmp 8-0" -m icmp --icmp-type 8/0 -g hostfw-accept'),
    (rule_dict(remote_ip_prefix="10.1.2.3"),
     '-s 10.1.2.3/32 -m comment --comment any -g hostfw-accept'),
    (rule_dict(remote_ip_prefix="0.0.0.0/0", protocol="tcp"),
     '-p tcp -m comment --comment tcp -g hostfw-accept'),
    (rule_dict(dest_ip_prefix="10.0.1.1", protocol="tcp"),
     '-d 10.0.1.1/32 -p tcp -m comment --comment tcp -g hostfw-accept'),
])
def test_rule_translation_v4_ingress(rule: dict[str, Any], expected: str) -> None:
    assert group_rules([rule]) == [expected]


def test_rule_translation_v6_egress_prefix_and_type() -> None:
    rules = [rule_dict("egress", "IPv6", protocol="icmp", port_range_min=128,
                       remote_ip_prefix="2001:db8::/32"),
             rule_dict("egress", "IPv6", source_ip_prefix="2001:db8::5", protocol="58")]
    assert group_rules(rules, 6, "e") == [
        '-d 2001:db8::/32 -p ipv6-icmp -m comment --comment "ipv6-icmp 128" -m icmp6 '
        '--icmpv6-type 128 -g hostfw-accept',
        '-s 2001:db8::5/128 -p ipv6-icmp -m comment --comment ipv6-icmp -g hostfw-accept',
    ]


def test_identical_rules_are_rendered_once_in_order() -> None:
    """test_user_sg_rules_deduped_before_call_to_iptables_manager."""
    rules = [rule_dict(protocol="tcp", port_range_min=22), rule_dict(protocol="udp"),
             rule_dict(protocol="tcp", port_range_min=22, port_range_max=22, id="dup")]
    assert group_rules(rules) == [
        '-p tcp -m comment --comment "tcp 22" -m tcp --dport 22 -g hostfw-accept',
        '-p udp -m comment --comment udp -g hostfw-accept',
    ]


def test_remote_address_group_becomes_a_family_filtered_ipset() -> None:
    doc = {"security_groups": {"sg": [rule_dict(remote_address_group_id="ag"),
                                      rule_dict(ethertype="IPv6",
                                                remote_address_group_id="ag")]},
           "ports": [port_dict("p", 1, ["sg"])],
           "address_groups": {"ag": ["192.0.2.0/24", "2001:db8:9::/48", "::/0"]}}
    compiled = compile_doc(doc, {"tapp"})
    assert chains(compiled, 4)["hostfw-gi4-sg"] == [
        '-m comment --comment "any from ag" -m set --match-set hfw4aag src -g hostfw-accept']
    assert compiled.ruleset.ipsets["hfw4aag"].members == frozenset({"192.0.2.0/24"})
    assert compiled.ruleset.ipsets["hfw6aag"].members == frozenset(
        {"2001:db8:9::/48", "::/1", "8000::/1"})


def test_remote_group_without_members_is_an_empty_set() -> None:
    compiled = compile_doc({"security_groups": {"sg": [rule_dict(remote_group_id="nobody")]},
                            "ports": [port_dict("p", 1, ["sg"])]}, {"tapp"})
    assert compiled.ruleset.ipsets["hfw4gnobody"].members == frozenset()


def test_egress_remote_group_matches_the_destination() -> None:
    assert group_rules([rule_dict("egress", remote_group_id="sg")], 4, "e") == [
        '-m comment --comment "any to sg" -m set --match-set hfw4gsg dst -g hostfw-accept']


def test_per_port_provider_rules_replace_the_default_ones() -> None:
    """A server's provider rules (Neutron shape) are used as given: those naming the
    port's own address in its ingress chain, the others in its profile."""
    doc = {"security_groups": {}, "ports": [port_dict("p", 1, [], security_group_rules=[
        rule_dict(protocol="udp", port_range_min=68, port_range_max=68,
                  source_port_range_min=67, source_port_range_max=67,
                  source_ip_prefix="10.0.1.254", dest_ip_prefix="10.0.1.1"),
        rule_dict(protocol="udp", port_range_min=68, port_range_max=68,
                  source_port_range_min=67, source_port_range_max=67,
                  source_ip_prefix="10.0.1.254")])]}
    compiled = compile_doc(doc, {"tapp"})
    pi = profile_of(compiled, 4, "hostfw-ip")
    assert chains(compiled, 4)["hostfw-ip"] == [
        '-s 10.0.1.254/32 -d 10.0.1.1/32 -p udp -m comment --comment "udp 68" -m udp '
        '--sport 67 --dport 68 -j RETURN',
        goes_to(pi),
    ]
    assert chains(compiled, 4)[pi] == profile("ingress", 4, [], [
        '-s 10.0.1.254/32 -p udp -m comment --comment "udp 68" -m udp --sport 67 --dport 68 '
        '-j RETURN'])


def test_unknown_group_allows_nothing_and_is_reported() -> None:
    compiled = compile_doc({"security_groups": {"sg": [rule_dict()]},
                            "ports": [port_dict("p", 1, ["sg", "ghost"])]}, {"tapp"})
    assert compiled.errors == ("port 'p': security group 'ghost' is unknown; it allows nothing",)
    assert not any("ghost" in name for name in compiled.ruleset.tables[(4, "filter")].chains)
    assert not any("ghost" in r for r in chains(compiled, 4)["hostfw-ip"])


def test_a_port_whose_chains_cannot_be_built_drops_everything(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Never fail open: a compile error for one port gives it drop-all chains only."""
    real = filter_module.spoof_rules

    def broken(port: Any, family: int, allowed: str) -> list[str]:
        if port.id == "bad":
            raise ValueError("boom")
        return real(port, family, allowed)

    monkeypatch.setattr(filter_module, "spoof_rules", broken)
    doc = {"security_groups": {"sg": []},
           "ports": [port_dict("bad", 1, ["sg"]), port_dict("good", 2, ["sg"])]}
    compiled = compile_doc(doc, {"tapbad", "tapgood"})
    drop = ['-m comment --comment "policy error drop all" -j DROP']
    for family in (4, 6):
        table = chains(compiled, family)
        assert table["hostfw-ibad"] == table["hostfw-obad"] == drop
        assert table["hostfw-ogood"][-1] == no_pair(family)
        assert len(table["hostfw-igood"]) > 1
    assert set(compiled.errors) == {
        "port 'bad': cannot build its chains (boom); dropping all its traffic"}


def test_spoof_rules_match_iptables_save_text_in_either_mac_case(web: Compiled) -> None:
    """iptables 1.8.9 prints MACs lower-case, older releases upper-case: both read back equal."""
    spoof = [r.text for r in web.ruleset.tables[(4, "filter")].chains["hostfw-o5e4f0b1a-9c"]]
    assert "--mac-source fa:16:3e:aa:bb:01" in spoof[0]
    upper = spoof[0].replace("fa:16:3e:aa:bb:01", "FA:16:3E:AA:BB:01")
    parsed = parse_save(f"*filter\n:hostfw-o5e4f0b1a-9c - [0:0]\n"
                        f"-A hostfw-o5e4f0b1a-9c {upper}\nCOMMIT\n")
    assert parsed["filter"].chains["hostfw-o5e4f0b1a-9c"] == [spoof[0]]


# ---------------------------------------------------------------- rendering

def test_rules_render_in_iptables_save_order() -> None:
    rule = IptablesRule(jump("RETURN"), src="10.0.0.0/8", dst="10.1.0.0/16", in_iface="br0",
                        out_iface="eth0", proto="tcp", matches=(ports("tcp", dport=22),),
                        comment="ssh")
    assert rule.text == ("-s 10.0.0.0/8 -d 10.1.0.0/16 -i br0 -o eth0 -p tcp -m comment "
                         "--comment ssh -m tcp --dport 22 -j RETURN")
    assert IptablesRule(call("hostfw-x"), comment="two words").text == \
        '-m comment --comment "two words" -j hostfw-x'


def test_a_rule_without_a_comment_has_no_comment_match() -> None:
    assert IptablesRule(jump("DROP")).text == "-j DROP"


def test_rules_are_equal_when_their_texts_are() -> None:
    a = IptablesRule(jump("DROP"), comment="x")
    assert a == IptablesRule(jump("DROP"), comment="x") and hash(a) == hash(
        IptablesRule(jump("DROP"), comment="x"))
    assert a != IptablesRule(jump("DROP"), comment="y")


@pytest.mark.parametrize("comment", ['a"b', "a\nb", "a'b", "a;b", "a$b", "a\\b", "x" * 201,
                                     "é"])
def test_rules_refuse_comments_outside_the_whitelist(comment: str) -> None:
    with pytest.raises(ValueError, match="outside the whitelist"):
        IptablesRule(jump("DROP"), comment=comment)


# ---------------------------------------------------------------- names

LONG_GROUP = "g" * 64


@pytest.mark.parametrize("names", [
    Names(),
    Names(chain_prefix="hfw_node_01x", ipset_prefix="hfw_set1",
          device_prefix="vnet"),
], ids=["default", "long-prefixes"])
def test_names_fit_the_kernel_and_carry_the_prefixes(names: Names) -> None:
    dev = names.device_prefix
    doc = {
        "security_groups": {
            LONG_GROUP: [rule_dict(remote_group_id=LONG_GROUP),
                         rule_dict(remote_address_group_id="a" * 64)],
            "short": [rule_dict("egress", "IPv6", remote_group_id="g" * 63 + "h")],
        },
        "ports": [
            {"id": f"p{i}", "device": f"{dev}{i:0{15 - len(dev)}d}",
             "mac_address": f"fa:16:3e:00:02:{i:02x}", "fixed_ips": [f"10.0.2.{i}"],
             "security_groups": [LONG_GROUP, "short"]} for i in range(40)
        ],
    }
    compiled = compile_ruleset(Snapshot(load(doc), frozenset(p["device"] for p in doc["ports"]),
                                         Settings(names=names)))
    all_chains = [n for t in compiled.ruleset.tables.values() for n in t.chains]
    assert len(all_chains) > 100
    for name in all_chains:
        assert len(name) <= MAX_CHAIN and names.owns_chain(name), name
    assert len(compiled.ruleset.ipsets) == 3
    for name, ipset in compiled.ruleset.ipsets.items():
        assert ipset.name == name
        assert len(name) <= MAX_IPSET and names.owns_ipset(name), name
    # Every jump in every rule lands on a chain of the same table or a built-in target.
    for table in compiled.ruleset.tables.values():
        for rules in table.chains.values():
            for rule in rules:
                target = rule.target.name
                assert target in table.chains or (
                    not rule.target.chain and target in BUILTIN_TARGETS), rule


def test_long_names_are_shortened_with_a_hash_and_stay_distinct() -> None:
    names = Names()
    a, b = names.group_chain("ingress", 4, "x" * 63 + "a"), names.group_chain("ingress", 4,
                                                                               "x" * 63 + "b")
    assert a != b and len(a) == len(b) == MAX_CHAIN and "~" in a
    assert a.startswith("hostfw-gi4-xxxxxxxxxx")
    assert names.ipset(4, "g", "y" * 40) != names.ipset(4, "g", "y" * 41)
    assert names.group_chain("egress", 6, "short") == "hostfw-ge6-short"


@pytest.mark.parametrize("device", ["tapg-chain", "tapg-fallback", "tapnat"])
def test_port_chains_never_spell_a_shared_chain(device: str) -> None:
    names = Names()
    spoof = names.port_chain("s", device)
    assert spoof not in {names.chain("sg-chain"), names.chain("sg-fallback"), names.chain("snat")}
    assert names.owns_chain(spoof) and len(spoof) <= MAX_CHAIN
    doc = {"security_groups": {}, "ports": [port_dict(device[3:], 1, [], device=device)]}
    table = compile_doc(doc, {device}).ruleset.tables[(4, "filter")].chains
    assert [r.text for r in table["hostfw-sg-chain"]] == SKELETON["hostfw-sg-chain"]
    assert [r.text for r in table["hostfw-sg-fallback"]] == SKELETON["hostfw-sg-fallback"]


def test_a_long_chain_prefix_is_refused_and_the_longest_allowed_is_kept() -> None:
    with pytest.raises(ValueError, match="chain_prefix"):
        Names(chain_prefix="p" * 13)
    names = Names(chain_prefix="p" * 12)
    name = names.group_chain("ingress", 4, "some-group-with-a-long-id-0123456789")
    assert names.owns_chain(name) and len(name) <= MAX_CHAIN, name


# ---------------------------------------------------------------- determinism and locality

SCALE_DOC: dict[str, Any] = {
    "security_groups": {
        "sg-a": [rule_dict(protocol="tcp", port_range_min=22),
                 rule_dict(remote_group_id="sg-b"), rule_dict("egress"),
                 rule_dict("egress", "IPv6")],
        "sg-b": [rule_dict(protocol="udp", port_range_min=53), rule_dict("egress")],
        "sg-c": [rule_dict(ethertype="IPv6", protocol="icmp")],
    },
    "ports": [port_dict(f"p{i}", i, ["sg-a"] if i % 2 else ["sg-a", "sg-b"])
              for i in range(1, 30)],
}
SCALE_DEVICES = {f"tapp{i}" for i in range(1, 30)}


def test_compile_is_deterministic_and_ignores_input_order() -> None:
    first = compile_doc(SCALE_DOC, SCALE_DEVICES)
    again = compile_doc(SCALE_DOC, SCALE_DEVICES)
    shuffled = dict(SCALE_DOC, ports=list(reversed(SCALE_DOC["ports"])),
                    security_groups=dict(reversed(list(SCALE_DOC["security_groups"].items()))))
    other_order = compile_doc(shuffled, set(reversed(sorted(SCALE_DEVICES))))
    assert first.ruleset == again.ruleset == other_order.ruleset
    # Not only equal as mappings: chain order and rule order are the same too.
    for key, table in first.ruleset.tables.items():
        assert list(table.chains.items()) == list(other_order.ruleset.tables[key].chains.items())


def test_a_rule_change_rewrites_only_that_groups_chain() -> None:
    before = compile_doc(SCALE_DOC, SCALE_DEVICES).ruleset
    changed = dict(SCALE_DOC, security_groups=dict(
        SCALE_DOC["security_groups"],
        **{"sg-b": [rule_dict(protocol="udp", port_range_min=54), rule_dict("egress")]}))
    after = compile_doc(changed, SCALE_DEVICES).ruleset
    assert chain_diff(before, after) == {(4, "filter", "hostfw-gi4-sg-b")}
    assert before.ipsets == after.ipsets


def test_a_member_change_touches_no_chain() -> None:
    before = compile_doc(SCALE_DOC, SCALE_DEVICES).ruleset
    more = dict(SCALE_DOC, sg_member_ips={"sg-b": {"IPv4": [["192.0.2.1", None]]}})
    after = compile_doc(more, SCALE_DEVICES).ruleset
    assert chain_diff(before, after) == set()
    assert after.ipsets["hfw4gsg-b"].members - before.ipsets["hfw4gsg-b"].members == {
        "192.0.2.1/32"}


def test_a_member_change_gives_the_very_same_tables() -> None:
    """The engine skips a table that is the very object it applied last."""
    before = compile_doc(SCALE_DOC, SCALE_DEVICES).ruleset
    more = dict(SCALE_DOC, sg_member_ips={"sg-b": {"IPv4": [["192.0.2.9", None]]}})
    after = compile_doc(more, SCALE_DEVICES).ruleset
    assert all(after.tables[key] is table for key, table in before.tables.items())


def test_a_rule_change_renders_only_that_groups_chain_anew() -> None:
    """Port, profile, shared and dispatch chains come back as the very same objects."""
    before = compile_doc(SCALE_DOC, SCALE_DEVICES).ruleset.tables[(4, "filter")].chains
    changed = dict(SCALE_DOC, security_groups=dict(
        SCALE_DOC["security_groups"], **{"sg-b": [rule_dict(protocol="udp", port_range_min=55),
                                                  rule_dict("egress")]}))
    after = compile_doc(changed, SCALE_DEVICES).ruleset.tables[(4, "filter")].chains
    assert after["hostfw-ge4-sg-b"] == before["hostfw-ge4-sg-b"]
    assert after.keys() == before.keys()
    anew = {name for name in after if after[name] is not before[name]}
    # The skeleton is a few fresh tuples; sg-b's chains are rendered again, both directions.
    assert anew - SKELETON.keys() == {"hostfw-gi4-sg-b", "hostfw-ge4-sg-b"}


def dispatch_chain(name: str) -> bool:
    return name in ("hostfw-from", "hostfw-to") or name.startswith(("hostfw-from-",
                                                                     "hostfw-to-"))


@pytest.mark.parametrize(("groups", "new_group_chains"), [
    (["sg-a"], set()),
    (["sg-a", "sg-c"], {"hostfw-gi4-sg-c", "hostfw-ge4-sg-c", "hostfw-gi6-sg-c",
                        "hostfw-ge6-sg-c"}),
])
def test_adding_a_port_touches_only_dispatch_its_chains_and_new_groups(
        groups: list[str], new_group_chains: set[str]) -> None:
    before = compile_doc(SCALE_DOC, SCALE_DEVICES)
    doc = dict(SCALE_DOC, ports=[*SCALE_DOC["ports"], port_dict("new", 99, groups)])
    after = compile_doc(doc, SCALE_DEVICES | {"tapnew"})
    changed = chain_diff(before.ruleset, after.ruleset)
    own = {"hostfw-inew", "hostfw-onew"}
    assert own <= set(after.port_chains["new"])
    names = {name for _, _, name in changed}
    new_profiles = set(after.port_chains["new"]) - own - set(before.port_chains["p1"])
    assert bool(new_profiles) == bool(new_group_chains)  # sg-a alone: p1's profiles
    own |= new_profiles
    assert own | new_group_chains <= names
    assert all(dispatch_chain(n) for n in names - own - new_group_chains), names
    assert {n for n in names if dispatch_chain(n)} >= {"hostfw-from", "hostfw-to"}


# ---------------------------------------------------------------- dispatch trees at scale

def uuid_ports(count: int, seed: int) -> list[dict[str, Any]]:
    """Neutron-like ports: random UUID ids, default devices tap + id[:11]."""
    rnd = random.Random(seed)
    ports = []
    for i in range(count):
        port_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        ports.append({"id": port_id, "mac_address": f"fa:16:3e:{i >> 16 & 255:02x}:"
                      f"{i >> 8 & 255:02x}:{i & 255:02x}",
                      "fixed_ips": [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}"],
                      "security_groups": ["sg"], "port_security_enabled": i % 10 != 0})
    return ports


def walk(table: Mapping[str, tuple[IptablesRule, ...]], root: str, direction: str,
         device: str) -> tuple[str, int]:
    """Follow a dispatch tree for `device` as the kernel would; (verdict, chains visited)."""
    chain, depth = root, 0
    while True:
        depth += 1
        for rule in table[chain]:
            physdev = rule.match("physdev")
            if physdev:
                option = physdev.option(f"--physdev-{direction}")
                assert option, rule
                pattern = option.values[0]
                if pattern.endswith("+"):
                    if not device.startswith(pattern[:-1]):
                        continue
                elif device != pattern:
                    continue
            target = rule.target
            if target.goto and target.name.startswith(root + "-"):
                chain = target.name
                break
            return target.render(), depth
        else:
            raise AssertionError(f"{device} fell off the end of {chain}")


@pytest.fixture(scope="module")
def thousand() -> tuple[list[dict[str, Any]], Compiled]:
    ports = uuid_ports(1000, seed=7)
    doc = {"security_groups": {"sg": [rule_dict()]}, "ports": ports}
    devices = {"tap" + p["id"][:11] for p in ports}
    return ports, compile_doc(doc, devices)


def tree_chains(table: Mapping[str, Any]) -> dict[str, Any]:
    return {n: rules for n, rules in table.items() if dispatch_chain(n)}


def test_every_device_is_reachable_through_the_trees(
        thousand: tuple[list[dict[str, Any]], Compiled]) -> None:
    ports, compiled = thousand
    table = compiled.ruleset.tables[(4, "filter")].chains
    names = Names()
    deepest = 0
    for port in ports:
        device = "tap" + port["id"][:11]
        for root, letter, direction in (("hostfw-from", "o", "in"), ("hostfw-to", "i", "out")):
            verdict, depth = walk(table, root, direction, device)
            deepest = max(deepest, depth)
            if port["port_security_enabled"]:
                assert verdict == f"-g {names.port_chain(letter, device)}", device
            else:
                assert verdict == "-j RETURN", device
    assert 2 <= deepest <= 4  # a real tree, and a shallow one


def test_no_tree_chain_is_long(thousand: tuple[list[dict[str, Any]], Compiled]) -> None:
    _, compiled = thousand
    trees = tree_chains(compiled.ruleset.tables[(4, "filter")].chains)
    assert len(trees) > 2
    assert max(len(rules) for rules in trees.values()) <= 2 * FANOUT + 2


def test_unknown_devices_end_at_the_unknown_verdict(
        thousand: tuple[list[dict[str, Any]], Compiled]) -> None:
    ports, compiled = thousand
    table = compiled.ruleset.tables[(4, "filter")].chains
    known = {"tap" + p["id"][:11] for p in ports}
    probes = {"tapzzzz", "tap", "tap0", "tapffffffffffff"}
    for port in ports[:50]:  # near misses: one character changed, cut short or longer
        device = "tap" + port["id"][:11]
        probes |= {device[:-1] + "z", device[:-1], device + "0", device[:6]}
    for device in probes - known:
        for root, direction in (("hostfw-from", "in"), ("hostfw-to", "out")):
            assert walk(table, root, direction, device)[0] == "-j DROP", device


def test_unknown_device_with_accept_policy_returns() -> None:
    ports = uuid_ports(100, seed=3)
    compiled = compile_doc({"security_groups": {"sg": []}, "ports": ports},
                           {"tap" + p["id"][:11] for p in ports},
                           Settings(unknown_device_policy="accept"))
    table = compiled.ruleset.tables[(4, "filter")].chains
    assert walk(table, "hostfw-from", "in", "tapnobody")[0] == "-j RETURN"
    assert all(rules[-1].text == '-m comment --comment "unknown device" -j RETURN'
               for rules in tree_chains(table).values() if rules)


def test_no_tree_chain_is_long_whatever_the_device_alphabet() -> None:
    rnd = random.Random(5)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    devices = sorted({"tap" + "".join(rnd.choice(alphabet) for _ in range(8))
                      for _ in range(1000)})
    ports = [{"id": f"p{i}", "device": d, "mac_address": "fa:16:3e:00:00:01"}
             for i, d in enumerate(devices)]
    compiled = compile_doc({"ports": ports}, set(devices))
    trees = tree_chains(compiled.ruleset.tables[(4, "filter")].chains)
    assert max(len(rules) for rules in trees.values()) <= 2 * FANOUT + 2
    # Still a tree that finds every device and drops the others.
    table = compiled.ruleset.tables[(4, "filter")].chains
    for device in devices[::37]:
        found = walk(table, "hostfw-from", "in", device)[0]
        assert found == f"-g {Names().port_chain('o', device)}"
        assert walk(table, "hostfw-from", "in", device + "Z")[0] == "-j DROP"
