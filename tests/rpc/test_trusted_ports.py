"""Trusted ports over RPC: ML2's get_devices_details_list, parsed, served and fetched.

Why: Neutron leaves its `network:*` ports (DHCP, routers) out of the
security group reply; their devices are learnt from ML2's device details,
whose owner decides. The replies here have ML2's shape
(neutron/plugins/ml2/rpc.py `_get_device_details`: the found entry, the
bare `{"device": ...}` of an unknown device, and `no_active_binding`), so
what the parser accepts is what a Neutron server sends. The end-to-end test
runs the controller's endpoint on the private broker and fetches with a real
oslo.messaging client.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import oslo_messaging as messaging
import pytest
from oslo_messaging.rpc.dispatcher import ExpectedException

from agent.controller.endpoint import SecurityGroupInfo, Snapshot, build_reply, device_details
from agent.sources import rpc_api
from agent.sources.device_details import (
    DeviceDetail,
    fetch_device_details,
    parse_details,
    read_only_host,
)
from agent.sources.policy_file import load_policy_text
from agent.sources.rpc_cache import PolicyCache, unexplained
from agent.sources.rpc_messages import MalformedReply
from tests.rpc.broker import Broker
from tests.rpc.stack import notifier_transport

DHCP_ID = "d4c9a3f0-1111-4000-8000-00000000000d"
DHCP_TAP = "tap" + DHCP_ID[:11]
VM_ID = "5e4f0b1a-2222-4000-8000-000000000001"
VM_TAP = "tap" + VM_ID[:11]


def ml2_entry(device: str, port_id: str, owner: str, **extra: Any) -> dict[str, Any]:
    """One found entry as ML2 builds it (every key it sends)."""
    return {"device": device, "network_id": "net-1", "port_id": port_id,
            "mac_address": "fa:16:3e:00:00:0d", "admin_state_up": True,
            "network_type": "vxlan", "segmentation_id": 1001, "physical_network": None,
            "mtu": 1450, "fixed_ips": [{"subnet_id": "subnet-1", "ip_address": "10.0.0.2"}],
            "device_owner": owner, "allowed_address_pairs": [],
            "port_security_enabled": True, "qos_policy_id": None,
            "network_qos_policy_id": None, "profile": {}, "propagate_uplink_status": False,
            **extra}


# ---------------------------------------------------------------- parsing

def test_neutrons_reply_names_the_trusted_devices() -> None:
    router_tap = "tapr0uter0000"
    asked = [DHCP_TAP, router_tap, VM_TAP, "tapunknown01"]
    reply = [ml2_entry(DHCP_TAP, DHCP_ID, "network:dhcp"),
             ml2_entry(router_tap, "r0uter00-0000", "network:router_interface"),
             {"device": VM_TAP, "no_active_binding": True},   # a compute port bound elsewhere
             {"device": "tapunknown01"}]                      # not in Neutron's database
    parsed = parse_details(asked, reply)
    assert parsed.errors == ()
    assert parsed.trusted == {DHCP_TAP, router_tap}
    assert parsed.details[VM_TAP] == DeviceDetail(VM_TAP)
    assert parsed.details[DHCP_TAP] == DeviceDetail(DHCP_TAP, DHCP_ID, "network:dhcp")


def test_a_compute_port_is_never_trusted() -> None:
    parsed = parse_details([VM_TAP], [ml2_entry(VM_TAP, VM_ID, "compute:nova")])
    assert parsed.trusted == frozenset() and parsed.details[VM_TAP].port_id == VM_ID


@pytest.mark.parametrize("reply", [None, {"devices": []}, "tap", 3])
def test_a_reply_that_is_not_a_list_is_refused_whole(reply: Any) -> None:
    with pytest.raises(MalformedReply, match="get_devices_details_list reply"):
        parse_details([DHCP_TAP], reply)


@pytest.mark.parametrize(("entry", "reason"), [
    ("tapx", "is not a mapping"),
    ({"port_id": DHCP_ID, "device_owner": "network:dhcp"}, "device None"),
    ({"device": "tap; rm -rf", "port_id": DHCP_ID, "device_owner": "network:dhcp"}, "device"),
    (ml2_entry("tapother00000", DHCP_ID, "network:dhcp"), "was not asked for"),
    (ml2_entry(DHCP_TAP, "bad id!", "network:dhcp"), "port_id"),
    (ml2_entry(DHCP_TAP, DHCP_ID, ["network:dhcp"]), "device_owner"),
    (ml2_entry(DHCP_TAP, DHCP_ID, "network:" + "x" * 300), "device_owner"),
])
def test_a_bad_entry_is_left_out_with_a_reason_and_the_rest_kept(entry: Any,
                                                                 reason: str) -> None:
    router = ml2_entry("tapr0uter0000", "r0uter00-0000", "network:router_gateway")
    parsed = parse_details([DHCP_TAP, "tapr0uter0000"], [entry, router])
    assert parsed.trusted == {"tapr0uter0000"}           # the bad entry trusts nothing
    (error,) = parsed.errors
    assert "entry 0" in error and reason in error, error


def test_a_device_described_twice_differently_is_not_trusted_on_the_second_word() -> None:
    first = {"device": DHCP_TAP}
    second = ml2_entry(DHCP_TAP, DHCP_ID, "network:dhcp")
    parsed = parse_details([DHCP_TAP], [first, second])
    assert parsed.trusted == frozenset() and "described twice" in parsed.errors[0]


# ---------------------------------------------------------------- the controller

POLICY = f"""
security_groups: {{sg: [{{direction: egress, ethertype: IPv4}}]}}
ports:
  - {{id: {VM_ID}, mac_address: "fa:16:3e:00:00:01", fixed_ips: [10.0.0.5],
     security_groups: [sg], device_owner: "compute:nova", network_id: net-1}}
  - {{id: {DHCP_ID}, mac_address: "fa:16:3e:00:00:0d", fixed_ips: [10.0.0.2],
     security_groups: [], device_owner: "network:dhcp", network_id: net-1}}
"""


def snapshot() -> Snapshot:
    policy = load_policy_text(POLICY)
    assert policy.errors == ()
    return Snapshot.of(policy)


def test_only_devices_without_a_port_are_asked_about_and_trust_joins_the_policy() -> None:
    devices = [VM_TAP, DHCP_TAP, "tapnobody0000"]
    served = build_reply(snapshot(), devices)   # hostfw-controller serves network ports too
    assert unexplained([(devices, served)]) == ["tapnobody0000"]
    as_neutron = build_reply(snapshot(), [VM_TAP])   # Neutron leaves network:* out
    asked = unexplained([(devices, as_neutron)])
    assert asked == [DHCP_TAP, "tapnobody0000"]
    reply = [ml2_entry(DHCP_TAP, DHCP_ID, "network:dhcp"), "junk"]
    cache = PolicyCache()
    cache.merge([(devices, as_neutron)], full=True, details=parse_details(asked, reply))
    delivered = cache.policy()
    assert delivered.trusted_devices == {DHCP_TAP}
    assert [p.id for p in delivered.ports] == [VM_ID]
    assert len(delivered.errors) == 1 and "entry 1" in delivered.errors[0]


def test_the_controller_answers_as_ml2_does() -> None:
    reply = device_details(snapshot(), [DHCP_TAP, VM_TAP, "tapnobody0000"])
    assert reply[0]["device"] == DHCP_TAP and reply[0]["port_id"] == DHCP_ID
    assert reply[0]["device_owner"] == "network:dhcp"
    assert reply[0]["fixed_ips"] == [{"ip_address": "10.0.0.2"}]
    assert reply[2] == {"device": "tapnobody0000"}
    # The agent's parser reads it.
    assert parse_details([DHCP_TAP, VM_TAP, "tapnobody0000"], reply).trusted == {DHCP_TAP}


def test_the_controller_refuses_a_malformed_request() -> None:
    endpoint = SecurityGroupInfo(snapshot)
    with pytest.raises(ExpectedException):
        endpoint.get_devices_details_list({}, devices="tap")
    assert endpoint.get_devices_details_list({}, devices=["bad name!", DHCP_TAP])[0][
        "device"] == DHCP_TAP   # the bad name is left out, the rest answered


class Recording(SecurityGroupInfo):
    """The controller's endpoint, remembering the arguments of each details call."""

    def __init__(self) -> None:
        super().__init__(snapshot)
        self.calls: list[dict[str, Any]] = []

    def get_devices_details_list(self, context: Any, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append(kwargs)
        return super().get_devices_details_list(context, **kwargs)


@pytest.fixture
def served(broker: Broker) -> Iterator[tuple[messaging.RPCClient, Recording]]:
    """The controller's q-plugin endpoint on the broker, and a client of the agent's kind."""
    transport = notifier_transport(broker.url)
    endpoint = Recording()
    server = messaging.get_rpc_server(
        transport, messaging.Target(topic=rpc_api.PLUGIN_TOPIC,
                                    server=f"controller-{uuid.uuid4().hex[:6]}"),
        [endpoint])
    server.start()
    try:
        yield (messaging.get_rpc_client(transport,
                                        messaging.Target(topic=rpc_api.PLUGIN_TOPIC)),
               endpoint)
    finally:
        server.stop()
        server.wait()
        transport.cleanup()


def test_fetch_over_the_broker_in_chunks(served: tuple[messaging.RPCClient, Recording]) -> None:
    client, endpoint = served
    devices = [DHCP_TAP, VM_TAP] + [f"tapnobody{i:04d}" for i in range(5)]
    result = fetch_device_details(client, devices, timeout=10, host="compute-1", chunk_size=3)
    assert result.errors == ()
    assert set(result.details) == set(devices)
    assert result.trusted == {DHCP_TAP}
    assert [len(c["devices"]) for c in endpoint.calls] == [3, 3, 1]
    # ML2 moves a port to BUILD when asked with its binding host: never ask with ours.
    assert {c["host"] for c in endpoint.calls} == {read_only_host("compute-1")}
    assert read_only_host("compute-1") != "compute-1"
