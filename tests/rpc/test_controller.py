"""hostfw-controller's pieces: reply, device mapping, diff, casts, watch; without a
broker, except the answer workers' test at the end (the `broker` fixture)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import oslo_messaging as messaging
import pytest
import yaml
from oslo_config import cfg
from oslo_messaging.rpc.dispatcher import ExpectedException

from agent.controller.diff import Notifications, diff
from agent.controller.endpoint import SecurityGroupInfo, Snapshot, build_reply
from agent.controller.main import size_reply_pool
from agent.controller.notifier import AgentNotifier
from agent.controller.wire import plain
from agent.controller.workers import AnswerWorkers
from agent.model import parse_net, parse_port
from agent.sources import filewatch as watch
from agent.sources import rpc_api
from agent.sources.filewatch import FileWatcher
from agent.sources.policy_file import load_policy_text
from agent.sources.rpc_cache import policy_from_replies
from tests.rpc.broker import Broker
from tests.rpc.stack import ControllerProcess, notifier_transport, wait_for
from tests.support.agent import tool

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "hostfw" / "policy.example.yaml"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def load(raw: dict[str, Any]):  # noqa: ANN201 - agent.model.Policy
    return load_policy_text(yaml.safe_dump(raw))


# ---------------------------------------------------------------- reply

@pytest.mark.parametrize("devices", [["tapweb1"], ["tapdb1"], ["tapweb1", "tapweb2", "tapdb1"],
                                     ["tapweb1", "tapnobody"], []])
def test_controller_and_agent_agree_with_standalone_mode(devices: list[str]) -> None:
    """What the agent builds from the controller's reply is what standalone mode would use."""
    standalone = load(example())
    pulled = policy_from_replies([(devices, build_reply(Snapshot.of(standalone), devices))])
    local = [p for p in standalone.ports if p.device in devices]
    assert pulled.ports == tuple(sorted(local, key=lambda p: p.device))
    assert pulled.errors == ()
    groups = {g for p in local for g in p.security_groups}
    assert dict(pulled.groups) == {g: standalone.groups[g] for g in groups}
    remotes = {r.remote_group_id for g in groups for r in standalone.groups[g]
               if r.remote_group_id}
    for group in remotes:
        assert pulled.members[group] == standalone.members[group]


def test_reply_has_neutrons_shape() -> None:
    snap = Snapshot.of(load(example()))
    reply = build_reply(snap, ["tapdb1"])
    (port_id, port), = reply["devices"].items()
    assert port["device"] == "tapdb1" and port["id"] == port_id
    assert port["security_group_source_groups"] == ["sg-web"]
    assert port["allowed_address_pairs"] == [{"ip_address": "10.0.0.99"}]
    assert set(reply["security_groups"]) == {"sg-db"}
    ssh = reply["security_groups"]["sg-db"][1]
    assert ssh["source_ip_prefix"] == "10.0.0.11/32" and "remote_ip_prefix" not in ssh
    assert ssh["protocol"] == "tcp" and ssh["stateful"] is True
    # Members only for the remote group, only for the ethertypes its users need.
    assert reply["sg_member_ips"] == {
        "sg-web": {"IPv4": [["10.0.0.11", None], ["10.0.0.12", None]]}}


def test_address_group_members_travel_in_sg_member_ips() -> None:
    raw = example()
    raw["address_groups"] = {"ag-admins": ["192.0.2.0/24", "2001:db8::/64"]}
    raw["security_groups"]["sg-db"].append(
        {"direction": "ingress", "ethertype": "IPv6", "remote_address_group_id": "ag-admins"})
    reply = build_reply(Snapshot.of(load(raw)), ["tapdb1"])
    assert reply["sg_member_ips"]["ag-admins"] == {"IPv6": [["2001:db8::/64", None]]}
    pulled = policy_from_replies([(["tapdb1"], reply)])
    assert pulled.address_groups == {"ag-admins": ("2001:db8::/64",)}


def test_devices_map_to_ports_the_way_neutron_does() -> None:
    raw = {"ports": [
        {"id": "6f1c2a4e-aaaa-4000", "mac_address": "fa:16:3e:00:00:01"},
        {"id": "6f1c2a4e-abbb-4000", "mac_address": "fa:16:3e:00:00:02"},
        {"id": "77777777-0000", "mac_address": "fa:16:3e:00:00:03", "device": "vm7"},
    ]}
    snap = Snapshot.of(load(raw))
    found = {d: (p.id if p else None) for d in
             ("tap6f1c2a4e-aa", "tap6f1c2a4e-a", "tap6f1c2a4e-ab", "tap6f1c2a4e-",
              "vm7", "tap77777777-00", "tap", "eth0")
             for p in [snap.port_for(d)]}
    assert found == {
        "tap6f1c2a4e-aa": "6f1c2a4e-aaaa-4000",   # tap + id[:11]
        "tap6f1c2a4e-a": None,                    # a prefix of two ids: ambiguous
        "tap6f1c2a4e-ab": "6f1c2a4e-abbb-4000",   # a unique prefix
        "tap6f1c2a4e-": None,
        "vm7": "77777777-0000",                   # an explicit device
        "tap77777777-00": "77777777-0000",        # Neutron's name still finds it
        "tap": None, "eth0": None,
    }
    reply = build_reply(snap, ["tap6f1c2a4e-ab"])
    assert reply["devices"]["6f1c2a4e-abbb-4000"]["device"] == "tap6f1c2a4e-ab"


def test_endpoint_refuses_a_malformed_request_and_skips_bad_names() -> None:
    endpoint = SecurityGroupInfo(lambda: Snapshot.of(load(example())))
    with pytest.raises(ExpectedException):   # the caller gets ValueError, no server traceback
        endpoint.security_group_info_for_devices({}, devices="tapweb1")
    reply = endpoint.security_group_info_for_devices(
        {}, devices=["tapweb1", "bad name", 7], call_version="1.3")
    assert [p["device"] for p in reply["devices"].values()] == ["tapweb1"]


def test_reply_parts_are_built_once_per_policy_version() -> None:
    """Replies of one version share their parts; `device` is each request's own."""
    policy = load(example())
    snap = Snapshot.of(policy)
    first = build_reply(snap, ["tapweb1", "tapdb1"])
    second = build_reply(snap, ["tapdb1", "tap6f1c2a4e-00"])
    assert first["security_groups"]["sg-db"] is second["security_groups"]["sg-db"]
    assert first["sg_member_ips"]["sg-web"]["IPv4"] is second["sg_member_ips"]["sg-web"]["IPv4"]
    db = policy.ports[2].id
    assert first["devices"][db] == second["devices"][db]
    web1 = policy.ports[0].id
    assert first["devices"][web1]["device"] == "tapweb1"
    fresh = build_reply(snap, ["tapweb1"])
    assert fresh["devices"][web1] is not first["devices"][web1]
    fresh["devices"][web1]["device"] = "changed by a caller"
    assert build_reply(snap, ["tapweb1"])["devices"][web1]["device"] == "tapweb1"
    fresh = build_reply(Snapshot.of(policy), ["tapdb1"])   # a new version builds its own
    assert fresh == build_reply(snap, ["tapdb1"])
    assert fresh["security_groups"]["sg-db"] is not first["security_groups"]["sg-db"]


def test_a_new_version_answers_with_its_own_rules() -> None:
    raw = example()
    old = Snapshot.of(load(raw))
    build_reply(old, ["tapdb1"])
    raw["security_groups"]["sg-db"].pop()
    new = build_reply(Snapshot.of(load(raw)), ["tapdb1"])
    assert len(new["security_groups"]["sg-db"]) == len(raw["security_groups"]["sg-db"])
    assert len(build_reply(old, ["tapdb1"])["security_groups"]["sg-db"]) == \
        len(raw["security_groups"]["sg-db"]) + 1


def test_concurrent_first_replies_equal_sequential_ones() -> None:
    """Many RPC threads filling one fresh version's memo at once all get whole answers."""
    policy = load(example())
    requests = [["tapweb1"], ["tapdb1"], ["tapweb1", "tapweb2", "tapdb1"], ["tapweb2"]] * 16
    expected = [build_reply(Snapshot.of(policy), r) for r in requests]
    snap = Snapshot.of(policy)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: build_reply(snap, r), requests))
    assert got == expected


@pytest.mark.parametrize("net", ["10.0.0.5/32", "10.0.0.0/24", "0.0.0.0/0", "2001:db8::1/128",
                                 "2001:db8::/64", "::/0", "::ffff:10.0.0.5/128"])
def test_plain_cuts_host_networks_as_ipaddress_would(net: str) -> None:
    net = parse_net(net, "member")   # the model's canonical form, all the wire ever sees
    network = ipaddress.ip_network(net)
    want = str(network.network_address if network.prefixlen == network.max_prefixlen
               else network)
    assert plain(net) == want


# ---------------------------------------------------------------- diff and casts

def changed(edit: Any) -> Notifications:
    raw = example()
    edit(raw)
    return diff(load(example()), load(raw))


def test_no_change_no_notification() -> None:
    assert not diff(load(example()), load(example()))


def test_rule_change_names_only_its_group() -> None:
    notes = changed(lambda raw: raw["security_groups"]["sg-db"].pop())
    assert notes == Notifications(rules_updated=("sg-db",))


def test_member_change_is_sent_only_for_groups_used_as_remotes() -> None:
    def move_db_into_web(raw: dict[str, Any]) -> None:
        raw["ports"][2]["security_groups"] = ["sg-web", "sg-db"]
    notes = changed(move_db_into_web)
    assert notes.members_updated == ("sg-web",)   # sg-db is nobody's remote group
    assert [p.device for p in notes.ports_updated] == ["tapdb1"]
    assert notes.rules_updated == () and notes.ports_deleted == ()


def test_port_removed_is_deleted_and_its_groups_members_updated() -> None:
    notes = changed(lambda raw: raw["ports"].pop(1))
    assert notes.ports_deleted == ("6f1c2a4e-0002-4000-8000-000000000002",)
    assert notes.members_updated == ("sg-web",)
    assert notes.ports_updated == ()


def test_extra_members_count_as_member_changes() -> None:
    notes = changed(lambda raw: raw.update(sg_member_ips={"sg-web": {"IPv4": [["10.1.1.1",
                                                                              None]]}}))
    assert notes == Notifications(members_updated=("sg-web",))


def test_address_group_change_updates_the_groups_that_use_it() -> None:
    raw = example()
    raw["address_groups"] = {"ag": ["192.0.2.0/24"]}
    raw["security_groups"]["sg-db"].append(
        {"direction": "ingress", "ethertype": "IPv4", "remote_address_group_id": "ag"})
    new = yaml.safe_load(yaml.safe_dump(raw))
    new["address_groups"]["ag"].append("198.51.100.0/24")
    assert diff(load(raw), load(new)) == Notifications(rules_updated=("sg-db",))


def test_casts_are_neutrons() -> None:
    port = parse_port({"id": "p-1", "mac_address": "fa:16:3e:00:00:01"}, strict=True)
    notes = Notifications(rules_updated=("sg-a",), members_updated=("sg-b", "sg-c"),
                          ports_updated=(port,), ports_deleted=("p-2",))
    casts = list(AgentNotifier.casts(notes))
    assert [(t, v, m) for t, v, m, _ in casts] == [
        ("q-agent-notifier-security_group-update", "1.1", "security_groups_rule_updated"),
        ("q-agent-notifier-security_group-update", "1.1", "security_groups_member_updated"),
        ("q-agent-notifier-port-update", "1.0", "port_update"),
        ("q-agent-notifier-port-delete", "1.0", "port_delete"),
    ]
    assert casts[1][3] == {"security_groups": ["sg-b", "sg-c"]}
    assert casts[2][3]["port"]["device"] == "tapp-1"
    assert set(casts[2][3]) == {"port", "network_type", "segmentation_id", "physical_network"}
    assert casts[3][3] == {"port_id": "p-2"}
    assert notes.count() == len(casts)
    assert not list(AgentNotifier.casts(replace(notes, rules_updated=(), members_updated=(),
                                                ports_updated=(), ports_deleted=())))


# ---------------------------------------------------------------- file watch, CLI

def test_watcher_reloads_on_change_and_on_request(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("ports: []\n")
    reasons: list[str] = []
    reloaded = threading.Semaphore(0)
    watcher = FileWatcher(str(path), 0.01, lambda r: (reasons.append(r), reloaded.release()))
    watcher.start()
    try:
        tmp = tmp_path / "policy.tmp"
        tmp.write_text("ports: []\nsecurity_groups: {}\n")
        tmp.replace(path)
        assert reloaded.acquire(timeout=5)
        watcher.request("SIGHUP")
        assert reloaded.acquire(timeout=5)
        assert not reloaded.acquire(timeout=0.2)   # nothing else changed
    finally:
        watcher.stop()
        watcher.join(5)
    assert reasons == ["file changed", "SIGHUP"]


class Reloads:
    """A FileWatcher whose reloads record what the file held when they read it."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.seen: list[str] = []
        self.done = threading.Semaphore(0)
        self.gate = threading.Event()
        self.gate.set()
        self.watcher = FileWatcher(str(path), interval, self._reload)

    def _reload(self, reason: str) -> None:
        self.gate.wait(30)
        self.seen.append(self.path.read_text())
        self.done.release()

    def __enter__(self) -> Reloads:
        self.watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.watcher.stop()
        self.watcher.join(5)


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_watcher_acts_on_an_atomic_replace_at_once(tmp_path: Path) -> None:
    """Leading edge: the rename is the notice, not the next poll (an hour away here)."""
    path = tmp_path / "policy.yaml"
    path.write_text("ports: []\n")
    with Reloads(path, interval=3600) as reloads:
        assert reloads.watcher.uses_inotify
        replace_file(path, "ports: []\nsecurity_groups: {}\n")
        assert reloads.done.acquire(timeout=10)
    assert reloads.seen == ["ports: []\nsecurity_groups: {}\n"]


def test_watcher_never_reads_a_file_its_writer_still_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a file stays unread while its writer holds it; its close is read at once."""
    monkeypatch.setattr(watch, "SETTLE", 3600.0)   # only the writer's close may end the wait
    path = tmp_path / "policy.yaml"
    path.write_text("ports: []\n")
    whole = "security_groups:\n  sg-a: []\n  sg-b: []\n"
    with Reloads(path, interval=0.01) as reloads:
        with open(path, "w", encoding="utf-8") as writer:
            writer.write(whole[:20])
            writer.flush()
            assert not reloads.done.acquire(timeout=0.5)
            writer.write(whole[20:])
        assert reloads.done.acquire(timeout=10)
    assert reloads.seen == [whole]


def test_watcher_polls_where_inotify_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch.EntryWatch, "open", classmethod(lambda cls, path: None))
    path = tmp_path / "policy.yaml"
    path.write_text("ports: []\n")
    with Reloads(path, interval=0.01) as reloads:
        assert not reloads.watcher.uses_inotify
        replace_file(path, "ports: []\nsecurity_groups: {}\n")
        assert reloads.done.acquire(timeout=10)
    assert reloads.seen == ["ports: []\nsecurity_groups: {}\n"]


def test_watcher_gathers_changes_made_during_a_reload_into_one(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("ports: []\n")
    with Reloads(path, interval=3600) as reloads:
        reloads.gate.clear()
        replace_file(path, "v: 1\n")          # starts a reload, held at the gate
        for version in range(2, 6):
            replace_file(path, f"v: {version}\n")
        reloads.gate.set()
        assert reloads.done.acquire(timeout=10) and reloads.done.acquire(timeout=10)
        assert not reloads.done.acquire(timeout=0.3)
    assert reloads.seen[-1] == "v: 5\n" and len(reloads.seen) == 2


def test_controller_refuses_to_start_without_its_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"[controller]\npolicy_file = {tmp_path}/missing.yaml\n")
    proc = subprocess.run([tool("hostfw-controller"), "--config-file", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "missing.yaml" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("default, rabbit, expected", [
    ("", "", 64),                                   # oslo's 64 threads: 64 connections
    ("executor_thread_pool_size = 16\n", "", 16),
    ("", "rpc_conn_pool_size = 10\n", 10),          # the operator's own setting wins
])
def test_every_rpc_thread_gets_a_reply_connection_unless_configured(
        tmp_path: Path, default: str, rabbit: str, expected: int) -> None:
    conf_file = tmp_path / "c.conf"
    conf_file.write_text(f"[DEFAULT]\n{default}[oslo_messaging_rabbit]\n{rabbit}")
    conf = cfg.ConfigOpts()
    conf(["--config-file", str(conf_file)], default_config_files=[])
    size_reply_pool(conf)
    assert conf.oslo_messaging_rabbit.rpc_conn_pool_size == expected


def test_sg_info_version_is_neutrons() -> None:
    assert (rpc_api.SG_INFO_VERSION, SecurityGroupInfo.target.version) == ("1.3", "1.3")


# ---------------------------------------------------------------- answer workers

def test_a_dead_answer_worker_is_replaced_and_gets_the_policy_in_force(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"[DEFAULT]\ntransport_url = fake://\n"
                    f"[controller]\npolicy_file = {tmp_path}/unused.yaml\n")
    workers = AnswerWorkers(2, ["--config-file", str(conf)])
    try:
        workers.publish(load(example()))
        first, second = workers.workers
        first.proc.kill()
        first.proc.wait()
        workers.publish(load(example()))
        assert workers.workers[0] is not first and workers.workers[1] is second
        assert all(w.proc.poll() is None for w in workers.workers)
        assert "did not take policy version 2" in caplog.text
    finally:
        workers.stop()
    assert all(w.proc.returncode is not None for w in (first, second))


# ---------------------------------------------------------------- answer workers (broker)

def test_answer_workers_serve_the_new_policy_before_the_casts(broker: Broker,
                                                              tmp_path: Path) -> None:
    """With rpc_workers, every pull an agent makes on a notification gets the new version."""
    raw = example()
    controller = ControllerProcess(tmp_path, broker.url, raw)
    with open(controller.conf_path, "a", encoding="utf-8") as conf:
        conf.write("rpc_workers = 2\n")   # the file ends in [controller]
    transport = notifier_transport(broker.url)
    heard = threading.Event()

    class Listener:
        target = messaging.Target(version=rpc_api.SG_NOTIFY_VERSION)

        def security_groups_rule_updated(self, context: Any, **kwargs: Any) -> None:
            heard.set()

    listener = messaging.get_rpc_server(transport, messaging.Target(
        topic=rpc_api.SG_TOPIC, server=f"test-{os.getpid()}", fanout=True), [Listener()])
    client = messaging.get_rpc_client(transport, messaging.Target(
        topic=rpc_api.PLUGIN_TOPIC, version="1.0")).prepare(version="1.3", timeout=30)

    def sg_db_rules(_: object = None) -> int:
        reply = client.call(rpc_api.admin_context(), rpc_api.SG_INFO_METHOD,
                            devices=["tapdb1"], call_version="1.3")
        return len(reply["security_groups"]["sg-db"])

    try:
        controller.start()
        wait_for(lambda: controller.log().count("answering security_group_info_for_devices")
                 == 2, 60, "two answer workers", controller.log)
        listener.start()
        before = len(raw["security_groups"]["sg-db"])
        assert sg_db_rules() == before
        raw["security_groups"]["sg-db"].pop()
        controller.write_policy(raw)
        assert heard.wait(30), controller.log()
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(sg_db_rules, range(16))) == {before - 1}
    finally:
        listener.stop()
        listener.wait()
        transport.cleanup()
        controller.stop()
    assert "did not take policy version" not in controller.log()
