"""RpcSource in-process over oslo.messaging's fake:// driver, with the controller's endpoint.

No broker and no kernel: these pin down the source's own logic (coalescing,
relevance, validation, failure handling, connection state). The wire over a
real RabbitMQ is covered by test_rpc_kernel.py and tests/compat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import oslo_messaging as messaging
import pytest
import yaml
from oslo_config import cfg

from agent import config
from agent.controller.diff import Notifications
from agent.controller.endpoint import SecurityGroupInfo, Snapshot
from agent.controller.notifier import AgentNotifier
from agent.model import Policy, parse_port
from agent.sources import rpc_api
from agent.sources.policy_file import load_policy_text
from agent.sources.rpc import DriverWatch, RpcSource
from tests.rpc.test_controller import example

LOCAL = frozenset({"tapweb1", "tapdb1"})


@dataclass
class Harness:
    """A source under test, the deliveries it made and a controller to talk to."""

    source: RpcSource
    transport: messaging.Transport
    snapshot: Snapshot
    delivered: list[Policy] = field(default_factory=list)
    arrived: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    server: Any = None
    asked: list[list[str]] = field(default_factory=list)   # the devices of every call
    as_neutron: bool = False   # leave network:* ports out of pulls, as Neutron does

    def serve(self) -> None:
        harness = self

        class Recording(SecurityGroupInfo):
            def security_group_info_for_devices(self, context: Any, **kwargs: Any) -> Any:
                harness.asked.append(sorted(kwargs.get("devices") or []))
                reply = super().security_group_info_for_devices(context, **kwargs)
                if harness.as_neutron:
                    reply["devices"] = {
                        k: p for k, p in reply["devices"].items()
                        if not str(p.get("device_owner", "")).startswith("network:")}
                return reply

        self.server = messaging.get_rpc_server(
            self.transport, messaging.Target(topic=rpc_api.PLUGIN_TOPIC, server="ctl"),
            [Recording(lambda: self.snapshot)])
        self.server.start()

    def change(self, edit: Any) -> None:
        """Edit the controller's policy (a function of the raw example)."""
        raw = example()
        edit(raw)
        self.snapshot = Snapshot.of(load_policy_text(yaml.safe_dump(raw)))

    def calls_after(self, before: int, timeout: float = 5.0) -> list[list[str]]:
        """The calls made since `before` calls, once they stopped coming."""
        deadline = time.monotonic() + timeout
        while len(self.asked) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        return self.asked[before:]

    def deliver(self, policy: Policy) -> None:
        self.delivered.append(policy)
        self.arrived.release()

    def next_policy(self, timeout: float = 5.0) -> Policy:
        assert self.arrived.acquire(timeout=timeout), self.source.status()
        return self.delivered[-1]

    def quiet(self, seconds: float = 0.4) -> bool:
        """No delivery for a while."""
        return not self.arrived.acquire(timeout=seconds)

    def notify(self, notes: Notifications, times: int = 1) -> None:
        notifier = AgentNotifier(self.transport)
        for _ in range(times):
            notifier.send(notes)

    def wait(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.source.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.02)


@pytest.fixture
def fake_conf() -> Iterator[cfg.ConfigOpts]:
    conf = cfg.CONF   # oslo.messaging's calls need the global object
    config.register_opts(conf)
    messaging.get_rpc_transport(conf, url="fake://")   # registers transport_url
    overrides = {(None, "transport_url"): "fake://", (None, "host"): "agent-test",
                 ("rpc", "batch_window"): 0.05, ("rpc", "call_timeout"): 1.0,
                 ("rpc", "retry_max_interval"): 0.5}
    for (group, name), value in overrides.items():
        conf.set_override(name, value, group)
    yield conf
    for group, name in overrides:
        conf.clear_override(name, group)


@pytest.fixture
def harness(fake_conf: cfg.ConfigOpts) -> Iterator[Harness]:
    transport = rpc_api.make_transport(fake_conf)   # fake://, on the neutron exchange
    snapshot = Snapshot.of(load_policy_text(yaml.safe_dump(example())))
    source = RpcSource(fake_conf)
    h = Harness(source, transport, snapshot)
    h.serve()
    source.start(h.deliver)
    source.set_devices(LOCAL)
    try:
        yield h
    finally:
        source.stop()
        if h.server is not None:
            h.server.stop()
            h.server.wait()
        transport.cleanup()


def test_pull_delivers_the_local_ports(harness: Harness) -> None:
    policy = harness.next_policy()
    assert {p.device for p in policy.ports} == LOCAL
    assert set(policy.groups) == {"sg-web", "sg-db"}
    status = harness.wait(lambda s: s["connected"])
    assert status["error"] is None and status["ports"] == 2


def test_a_burst_of_notifications_costs_a_few_pulls_and_one_delivery(harness: Harness) -> None:
    harness.next_policy()
    before = harness.source.status()
    raw = example()
    raw["security_groups"]["sg-web"].pop(0)
    harness.snapshot = Snapshot.of(load_policy_text(yaml.safe_dump(raw)))
    harness.notify(Notifications(rules_updated=("sg-web",)), times=300)
    policy = harness.next_policy()
    assert len(policy.groups["sg-web"]) == len(raw["security_groups"]["sg-web"])
    after = harness.wait(lambda s: s["notifications"] - before["notifications"] == 300)
    assert harness.quiet()
    assert after["pulls"] - before["pulls"] <= 10, after
    assert after["deliveries"] - before["deliveries"] == 1


def test_notifications_about_nothing_local_cause_no_pull(harness: Harness) -> None:
    harness.next_policy()
    harness.wait(lambda s: s["connected"])
    before = harness.source.status()
    harness.notify(Notifications(rules_updated=("sg-elsewhere",), members_updated=("sg-db",),
                                 ports_deleted=("not-local",)))
    status = harness.wait(lambda s: s["notifications"] - before["notifications"] == 3)
    time.sleep(0.2)
    assert harness.source.status()["pulls"] == before["pulls"], status
    assert status["notifications_used"] == before["notifications_used"]


def test_a_port_update_for_a_local_device_pulls(harness: Harness) -> None:
    harness.next_policy()
    before = harness.wait(lambda s: s["connected"])
    port = parse_port({"id": "6f1c2a4e-0003-4000-8000-000000000003", "device": "tapdb1",
                       "mac_address": "fa:16:3e:00:00:21"}, strict=True)
    harness.notify(Notifications(ports_updated=(port,)))
    harness.wait(lambda s: s["pulls"] > before["pulls"])


def settled(harness: Harness) -> int:
    harness.next_policy()
    harness.wait(lambda s: s["connected"])
    time.sleep(0.1)
    return len(harness.asked)


def test_a_rule_update_pulls_one_device_that_covers_the_group(harness: Harness) -> None:
    before = settled(harness)
    harness.change(lambda raw: raw["security_groups"]["sg-web"].pop(0))
    harness.notify(Notifications(rules_updated=("sg-web",)))
    assert harness.calls_after(before) == [["tapweb1"]]
    policy = harness.next_policy()
    assert len(policy.groups["sg-web"]) == len(example()["security_groups"]["sg-web"]) - 1
    assert harness.source.status()["ports"] == 2


def test_a_member_update_pulls_a_device_whose_rules_use_the_group(harness: Harness) -> None:
    """sg-db's rules name sg-web as remote group: tapdb1's reply carries its members."""
    before = settled(harness)

    def extra_member(raw: dict[str, Any]) -> None:
        raw.setdefault("sg_member_ips", {})["sg-web"] = {"IPv4": [["10.0.0.77", None]]}

    harness.change(extra_member)
    harness.notify(Notifications(members_updated=("sg-web",)))
    assert harness.calls_after(before) == [["tapdb1"]]
    assert "10.0.0.77/32" in harness.next_policy().members["sg-web"][4]


def test_port_update_pulls_that_device_and_port_delete_pulls_nothing(harness: Harness) -> None:
    before = settled(harness)
    port = parse_port({"id": "6f1c2a4e-0003-4000-8000-000000000003", "device": "tapdb1",
                       "mac_address": "fa:16:3e:00:00:21"}, strict=True)
    harness.notify(Notifications(ports_updated=(port,)))
    assert harness.calls_after(before) == [["tapdb1"]]
    before = len(harness.asked)
    harness.notify(Notifications(ports_deleted=("6f1c2a4e-0003-4000-8000-000000000003",)))
    policy = harness.next_policy()
    assert {p.device for p in policy.ports} == {"tapweb1"}
    assert harness.calls_after(before, timeout=0.5) == []


def test_a_new_tap_pulls_that_device_alone_and_unchanged_objects_keep_identity(
        harness: Harness) -> None:
    before = settled(harness)
    first = harness.delivered[-1]
    harness.source.set_devices(LOCAL | {"tapweb2"})
    assert harness.calls_after(before) == [["tapweb2"]]
    policy = harness.next_policy()
    assert {p.device for p in policy.ports} == LOCAL | {"tapweb2"}
    old = {p.device: p for p in first.ports}
    assert all(p is old[p.device] for p in policy.ports if p.device in old)
    assert policy.groups["sg-web"] is first.groups["sg-web"]


def test_resync_pulls_everything(harness: Harness) -> None:
    before = settled(harness)
    harness.source.resync()
    assert harness.calls_after(before) == [sorted(LOCAL)]


def test_a_failed_targeted_pull_keeps_the_cache_and_is_retried(harness: Harness) -> None:
    before = settled(harness)
    kept = harness.delivered[-1]
    harness.server.stop()
    harness.server.wait()
    harness.change(lambda raw: raw["security_groups"]["sg-web"].pop(0))
    harness.notify(Notifications(rules_updated=("sg-web",)))
    harness.wait(lambda s: s["rpc_errors"] > 0)
    assert harness.delivered[-1] is kept and harness.quiet(0.2)
    harness.serve()
    policy = harness.next_policy(timeout=10)
    assert len(policy.groups["sg-web"]) == len(kept.groups["sg-web"]) - 1
    assert ["tapweb1"] in harness.asked[before:]


def test_a_malformed_notification_is_logged_and_dropped(harness: Harness,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    harness.next_policy()
    before = harness.wait(lambda s: s["connected"])
    client = messaging.get_rpc_client(
        harness.transport, messaging.Target(topic=rpc_api.SG_TOPIC, version="1.1"))
    with caplog.at_level(logging.WARNING, logger="agent.sources.rpc"):
        client.prepare(fanout=True).cast({}, rpc_api.RULE_UPDATED, security_groups="sg-web")
        status = harness.wait(lambda s: s["notifications_dropped"] == 1)
    assert "security_groups 'sg-web' is not a list" in caplog.text
    assert status["pulls"] == before["pulls"] and status["notifications"] == 0
    assert harness.quiet()


def test_a_malformed_reply_keeps_the_policy_in_force(harness: Harness) -> None:
    harness.next_policy()
    harness.server.stop()
    harness.server.wait()
    harness.server = messaging.get_rpc_server(
        harness.transport, messaging.Target(topic=rpc_api.PLUGIN_TOPIC, server="ctl"),
        [_Garbage()])
    harness.server.start()
    harness.source.resync()
    status = harness.source.status()
    assert status["error"].startswith("pull failed: bad reply from the controller"), status
    assert harness.quiet()


class _Garbage:
    target = messaging.Target(version="1.3")

    def security_group_info_for_devices(self, context: Any, **kwargs: Any) -> Any:
        return {"devices": ["not", "a", "mapping"]}


def test_a_vanished_device_leaves_the_policy_without_a_pull(harness: Harness) -> None:
    harness.next_policy()
    before = harness.wait(lambda s: s["connected"])
    harness.source.set_devices(frozenset({"tapweb1"}))
    policy = harness.next_policy()
    assert [p.device for p in policy.ports] == ["tapweb1"]
    assert harness.source.status()["pulls"] == before["pulls"]


def test_resync_waits_for_the_pull_and_delivers_even_unchanged(harness: Harness) -> None:
    first = harness.next_policy()
    harness.wait(lambda s: s["connected"])
    harness.source.resync()
    assert harness.arrived.acquire(timeout=0)   # delivered before resync returned
    assert harness.delivered[-1] == first


def test_broker_trouble_and_recovery_from_the_drivers_log(harness: Harness) -> None:
    harness.next_policy()
    before = harness.wait(lambda s: s["connected"])
    driver = logging.getLogger(DriverWatch.LOGGER)
    driver.error("[%(connection_id)s] AMQP server on %(hostname)s:%(port)s is unreachable: "
                 "%(err_str)s. Trying again in %(sleep_time)d seconds.",
                 {"connection_id": "c1", "hostname": "127.0.0.1", "port": 5672,
                  "err_str": "[Errno 111] Connection refused", "sleep_time": 1})
    status = harness.source.status()
    assert not status["connected"] and "Connection refused" in status["error"]
    # The pull the trouble scheduled works here (fake://), so the source recovers...
    harness.wait(lambda s: s["connected"] and s["pulls"] > before["pulls"])
    # ...and a reconnect always pulls everything again.
    pulls = harness.source.status()["pulls"]
    driver.info("[%(connection_id)s] Reconnected to AMQP server on %(hostname)s:%(port)s "
                "via [%(transport)s] client with port %(client_port)s.",
                {"connection_id": "c1", "hostname": "127.0.0.1", "port": 5672,
                 "transport": "amqp", "client_port": 4242})
    harness.wait(lambda s: s["pulls"] > pulls)


def test_an_unreachable_controller_is_retried_and_resync_does_not_wait(
        harness: Harness) -> None:
    harness.next_policy()
    harness.wait(lambda s: s["connected"])
    harness.server.stop()
    harness.server.wait()
    harness.server = None
    harness.notify(Notifications(rules_updated=("sg-web",)))
    status = harness.wait(lambda s: not s["connected"] and s["rpc_errors"] >= 2, timeout=10)
    assert "MessagingTimeout" in status["error"]
    started = time.monotonic()
    harness.source.resync()
    assert time.monotonic() - started < 0.5
    harness.serve()
    harness.wait(lambda s: s["connected"] and s["error"] is None, timeout=10)


def test_a_network_port_left_out_of_the_pull_is_learnt_as_trusted(harness: Harness) -> None:
    """Neutron's (and hostfw-controller's) pull leaves out network:* ports; the
    source asks get_devices_details_list about that device only and delivers it
    as trusted. When its tap goes, so does the trust."""
    settled(harness)

    def dhcp_port(raw: dict[str, Any]) -> None:
        raw["ports"].append({"id": "6f1c2a4e-0009-4000-8000-000000000009",
                             "device": "tapdhcp1", "mac_address": "fa:16:3e:00:00:99",
                             "fixed_ips": ["10.0.0.2"], "device_owner": "network:dhcp"})

    harness.as_neutron = True
    harness.change(dhcp_port)
    harness.source.set_devices(LOCAL | {"tapdhcp1", "tapstranger"})
    policy = harness.next_policy()
    assert policy.trusted_devices == {"tapdhcp1"}
    assert "tapdhcp1" not in {p.device for p in policy.ports}
    harness.source.set_devices(LOCAL)
    assert harness.next_policy().trusted_devices == frozenset()
