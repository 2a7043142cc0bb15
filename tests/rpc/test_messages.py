"""What the agent accepts from RPC: notifications and pull replies (no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.model import Invalid
from agent.sources import rpc_api
from agent.sources.rpc_cache import policy_from_replies
from agent.sources.rpc_messages import MalformedReply, parse_notice

PORT_ID = "6f1c2a4e-0001-4000-8000-000000000001"


def neutron_port(**extra: Any) -> dict[str, Any]:
    """A port as Neutron's reply carries it, extra keys and all."""
    return {"id": PORT_ID, "device": "tap6f1c2a4e-00", "mac_address": "fa:16:3e:00:00:11",
            "fixed_ips": ["10.0.0.11"], "allowed_address_pairs": [],
            "security_groups": ["sg-web"], "security_group_rules": [],
            "security_group_source_groups": ["sg-web"], "port_security_enabled": True,
            "device_owner": "compute:nova", "network_id": "net-1", "admin_state_up": True,
            "binding:host_id": "node-1", "status": "ACTIVE", **extra}


def reply(**extra: Any) -> dict[str, Any]:
    return {
        "devices": {PORT_ID: neutron_port()},
        "security_groups": {"sg-web": [
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp",
             "remote_group_id": "sg-web", "stateful": True},
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
             "port_range_min": 80, "port_range_max": 80, "source_ip_prefix": "10.9.0.0/16"},
            {"direction": "ingress", "ethertype": "IPv4",
             "remote_address_group_id": "ag-admins"},
        ]},
        "sg_member_ips": {
            "sg-web": {"IPv4": [["10.0.0.11", None], ["10.0.0.99", "fa:16:3e:00:00:99"]]},
            "ag-admins": {"IPv4": [["192.0.2.0/24", None]]}},
        **extra,
    }


# ---------------------------------------------------------------- notifications

@pytest.mark.parametrize("method", [rpc_api.RULE_UPDATED, rpc_api.MEMBER_UPDATED])
def test_group_notices_carry_their_groups(method: str) -> None:
    notice = parse_notice(method, {"security_groups": ["sg-a", "sg-b"]})
    assert notice.groups == {"sg-a", "sg-b"}


def test_port_update_takes_neutron_api_ports_and_ignores_ml2_extras() -> None:
    port = neutron_port(fixed_ips=[{"subnet_id": "s1", "ip_address": "10.0.0.11"}])
    del port["device"]
    notice = parse_notice(rpc_api.PORT_UPDATE, {"port": port, "network_type": "vxlan",
                                                "segmentation_id": 7,
                                                "physical_network": None})
    assert (notice.port_id, notice.device) == (PORT_ID, "tap6f1c2a4e-00")


@pytest.mark.parametrize("method,kwargs,reason", [
    (rpc_api.RULE_UPDATED, {}, "is not a list"),
    (rpc_api.RULE_UPDATED, {"security_groups": "sg-a"}, "is not a list"),
    (rpc_api.MEMBER_UPDATED, {"security_groups": ["ok", "bad id!"]}, "not a valid id"),
    (rpc_api.MEMBER_UPDATED, {"security_groups": [None]}, "not a valid id"),
    (rpc_api.PORT_UPDATE, {"port": "p1"}, "is not a mapping"),
    (rpc_api.PORT_UPDATE, {"port": neutron_port(mac_address="zz")}, "is not a MAC"),
    (rpc_api.PORT_DELETE, {"port_id": ["x"]}, "not a valid id"),
    ("security_groups_provider_updated", {}, "unknown notification"),
])
def test_malformed_notices_are_rejected_with_a_reason(method: str, kwargs: dict[str, Any],
                                                      reason: str) -> None:
    with pytest.raises(Invalid, match=reason):
        parse_notice(method, kwargs)


# ---------------------------------------------------------------- pull replies

def test_reply_becomes_a_policy_with_members_and_address_groups() -> None:
    policy = policy_from_replies([(["tap6f1c2a4e-00"], reply())])
    assert [p.id for p in policy.ports] == [PORT_ID]
    rules = policy.groups["sg-web"]
    assert rules[1].remote_ip_prefix == "10.9.0.0/16"   # source_ip_prefix on ingress
    assert policy.members["sg-web"][4] == {"10.0.0.11/32", "10.0.0.99/32"}
    assert policy.address_groups == {"ag-admins": ("192.0.2.0/24",)}
    assert policy.errors == ()


def test_chunks_merge() -> None:
    other = neutron_port(id="7f1c2a4e-0002", device="tap7f1c2a4e-00", fixed_ips=["10.0.0.12"])
    second = {"devices": {"7f1c2a4e-0002": other}, "security_groups": {"sg-web": []},
              "sg_member_ips": {}}
    policy = policy_from_replies([(["tap6f1c2a4e-00"], reply()),
                                  (["tap7f1c2a4e-00"], second)])
    assert {p.device for p in policy.ports} == {"tap6f1c2a4e-00", "tap7f1c2a4e-00"}
    assert policy.groups["sg-web"] == ()   # the later chunk is the newer view


def test_a_bad_port_is_left_out_and_the_rest_kept() -> None:
    bad = neutron_port(id="7f1c2a4e-0002", device="tap7f1c2a4e-00", mac_address="zz")
    data = reply()
    data["devices"]["7f1c2a4e-0002"] = bad
    policy = policy_from_replies([(["tap6f1c2a4e-00", "tap7f1c2a4e-00"], data)])
    assert [p.id for p in policy.ports] == [PORT_ID]
    assert any("is not a MAC" in e for e in policy.errors)


def test_a_reply_may_not_describe_devices_not_asked_for() -> None:
    policy = policy_from_replies([(["tapother"], reply())])
    assert policy.ports == ()
    assert any("was not asked for" in e for e in policy.errors)


def test_a_port_filed_under_another_id_is_refused() -> None:
    data = reply()
    data["devices"] = {"someone-else": neutron_port()}
    policy = policy_from_replies([(["tap6f1c2a4e-00"], data)])
    assert policy.ports == () and any("another id" in e for e in policy.errors)


@pytest.mark.parametrize("bad", [None, [], "x", {"devices": []},
                                 {"devices": {}, "security_groups": "x"},
                                 {"devices": {}, "sg_member_ips": [1]}])
def test_a_malformed_reply_is_rejected_whole(bad: Any) -> None:
    with pytest.raises(MalformedReply):
        policy_from_replies([(["tap6f1c2a4e-00"], reply()), (["tapx"], bad)])


def test_bad_rules_and_members_fail_closed_for_their_group_only() -> None:
    data = reply()
    data["security_groups"]["sg-web"].append({"direction": "sideways"})
    data["sg_member_ips"]["sg-web"] = {"IPv4": [["not-an-ip", None]]}
    policy = policy_from_replies([(["tap6f1c2a4e-00"], data)])
    assert len(policy.groups["sg-web"]) == 3            # the good rules stay
    assert "sg-web" not in policy.members               # no members: matches nobody
    assert len(policy.errors) == 2
