"""The model: every validation path of agent/model.py, hostile inputs included.

Why this file matters: the model is the only whitelist between the outside
world (policy file, RPC) and iptables text. Each test checks three things
where they apply: the bad object is rejected, the reason names the object
(port id or position, group id and rule index) and what is wrong, and the
good objects of the same document still load (one bad object never spoils
the others).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from agent.model import (
    AddressPair,
    Invalid,
    Policy,
    Rule,
    parse_policy,
    parse_port,
    parse_rule,
)
from agent.sources.policy_file import PolicyFileError, derive_members, load_policy_text

MAC = "fa:16:3e:00:00:01"
WHAT = "security group 'sg' rule 0"


def rule(**overrides: Any) -> dict[str, Any]:
    """A valid ingress IPv4 rule dict with `overrides` applied (None deletes a key)."""
    raw: dict[str, Any] = {"direction": "ingress", "ethertype": "IPv4"}
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


def port(**overrides: Any) -> dict[str, Any]:
    """A valid port dict with `overrides` applied."""
    raw: dict[str, Any] = {"id": "p1", "mac_address": MAC, "fixed_ips": ["10.0.0.5"],
                           "security_groups": ["sg"]}
    raw.update(overrides)
    return raw


def good_rule(**overrides: Any) -> Rule:
    return parse_rule(rule(**overrides), WHAT)


def bad_rule(**overrides: Any) -> str:
    """The rejection message of a rule; fails the test if the rule loads."""
    with pytest.raises(Invalid) as info:
        parse_rule(rule(**overrides), WHAT)
    return str(info.value)


def load_group_rule(raw: dict[str, Any]) -> Policy:
    """A document with group `sg` = [a good rule, `raw`] and one good port."""
    return parse_policy({
        "security_groups": {"sg": [rule(protocol="tcp", port_range_min=22), raw]},
        "ports": [port()],
    })


def assert_group_rule_rejected(raw: dict[str, Any], *reason: str) -> None:
    """`raw` as rule 1 of group sg is rejected naming it; rule 0 and the port still load."""
    policy = load_group_rule(raw)
    assert len(policy.errors) == 1, policy.errors
    error = policy.errors[0]
    assert error.startswith("security group 'sg' rule 1 "), error
    for part in reason:
        assert part in error, (part, error)
    assert policy.groups["sg"] == (good_rule(protocol="tcp", port_range_min=22),)
    assert [p.id for p in policy.ports] == ["p1"]


def load_ports(*raw: Any, strict: bool = True) -> Policy:
    """A document with a good port `good` plus `raw` ports."""
    good = port(id="good", mac_address="fa:16:3e:00:00:99", fixed_ips=["10.0.0.99"])
    return parse_policy({"security_groups": {"sg": []}, "ports": [good, *raw]}, strict=strict)


def assert_port_rejected(raw: dict[str, Any], *reason: str, strict: bool = True) -> str:
    """`raw` is rejected with one error naming it; the good port still loads."""
    policy = load_ports(raw, strict=strict)
    assert [p.id for p in policy.ports] == ["good"], policy.errors
    assert len(policy.errors) == 1, policy.errors
    error = policy.errors[0]
    for part in reason:
        assert part in error, (part, error)
    return error


# ---------------------------------------------------------------- CIDRs and families

@pytest.mark.parametrize("prefix", ["10.0.0.256/24", "10.0.0.0/33", "not-a-cidr", "10.0.0",
                                    "2001:db8::/129", "10.0.0.1 -j ACCEPT", 123, ["10.0.0.0/8"],
                                    "1" * 70])
def test_bad_remote_ip_prefix_is_rejected_naming_the_rule(prefix: Any) -> None:
    assert_group_rule_rejected(rule(remote_ip_prefix=prefix), "remote_ip_prefix",
                               "is not an IP address or CIDR")


@pytest.mark.parametrize(("ethertype", "prefix", "family"), [
    ("IPv4", "2001:db8::/64", "IPv4"), ("IPv6", "10.0.0.0/8", "IPv6"),
    ("IPv4", "::/0", "IPv4"), ("IPv6", "0.0.0.0/0", "IPv6"),
])
def test_prefix_of_the_wrong_family_is_rejected(ethertype: str, prefix: str,
                                                family: str) -> None:
    assert_group_rule_rejected(rule(ethertype=ethertype, remote_ip_prefix=prefix),
                               f"remote_ip_prefix {prefix!r} is not an {family} address")


@pytest.mark.parametrize(("given", "normalised"), [
    ("10.0.0.5", "10.0.0.5/32"),            # a bare address is a host
    ("10.0.0.5/24", "10.0.0.0/24"),         # host bits cleared, like normalized_cidr
    ("0.0.0.0/0", "0.0.0.0/0"),
])
def test_ipv4_prefixes_are_normalised(given: str, normalised: str) -> None:
    assert good_rule(remote_ip_prefix=given).remote_ip_prefix == normalised


@pytest.mark.parametrize(("given", "normalised"), [
    ("2001:DB8::1", "2001:db8::1/128"),
    ("2001:db8:0:0::1/64", "2001:db8::/64"),
])
def test_ipv6_prefixes_are_normalised(given: str, normalised: str) -> None:
    assert good_rule(ethertype="IPv6", remote_ip_prefix=given).remote_ip_prefix == normalised


def test_empty_prefix_means_no_prefix() -> None:
    assert good_rule(remote_ip_prefix="").remote_ip_prefix is None


@pytest.mark.parametrize("ethertype", ["ipv4", "IPV6", "4", 4, None, "IPv4 "])
def test_bad_ethertype_is_rejected(ethertype: Any) -> None:
    raw = rule()
    raw["ethertype"] = ethertype
    assert_group_rule_rejected(raw, "ethertype", "is not IPv4 or IPv6")


def test_missing_ethertype_defaults_to_ipv4() -> None:
    assert good_rule(ethertype=None).ethertype == "IPv4"


@pytest.mark.parametrize("direction", [None, "in", "INGRESS", "", 1])
def test_bad_direction_is_rejected(direction: Any) -> None:
    raw = rule()
    raw["direction"] = direction
    assert_group_rule_rejected(raw, "direction", "is not ingress or egress")


def test_unhashable_ethertype_is_rejected_not_a_crash() -> None:
    assert_group_rule_rejected(rule(ethertype=["IPv4"]), "ethertype", "is not IPv4 or IPv6")


# ---------------------------------------------------------------- port ranges

def test_port_range_min_greater_than_max_is_rejected() -> None:
    assert_group_rule_rejected(rule(protocol="tcp", port_range_min=90, port_range_max=80),
                               "port_range_min 90 is greater than port_range_max 80")


def test_port_range_max_without_min_is_rejected() -> None:
    assert_group_rule_rejected(rule(protocol="tcp", port_range_max=80),
                               "has port_range_max without port_range_min")


def test_source_port_range_gets_the_same_checks() -> None:
    assert_group_rule_rejected(rule(protocol="udp", source_port_range_max=68),
                               "source_port_range_max without source_port_range_min")
    assert_group_rule_rejected(
        rule(protocol="udp", source_port_range_min=70, source_port_range_max=68),
        "source_port_range_min 70 is greater than source_port_range_max 68")


@pytest.mark.parametrize("value", [65536, -1, 10**12, 80.5, "80a", " 80", "-1", [80], {}])
def test_port_out_of_range_or_not_a_number_is_rejected(value: Any) -> None:
    assert_group_rule_rejected(rule(protocol="tcp", port_range_min=value),
                               "port_range_min", "is not a number from 0 to 65535")


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_port_number(value: bool) -> None:
    assert_group_rule_rejected(rule(protocol="tcp", port_range_min=value),
                               f"port_range_min {value!r} is not a number")


def test_lone_min_is_one_port_and_numeric_strings_are_numbers() -> None:
    parsed = good_rule(protocol="tcp", port_range_min="443")
    assert (parsed.port_min, parsed.port_max) == (443, 443)


def test_port_zero_and_range_edges_are_kept() -> None:
    parsed = good_rule(protocol="tcp", port_range_min=0, port_range_max=1024)
    assert (parsed.port_min, parsed.port_max) == (0, 1024)
    parsed = good_rule(protocol="udp", port_range_min=1, port_range_max=65535)
    assert (parsed.port_min, parsed.port_max) == (1, 65535)


def test_the_whole_port_range_is_no_restriction() -> None:
    parsed = good_rule(protocol="tcp", port_range_min=0, port_range_max=65535)
    assert (parsed.port_min, parsed.port_max) == (None, None)


@pytest.mark.parametrize("protocol", [None, "any", "0", 0, "", "all", "gre", "vrrp", "112"])
@pytest.mark.parametrize("ports", [
    {"port_range_min": 22, "port_range_max": 22}, {"port_range_min": 22},
    {"port_range_min": 0}, {"source_port_range_min": 1, "source_port_range_max": 2}],
    ids=["range", "min", "zero", "source"])
def test_ports_without_a_port_protocol_are_rejected(protocol: Any,
                                                    ports: dict[str, int]) -> None:
    """Neutron's API refuses ports without tcp/udp/udplite/sctp/dccp
    (SecurityGroupProtocolRequiredWithPorts, ...InvalidProtocolForPortRange).
    Dropping the ports instead made `{ingress, port 22}` an allow-all rule.
    """
    raw = rule(**ports)
    raw["protocol"] = protocol
    policy = load_group_rule(raw)
    assert policy.groups["sg"] == (good_rule(protocol="tcp", port_range_min=22),)
    [error] = [e for e in policy.errors if e.startswith("security group 'sg' rule 1 ")]
    assert "has a port range but" in error and "ports need tcp" in error


@pytest.mark.parametrize("protocol", [None, "any", "gre"])
def test_portless_rules_without_ports_still_load(protocol: str | None) -> None:
    parsed = good_rule(protocol=protocol, port_range_min=None)
    assert (parsed.port_min, parsed.port_max, parsed.source_port_min,
            parsed.source_port_max) == (None, None, None, None)


@pytest.mark.parametrize("raw", [rule(protocol="tcp", port_range_min="²"),
                                 rule(protocol="¹")], ids=["port", "protocol"])
def test_unicode_digit_strings_are_rejected_not_a_crash(raw: dict[str, Any]) -> None:
    policy = load_group_rule(raw)
    assert [e for e in policy.errors if e.startswith("security group 'sg' rule 1 ")]


# ---------------------------------------------------------------- protocols

@pytest.mark.parametrize(("protocol", "number"), [
    ("tcp", 6), ("TCP", 6), (" udp ", 17), ("icmp", 1), ("sctp", 132), ("dccp", 33),
    ("udplite", 136), ("vrrp", 112), ("gre", 47), ("ipip", 4), ("pgm", 113),
    (6, 6), ("6", 6), ("17", 17), (132, 132), ("255", 255), (94, 94), ("99", 99),
])
def test_protocol_names_and_numbers(protocol: Any, number: int) -> None:
    assert good_rule(protocol=protocol).protocol == number


@pytest.mark.parametrize("protocol", [None, "", "0", 0, "any", "ANY", "all", "00"])
def test_any_protocol_words_mean_no_protocol(protocol: Any) -> None:
    """test_filter_ipv4_ingress_protocol_{blank,zero}: no `-p` at all."""
    assert good_rule(protocol=protocol).protocol is None


@pytest.mark.parametrize("protocol", ["icmp", "1", 1, "icmpv6", "ipv6-icmp", "58"])
def test_icmp_on_ipv6_becomes_ipv6_icmp(protocol: Any) -> None:
    assert good_rule(ethertype="IPv6", protocol=protocol).protocol == 58


@pytest.mark.parametrize("protocol", ["icmpv6", "ipv6-icmp", "58", 58])
def test_icmpv6_on_an_ipv4_rule_is_rejected(protocol: Any) -> None:
    assert_group_rule_rejected(rule(protocol=protocol), "is ICMPv6 with IPv4")


@pytest.mark.parametrize(("protocol", "reason"), [
    ("foo", "is not a known protocol"), ("tcp;", "is not a known protocol"),
    ("tcp -j ACCEPT", "is not a known protocol"), ("1000", "is not a known protocol"),
    ("256", "is not from 0 to 255"), (256, "is not from 0 to 255"),
    ("-1", "is not a known protocol"), (6.0, "is not a protocol name or number"),
    (True, "is not a protocol name or number"), ([6], "is not a protocol name or number"),
])
def test_unknown_protocols_are_rejected(protocol: Any, reason: str) -> None:
    assert_group_rule_rejected(rule(protocol=protocol), "protocol", reason)


# ---------------------------------------------------------------- ICMP type and code

def test_icmp_type_and_code_are_kept() -> None:
    parsed = good_rule(protocol="icmp", port_range_min=8, port_range_max=0)
    assert (parsed.port_min, parsed.port_max) == (8, 0)
    parsed = good_rule(ethertype="IPv6", protocol="ipv6-icmp", port_range_min=128)
    assert (parsed.port_min, parsed.port_max) == (128, None)


def test_icmp_type_above_255_is_rejected() -> None:
    assert_group_rule_rejected(rule(protocol="icmp", port_range_min=256),
                               "ICMP type/code 256/None must be from 0 to 255")
    assert_group_rule_rejected(rule(protocol="icmp", port_range_min=3, port_range_max=300),
                               "ICMP type/code 3/300 must be from 0 to 255")


def test_icmp_code_without_type_is_rejected() -> None:
    assert_group_rule_rejected(rule(protocol="icmp", port_range_max=0),
                               "has an ICMP code (0) without a type")


def test_icmp_drops_source_ports() -> None:
    parsed = good_rule(protocol="icmp", port_range_min=8, source_port_range_min=5)
    assert parsed.source_port_min is None


def test_neutron_ra_provider_rule_keeps_its_icmpv6_type() -> None:
    parsed = good_rule(ethertype="IPv6", protocol="ipv6-icmp", source_port_range_min=134)
    assert parsed.port_min == 134


def test_icmpv4_type_255_is_rejected() -> None:
    assert_group_rule_rejected(rule(protocol="icmp", port_range_min=255), "255")


# ---------------------------------------------------------------- prefixes: remote and local

def test_remote_ip_prefix_aliases_by_direction() -> None:
    """source_ip_prefix on ingress and dest_ip_prefix on egress are the far side."""
    assert good_rule(source_ip_prefix="10.1.0.0/16").remote_ip_prefix == "10.1.0.0/16"
    egress = good_rule(direction="egress", dest_ip_prefix="10.2.0.0/16")
    assert (egress.remote_ip_prefix, egress.local_ip_prefix) == ("10.2.0.0/16", None)


def test_local_side_prefix_as_neutron_provider_rules_send_it() -> None:
    """An ingress rule with dest_ip_prefix (the DHCP provider rule) is the port's side."""
    dhcp = good_rule(protocol="udp", port_range_min=68, port_range_max=68,
                     source_port_range_min=67, source_port_range_max=67,
                     dest_ip_prefix="10.0.0.5/32")
    assert (dhcp.remote_ip_prefix, dhcp.local_ip_prefix) == (None, "10.0.0.5/32")
    assert (dhcp.port_min, dhcp.source_port_min) == (68, 67)
    egress = good_rule(direction="egress", source_ip_prefix="10.0.0.5")
    assert (egress.remote_ip_prefix, egress.local_ip_prefix) == (None, "10.0.0.5/32")


def test_same_prefix_under_both_names_is_accepted() -> None:
    parsed = good_rule(remote_ip_prefix="10.0.0.0/8", source_ip_prefix="10.0.0.0/8")
    assert parsed.remote_ip_prefix == "10.0.0.0/8"


def test_conflicting_prefix_aliases_are_rejected() -> None:
    assert_group_rule_rejected(rule(remote_ip_prefix="10.0.0.0/8",
                                    source_ip_prefix="10.0.0.0/16"),
                               "has both remote_ip_prefix and source_ip_prefix")


def test_bad_local_prefix_is_rejected() -> None:
    assert_group_rule_rejected(rule(dest_ip_prefix="::1"), "dest_ip_prefix",
                               "is not an IPv4 address")


@pytest.mark.parametrize("extra", [
    {"remote_ip_prefix": "10.0.0.0/8", "remote_group_id": "sg"},
    {"remote_ip_prefix": "10.0.0.0/8", "remote_address_group_id": "ag"},
    {"remote_group_id": "sg", "remote_address_group_id": "ag"},
])
def test_only_one_remote_is_allowed(extra: dict[str, str]) -> None:
    assert_group_rule_rejected(rule(**extra), "may have only one of remote_ip_prefix")


def test_remote_group_and_address_group_ids_are_whitelisted() -> None:
    assert good_rule(remote_group_id="sg-web").remote_group_id == "sg-web"
    assert good_rule(remote_address_group_id="ag.1").remote_address_group_id == "ag.1"
    assert_group_rule_rejected(rule(remote_group_id="sg web"), "remote_group_id 'sg web'",
                               "is not a valid id")
    assert_group_rule_rejected(rule(remote_address_group_id="$(x)"),
                               "remote_address_group_id '$(x)'", "is not a valid id")


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False),
                                                 ("false", False), ("True", True)])
def test_stateful_flag(value: Any, expected: bool) -> None:
    assert good_rule(stateful=value).stateful is expected


@pytest.mark.parametrize("value", ["yes", 0, 1, "0"])
def test_stateful_must_be_a_boolean(value: Any) -> None:
    assert_group_rule_rejected(rule(stateful=value), "stateful", "is not a boolean")


# ---------------------------------------------------------------- unknown keys

def test_rules_are_strict_about_keys_even_when_ports_are_lenient() -> None:
    """A misspelt port_range_min would silently widen the rule."""
    raw = rule(protocol="tcp", port_range_mni=22)
    for strict in (True, False):
        policy = parse_policy({"security_groups": {"sg": [raw]}}, strict=strict)
        assert policy.groups["sg"] == ()
        assert policy.errors == ("security group 'sg' rule 0 has unknown keys "
                                 "['port_range_mni']",)


def test_neutron_bookkeeping_keys_on_rules_are_accepted() -> None:
    parsed = good_rule(id="r1", security_group_id="sg", tenant_id="t", project_id="t",
                       description="anything", normalized_cidr=None, revision_number=3)
    assert parsed == Rule(direction="ingress", ethertype="IPv4")


def test_unknown_port_keys_are_rejected_in_the_policy_file() -> None:
    assert_port_rejected(port(mac_adress=MAC), "port 'p1' has unknown keys ['mac_adress']")


def test_unknown_port_keys_are_ignored_with_strict_false() -> None:
    policy = load_ports(port(binding_host_id="node1", extra_dhcp_opts=[]), strict=False)
    assert policy.errors == ()
    assert sorted(p.id for p in policy.ports) == ["good", "p1"]


def test_unknown_top_level_keys_are_reported_but_the_rest_loads() -> None:
    policy = parse_policy({"security_group": {}, "ports": [port()]})
    assert policy.errors == ("policy has unknown top-level keys ['security_group'] (ignored)",)
    assert [p.id for p in policy.ports] == ["p1"]
    assert parse_policy({"security_group": {}}, strict=False).errors == ()


# ---------------------------------------------------------------- MACs

@pytest.mark.parametrize(("given", "normalised"), [
    ("FA:16:3E:AB:CD:EF", "fa:16:3e:ab:cd:ef"),
    ("fa-16-3e-ab-cd-ef", "fa:16:3e:ab:cd:ef"),
    ("02:00:00:00:00:00", "02:00:00:00:00:00"),
])
def test_macs_are_normalised(given: str, normalised: str) -> None:
    assert parse_port(port(mac_address=given), strict=True).mac_address == normalised


@pytest.mark.parametrize("mac", ["fa:16:3e:00:00", "fa:16:3e:00:00:001", "zz:16:3e:00:00:01",
                                 "fa163e000001", "fa:16:3e:00:00:01 ", "", None, 0xFA163E,
                                 "fa:16:3e:00:00:01;x"])
def test_bad_macs_are_rejected(mac: Any) -> None:
    assert_port_rejected(port(mac_address=mac), "port 'p1' mac_address", "is not a MAC address")


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "33:33:00:00:00:01",
                                 "ff:ff:ff:ff:ff:ff", "FB:16:3E:00:00:01"])
def test_multicast_macs_are_rejected(mac: str) -> None:
    assert_port_rejected(port(mac_address=mac), "port 'p1' mac_address",
                         "is a multicast MAC address")


# ---------------------------------------------------------------- ids and device names

HOSTILE_NAMES = [
    "has space", "quote'd", 'double"q', "semi;colon", "new\nline", "--comment", "-j",
    "bang!", "plus+", "dollar$(x)", "back`tick`", "slash/x", "tilde~", "ünïcode", "x\x00",
    "tab\tx", "", "\n",
]


@pytest.mark.parametrize("bad", HOSTILE_NAMES + ["a" * 65, 42, None])
def test_port_ids_outside_the_whitelist_are_rejected_by_position(bad: Any) -> None:
    assert_port_rejected(port(id=bad), "port #1 id", "is not a valid id")


def test_id_length_limit() -> None:
    assert parse_port(port(id="a" * 64, device="tapx"), strict=True).id == "a" * 64


@pytest.mark.parametrize("bad", [n for n in HOSTILE_NAMES if n] +
                         ["tap" + "x" * 13, "tap:x", "tap.x y", 7])
def test_device_names_outside_the_whitelist_are_rejected(bad: Any) -> None:
    assert_port_rejected(port(device=bad), "port 'p1' device", "is not a valid device name")


def test_device_name_limit_and_default() -> None:
    assert parse_port(port(device="tap" + "x" * 12), strict=True).device == "tap" + "x" * 12
    parsed = parse_port(port(id="6f1c2a4e-0001-4000-8000-000000000001"), strict=True)
    assert parsed.device == "tap6f1c2a4e-00"


def test_default_device_from_an_id_with_a_colon_is_rejected_naming_the_port() -> None:
    assert_port_rejected(port(id="a:b"), "port 'a:b' device 'tapa:b'")


@pytest.mark.parametrize("bad", [n for n in HOSTILE_NAMES if n])
def test_group_ids_outside_the_whitelist_are_rejected(bad: str) -> None:
    policy = parse_policy({"security_groups": {bad: [rule()], "sg": [rule()]},
                           "ports": [port()]})
    assert policy.errors == (f"security group {bad!r} is not a valid id (letters, digits, "
                             f"'_.:-', at most 64)",)
    assert list(policy.groups) == ["sg"]
    assert [p.id for p in policy.ports] == ["p1"]


@pytest.mark.parametrize("bad", [n for n in HOSTILE_NAMES if n])
def test_a_port_naming_a_bad_group_id_is_rejected(bad: str) -> None:
    assert_port_rejected(port(security_groups=["sg", bad]), "port 'p1' security group",
                         "is not a valid id")


@pytest.mark.parametrize("bad", ["x y", "x;y", 5])
def test_network_id_is_whitelisted(bad: Any) -> None:
    assert_port_rejected(port(network_id=bad), "port 'p1' network_id", "is not a valid id")


@pytest.mark.parametrize("bad", ["network dhcp", "a" * 65, 5, "x\ny"])
def test_device_owner_is_whitelisted(bad: Any) -> None:
    assert_port_rejected(port(device_owner=bad), "port 'p1' device_owner", "is not valid")


@pytest.mark.parametrize("field", ["id", "device", "mac_address", "security_groups",
                                   "network_id"])
def test_trailing_newline_is_rejected(field: str) -> None:
    values: dict[str, Any] = {"id": "p1\n", "device": "tapp1\n", "mac_address": MAC + "\n",
                              "security_groups": ["sg\n"], "network_id": "net\n"}
    assert_port_rejected(port(**{field: values[field]}), "port")


@pytest.mark.parametrize("field", ["fixed_ips", "allowed_address_pairs"])
def test_ipv6_scope_ids_are_rejected(field: str) -> None:
    hostile = "fe80::1%x -j ACCEPT"
    value = [hostile] if field == "fixed_ips" else [{"ip_address": hostile}]
    assert_port_rejected(port(**{field: value}), "port 'p1'")


# ---------------------------------------------------------------- fixed IPs and address pairs

def test_fixed_ips_in_both_shapes_and_deduplicated() -> None:
    parsed = parse_port(port(fixed_ips=["10.0.0.5", {"ip_address": "2001:DB8::5",
                                                      "subnet_id": "s1"}, "10.0.0.5"]),
                        strict=True)
    assert parsed.fixed_ips == ("10.0.0.5", "2001:db8::5")
    assert parsed.ips(4) == ("10.0.0.5",) and parsed.ips(6) == ("2001:db8::5",)


@pytest.mark.parametrize("bad", ["10.0.0.0/24", "10.0.0.256", "x", 5, None, {"ip": "1.2.3.4"}])
def test_bad_fixed_ips_are_rejected(bad: Any) -> None:
    assert_port_rejected(port(fixed_ips=["10.0.0.6", bad]), "port 'p1' fixed_ips entry",
                         "is not an IP address")


def test_fixed_ips_must_be_a_list() -> None:
    assert_port_rejected(port(fixed_ips="10.0.0.5"), "port 'p1' fixed_ips", "is not a list")


def test_allowed_address_pairs() -> None:
    parsed = parse_port(port(allowed_address_pairs=[
        {"ip_address": "10.0.0.99"},
        {"ip_address": "10.0.1.7/24", "mac_address": "FA:16:3E:CC:CC:CC"},
        {"ip_address": "2001:db8::99", "mac_address": None},
        {"ip_address": "10.0.0.99"},
    ]), strict=True)
    assert parsed.allowed_address_pairs == (
        AddressPair("10.0.0.99/32"),
        AddressPair("10.0.1.0/24", "fa:16:3e:cc:cc:cc"),
        AddressPair("2001:db8::99/128"),
    )


@pytest.mark.parametrize(("pair", "reason"), [
    ({"ip_address": "10.0.0.1", "mac": MAC}, "must be a mapping of ip_address"),
    ({"ip_address": "10.0.0.1", "mac_address": MAC, "x": 1}, "must be a mapping of ip_address"),
    ("10.0.0.1", "must be a mapping of ip_address"),
    ({}, "allowed address pair ip_address None is not an IP address or CIDR"),
    ({"ip_address": "10.0.0.1/40"}, "is not an IP address or CIDR"),
    ({"ip_address": "10.0.0.1", "mac_address": "01:00:5e:00:00:01"}, "multicast"),
    ({"ip_address": "10.0.0.1", "mac_address": "nope"}, "is not a MAC address"),
])
def test_bad_allowed_address_pairs_are_rejected(pair: Any, reason: str) -> None:
    assert_port_rejected(port(allowed_address_pairs=[pair]), "port 'p1' allowed address pair",
                         reason)


# ---------------------------------------------------------------- other port fields

@pytest.mark.parametrize(("value", "expected"), [(None, True), (True, True), (False, False),
                                                 ("false", False)])
def test_port_security_enabled(value: Any, expected: bool) -> None:
    raw = port() if value is None else port(port_security_enabled=value)
    assert parse_port(raw, strict=True).port_security_enabled is expected


def test_port_security_enabled_must_be_a_boolean() -> None:
    assert_port_rejected(port(port_security_enabled=0), "port 'p1' port_security_enabled",
                         "is not a boolean")


def test_per_port_rules_are_parsed_and_named() -> None:
    parsed = parse_port(port(security_group_rules=[rule(protocol="udp", port_range_min=68)]),
                        strict=True)
    assert parsed.security_group_rules == (good_rule(protocol="udp", port_range_min=68),)
    assert_port_rejected(port(security_group_rules=[rule(), rule(protocol="nope")]),
                         "port 'p1' security_group_rules[1] protocol 'nope'")


@pytest.mark.parametrize("raw", [5, "p1", ["id", "p1"], None])
def test_a_port_that_is_not_a_mapping_is_rejected_by_position(raw: Any) -> None:
    assert_port_rejected(raw, "port #1", "is not a mapping")


def test_groups_are_deduplicated_in_order() -> None:
    parsed = parse_port(port(security_groups=["b", "a", "b"]), strict=True)
    assert parsed.security_groups == ("b", "a")


# ---------------------------------------------------------------- duplicates

def test_duplicate_port_ids_drop_every_claimant() -> None:
    policy = load_ports(port(), port(device="tapother", mac_address="fa:16:3e:00:00:02"))
    assert [p.id for p in policy.ports] == ["good"]
    assert policy.errors == ("port 'p1' is defined 2 times; all dropped",) * 2


def test_duplicate_devices_drop_every_claimant() -> None:
    policy = load_ports(port(id="a", device="tapx"), port(id="b", device="tapx"))
    assert [p.id for p in policy.ports] == ["good"]
    assert policy.errors == ("port 'a' device 'tapx' is claimed by 2 ports; all dropped",
                             "port 'b' device 'tapx' is claimed by 2 ports; all dropped")


def test_a_default_device_can_collide_with_an_explicit_one() -> None:
    policy = load_ports(port(id="abc"), port(id="other", device="tapabc"))
    assert [p.id for p in policy.ports] == ["good"]
    assert len(policy.errors) == 2 and all("device 'tapabc'" in e for e in policy.errors)


# ---------------------------------------------------------------- groups, members, documents

def test_groups_load_good_rules_and_drop_bad_ones_with_their_index() -> None:
    policy = parse_policy({"security_groups": {
        "sg": [rule(protocol="tcp", port_range_min=22), rule(protocol="bad"),
               rule(protocol="tcp", port_range_min=22), rule(direction="out")],
        "sg2": "not a list",
    }})
    assert policy.groups["sg"] == (good_rule(protocol="tcp", port_range_min=22),)  # deduped
    assert "sg2" not in policy.groups
    assert policy.errors == (
        "security group 'sg' rule 1 protocol 'bad' is not a known protocol",
        "security group 'sg' rule 3 direction 'out' is not ingress or egress",
        "security group 'sg2' 'not a list' is not a list",
    )


@pytest.mark.parametrize("raw", [["ingress"], "ingress", None, 5])
def test_a_rule_that_is_not_a_mapping_is_rejected(raw: Any) -> None:
    policy = parse_policy({"security_groups": {"sg": [rule(), raw]}})
    assert policy.errors == (f"security group 'sg' rule 1 {raw!r} is not a mapping",)
    assert policy.groups == {"sg": (good_rule(),)}


def test_member_ips() -> None:
    policy = parse_policy({"sg_member_ips": {
        "sg": {"IPv4": [["10.0.0.1", None], ["10.1.0.0/16", MAC], "10.0.0.2"],
               "IPv6": [["2001:db8::1", MAC]]},
        "bad-family": {"IPv4": [["2001:db8::1", None]]},
        "bad-ethertype": {"ipv4": []},
        "not-mapping": [],
    }})
    assert policy.members == {"sg": {4: frozenset({"10.0.0.1/32", "10.1.0.0/16",
                                                   "10.0.0.2/32"}),
                                     6: frozenset({"2001:db8::1/128"})}}
    assert policy.errors == (
        "sg_member_ips of 'bad-family' IPv4 member '2001:db8::1' is not an IPv4 address",
        "sg_member_ips of 'bad-ethertype' ethertype 'ipv4' is not IPv4 or IPv6",
        "sg_member_ips of 'not-mapping' [] is not a mapping of ethertype to members",
    )


def test_address_groups() -> None:
    policy = parse_policy({"address_groups": {"ag": ["10.0.0.0/8", "2001:db8::/32",
                                                     "10.0.0.1"],
                                              "bad": ["10.0.0.0/8", "x"],
                                              "b d": []}})
    assert policy.address_groups == {"ag": ("10.0.0.0/8", "10.0.0.1/32", "2001:db8::/32")}
    assert policy.errors == ("address group 'bad' entry 'x' is not an IP address or CIDR",
                             "address group 'b d' is not a valid id (letters, digits, '_.:-', "
                             "at most 64)")


@pytest.mark.parametrize(("doc", "error"), [
    ([], "policy [] is not a mapping"),
    ("text", "policy 'text' is not a mapping"),
    ({"security_groups": ["sg"]}, "security_groups ['sg'] is not a mapping of group id to "
                                  "rules"),
    ({"ports": {"id": "p1"}}, "ports {'id': 'p1'} is not a list"),
    ({"sg_member_ips": []}, "sg_member_ips [] is not a mapping"),
    ({"address_groups": "x"}, "address_groups 'x' is not a mapping"),
])
def test_malformed_documents_are_reported_not_raised(doc: Any, error: str) -> None:
    assert parse_policy(doc).errors == (error,)


def test_a_mixed_document_keeps_every_good_object() -> None:
    policy = parse_policy({
        "security_groups": {"sg": [rule(), rule(protocol="zzz")], "sg;x": []},
        "ports": [port(), port(id="bad;"), port(id="p2", device="tapp2",
                                                mac_address="fa:16:3e:00:00:02",
                                                fixed_ips=["10.0.0.300"])],
        "sg_member_ips": {"sg": {"IPv4": ["10.9.9.9"]}},
    })
    assert [p.id for p in policy.ports] == ["p1"]
    assert policy.groups == {"sg": (good_rule(),)}
    assert policy.members == {"sg": {4: frozenset({"10.9.9.9/32"})}}
    assert len(policy.errors) == 4
    named = ["security group 'sg' rule 1", "security group 'sg;x'", "port #1 id 'bad;'",
             "port 'p2' fixed_ips entry '10.0.0.300'"]
    for name in named:
        assert any(name in e for e in policy.errors), (name, policy.errors)


# ---------------------------------------------------------------- the policy file

POLICY_YAML = """
security_groups:
  sg-web:
    - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 80}
    - {direction: ingress, ethertype: IPv4, protocol: icmp, remote_group_id: sg-web}
ports:
  - {id: web1, mac_address: "fa:16:3e:00:00:11", fixed_ips: [10.0.0.11, "2001:db8::11"],
     security_groups: [sg-web], allowed_address_pairs: [{ip_address: 10.0.5.0/24}]}
  - {id: db1, mac_address: "fa:16:3e:00:00:21", fixed_ips: [10.0.0.21],
     security_groups: [sg-db]}
sg_member_ips:
  sg-web: {IPv4: [[10.9.0.1, null]]}
"""


def test_load_policy_text_derives_members_from_every_port() -> None:
    policy = load_policy_text(POLICY_YAML)
    assert policy.errors == ()
    assert policy.members == {
        "sg-web": {4: frozenset({"10.0.0.11/32", "10.0.5.0/24", "10.9.0.1/32"}),
                   6: frozenset({"2001:db8::11/128"})},
        "sg-db": {4: frozenset({"10.0.0.21/32"})},
    }


def test_load_policy_text_reads_json_too() -> None:
    policy = load_policy_text(json.dumps({"ports": [{"id": "p1", "mac_address": MAC}]}))
    assert [p.device for p in policy.ports] == ["tapp1"]


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_an_empty_policy_file_is_an_empty_policy(text: str) -> None:
    assert load_policy_text(text) == Policy()


@pytest.mark.parametrize("text", ["ports: [", "{not json", "a: b: c", "\t- x"])
def test_unparsable_text_raises_policy_file_error_naming_the_path(text: str) -> None:
    with pytest.raises(PolicyFileError, match="^/etc/hostfw/policy.yaml: not valid YAML or "
                                              "JSON"):
        load_policy_text(text, "/etc/hostfw/policy.yaml")


def test_a_yaml_scalar_document_is_reported_as_an_error() -> None:
    assert load_policy_text("just a string").errors == ("policy 'just a string' is not a "
                                                        "mapping",)


@pytest.mark.parametrize("text", ["[" * 1000, '{"a": ' + "[" * 2000], ids=["yaml", "json"])
def test_deeply_nested_text_is_a_policy_file_error(text: str) -> None:
    with pytest.raises(PolicyFileError):
        load_policy_text(text)


def test_derive_members_merges_extra_members_and_pairs() -> None:
    policy = parse_policy({"ports": [
        port(id="a", security_groups=["g1", "g2"],
             allowed_address_pairs=[{"ip_address": "2001:db8::/64"}]),
        port(id="b", device="tapb", fixed_ips=[], security_groups=["g2"]),
    ]})
    extra = {"g3": {4: frozenset({"192.0.2.0/24"})}, "g1": {4: frozenset({"10.0.0.1/32"})}}
    members = derive_members(policy.ports, extra)
    assert members == {
        "g1": {4: frozenset({"10.0.0.1/32", "10.0.0.5/32"}), 6: frozenset({"2001:db8::/64"})},
        "g2": {4: frozenset({"10.0.0.5/32"}), 6: frozenset({"2001:db8::/64"})},
        "g3": {4: frozenset({"192.0.2.0/24"})},
    }


def test_policy_objects_are_frozen() -> None:
    parsed = parse_port(port(), strict=True)
    with pytest.raises(AttributeError):
        parsed.id = "other"  # type: ignore[misc]
    assert replace(parsed, id="x").id == "x"
