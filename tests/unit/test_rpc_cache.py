"""The RPC cache's merge rules and the notification -> devices table, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from agent.sources import rpc_api
from agent.sources.rpc_cache import PolicyCache, cover, devices_to_pull
from agent.sources.rpc_messages import MalformedReply, Notice

RULE = {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
        "port_range_min": 22, "port_range_max": 22}


def port(n: int, groups: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": f"p{n}", "device": f"tap{n}", "mac_address": f"fa:16:3e:00:00:{n:02x}",
            "fixed_ips": [f"10.0.0.{n}"], "security_groups": groups, **extra}


def reply(*ports: dict[str, Any], groups: dict[str, Any] | None = None,
          members: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"devices": {p["id"]: p for p in ports}, "security_groups": groups or {},
            "sg_member_ips": members or {}}


def full_cache() -> PolicyCache:
    cache = PolicyCache()
    cache.merge([(["tap1", "tap2", "tap3"], reply(
        port(1, ["a"]), port(2, ["a", "b"]), port(3, ["c"]),
        groups={"a": [RULE], "b": [{**RULE, "remote_group_id": "r"}], "c": [RULE]},
        members={"r": {"IPv4": [["10.1.0.1", None]]}}))], full=True)
    return cache


def test_cover_picks_the_fewest_devices() -> None:
    sets = {"tap1": frozenset("a"), "tap2": frozenset("ab"), "tap3": frozenset("c")}
    assert cover({"a", "b"}, sets) == ["tap2"]
    assert cover({"a", "c", "zzz"}, sets) == ["tap1", "tap3"]   # ties go to the first name
    assert cover({"zzz"}, sets) == []


@pytest.mark.parametrize(("notice", "expected"), [
    (Notice(rpc_api.RULE_UPDATED, groups=frozenset({"a", "b"})), ["tap2"]),
    (Notice(rpc_api.RULE_UPDATED, groups=frozenset({"elsewhere"})), []),
    (Notice(rpc_api.MEMBER_UPDATED, groups=frozenset({"r"})), ["tap2"]),
    (Notice(rpc_api.MEMBER_UPDATED, groups=frozenset({"a"})), []),   # nobody's remote
    (Notice(rpc_api.PORT_UPDATE, port_id="p3", device="tap3"), ["tap3"]),
    (Notice(rpc_api.PORT_UPDATE, port_id="p3", device="tap9"), ["tap3", "tap9"]),
    (Notice(rpc_api.PORT_UPDATE, port_id="px", device="tapfar"), []),  # not on this node
    (Notice(rpc_api.PORT_DELETE, port_id="p1"), []),
])
def test_which_devices_a_notification_pulls(notice: Notice, expected: list[str]) -> None:
    local = frozenset({"tap1", "tap2", "tap3", "tap9"})
    assert devices_to_pull(notice, full_cache(), local) == expected


def test_a_partial_merge_replaces_only_what_it_speaks_for() -> None:
    cache = full_cache()
    before = cache.policy()
    cache.merge([(["tap1"], reply(port(1, ["a"]), groups={"a": [RULE, {**RULE,
                                                                        "port_range_min": 80,
                                                                        "port_range_max": 80}]}))],
                full=False)
    after = cache.policy()
    assert len(after.groups["a"]) == 2 and after.groups["c"] is before.groups["c"]
    assert [p is q for p, q in zip(before.ports, after.ports, strict=True)] == [True] * 3
    assert after.members["r"] is before.members["r"]


def test_a_device_left_out_of_a_partial_reply_loses_its_port() -> None:
    cache = full_cache()
    cache.merge([(["tap3"], reply())], full=False)
    assert {p.device for p in cache.policy().ports} == {"tap1", "tap2"}


def test_errors_belong_to_their_device_and_go_with_the_fix() -> None:
    cache = full_cache()
    cache.merge([(["tap3"], reply(port(3, ["c"], mac_address="nope")))], full=False)
    policy = cache.policy()
    assert any("nope" in e for e in policy.errors)
    assert "tap3" not in {p.device for p in policy.ports}   # fails closed
    cache.merge([(["tap3"], reply(port(3, ["c"])))], full=False)
    assert cache.policy().errors == ()


def test_a_malformed_reply_changes_nothing() -> None:
    cache = full_cache()
    before = cache.policy()
    with pytest.raises(MalformedReply):
        cache.merge([(["tap1"], reply(port(1, ["a"]))), (["tap2"], ["not", "a", "reply"])],
                    full=False)
    assert cache.policy() is before


def test_forgetting_a_port_or_device() -> None:
    cache = full_cache()
    assert cache.forget_port("p1") and not cache.forget_port("p1")
    assert cache.forget_devices(["tap2"]) and not cache.forget_devices(["tapx"])
    assert [p.device for p in cache.policy().ports] == ["tap3"]
