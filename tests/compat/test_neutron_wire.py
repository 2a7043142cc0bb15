"""Wire compatibility with Neutron, using Neutron's own RPC classes over RabbitMQ.

Neutron's server side answers our agent's pull: `SecurityGroupServerRpcCallback`
behind neutron-lib's RPC server (with its context serializer), building the
reply with `SecurityGroupInfoAPIMixin.security_group_info_for_ports`, so the
reply shape (source/dest prefixes, provider DHCP rules, member pairs, address
groups, sets on the wire) is Neutron's, not ours. Only the database is
replaced, by `Ml2Db` below, which answers the mixin's queries from dicts.
Neutron's notifier side, ML2's `AgentNotifierApi` (which is a
`SecurityGroupAgentRpcApiMixin`), casts to our agent.

Runs in `tox -e compat`; skipped where the neutron package is not installed.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("neutron")

import oslo_messaging as messaging  # noqa: E402
from neutron.api.rpc.handlers.securitygroups_rpc import (  # noqa: E402
    SecurityGroupServerRpcCallback,
)
from neutron.db.securitygroups_rpc_base import SecurityGroupInfoAPIMixin  # noqa: E402
from neutron.plugins.ml2.rpc import AgentNotifierApi  # noqa: E402
from neutron_lib import context as n_context  # noqa: E402
from neutron_lib import rpc as n_rpc  # noqa: E402
from neutron_lib.agent import topics  # noqa: E402
from neutron_lib.plugins import constants as plugin_constants  # noqa: E402
from neutron_lib.plugins import directory  # noqa: E402
from oslo_config import cfg  # noqa: E402

from agent import config  # noqa: E402
from agent.model import Policy  # noqa: E402
from agent.sources.rpc import RpcSource  # noqa: E402
from tests.rpc.broker import Broker  # noqa: E402
from tests.rpc.stack import wait_for  # noqa: E402

LOCAL_ID = "aaaaaaaa-1111-4000-8000-000000000001"
LOCAL_TAP = "tap" + LOCAL_ID[:11]
REMOTE_ID = "bbbbbbbb-2222-4000-8000-000000000002"


def api_port(port_id: str, ip: str, mac: str, groups: list[str], **extra: Any) -> dict:
    """A port as Neutron's API (and ML2's port_update) shapes it."""
    return {"id": port_id, "mac_address": mac, "network_id": "net-1",
            "fixed_ips": [{"subnet_id": "subnet-1", "ip_address": ip}],
            "allowed_address_pairs": [], "security_groups": groups,
            "device_owner": "compute:nova", "port_security_enabled": True,
            "admin_state_up": True, "status": "ACTIVE", "binding:host_id": "node-1",
            **extra}


class Ml2Db(SecurityGroupInfoAPIMixin):
    """ML2's database answers, from dicts; Neutron's mixin builds the reply itself."""

    def __init__(self) -> None:
        self.ports = {
            LOCAL_ID: api_port(LOCAL_ID, "10.0.0.11", "fa:16:3e:00:00:11", ["sg-web"]),
            REMOTE_ID: api_port(REMOTE_ID, "10.0.0.12", "fa:16:3e:00:00:12", ["sg-web"],
                                allowed_address_pairs=[{"ip_address": "10.0.0.99",
                                                        "mac_address": "fa:16:3e:00:00:99"}]),
        }
        self.rules = [
            self.rule(protocol="tcp", port_range_min=22, port_range_max=22,
                      remote_ip_prefix="10.9.0.0/16", normalized_cidr="10.9.0.0/16"),
            self.rule(protocol="icmp", remote_group_id="sg-web"),
            self.rule(ethertype="IPv6", protocol="tcp", port_range_min=443,
                      port_range_max=443, remote_address_group_id="ag-admins"),
            self.rule(direction="egress"),
        ]
        self.address_groups = {"ag-admins": ["2001:db8::/64", "192.0.2.0/24"]}
        self.contexts: list[Any] = []

    @staticmethod
    def rule(direction: str = "ingress", ethertype: str = "IPv4", **fields: Any) -> dict:
        row = {"security_group_id": "sg-web", "direction": direction, "ethertype": ethertype,
               "protocol": None, "port_range_min": None, "port_range_max": None,
               "remote_ip_prefix": None, "remote_group_id": None,
               "remote_address_group_id": None, "normalized_cidr": None}
        row.update(fields)
        return row

    def get_ports_from_devices(self, context: Any, devices: list[str]) -> list[dict]:
        """ML2: strip `tap`, match the rest as an id prefix, add the SG fields."""
        self.contexts.append(context)
        found = []
        for device in devices:
            partial = device.removeprefix("tap")
            matches = [p for pid, p in self.ports.items() if pid.startswith(partial)]
            if len(matches) != 1:
                continue
            port = copy.deepcopy(matches[0])
            port.update(device=device, security_group_rules=[],
                        security_group_source_groups=[],
                        security_group_remote_address_groups=[],
                        fixed_ips=[ip["ip_address"] for ip in port["fixed_ips"]])
            found.append(port)
        return found

    def _select_rules_for_ports(self, context: Any, ports: dict) -> list:
        return [(pid, rule) for pid, port in ports.items() for rule in self.rules
                if rule["security_group_id"] in port["security_groups"]]

    def _select_sg_ids_for_ports(self, context: Any, ports: dict) -> list:
        return [(sg,) for sg in {sg for p in ports.values() for sg in p["security_groups"]}]

    def _get_sgs_stateful_flag(self, context: Any, sg_ids: Any) -> dict:
        return {sg: True for sg in sg_ids}

    def _select_ips_for_remote_group(self, context: Any, remote_group_ids: Any) -> dict:
        ips: dict[str, set] = {g: set() for g in remote_group_ids}
        for port in self.ports.values():
            for group in set(port["security_groups"]) & set(ips):
                ips[group] |= {(ip["ip_address"], None) for ip in port["fixed_ips"]}
                ips[group] |= {(p["ip_address"], p["mac_address"])
                               for p in port["allowed_address_pairs"]}
        return ips

    def _select_ips_for_remote_address_group(self, context: Any, ids: Any) -> dict:
        return {ag: {(cidr, None) for cidr in self.address_groups.get(ag, [])} for ag in ids}


class Deliveries:
    """What the agent's source delivered, waitable."""

    def __init__(self) -> None:
        self.policies: list[Policy] = []
        self.cond = threading.Condition()

    def __call__(self, policy: Policy) -> None:
        with self.cond:
            self.policies.append(policy)
            self.cond.notify_all()

    def next(self, after: int, timeout: float = 15.0) -> Policy:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.policies) > after, timeout)
            return self.policies[-1]


@pytest.fixture
def neutron(broker: Broker) -> Iterator[tuple[Ml2Db, RpcSource, Deliveries, AgentNotifierApi]]:
    """Neutron's server and notifier on the broker, and our agent's source."""
    conf = cfg.CONF
    config.register_opts(conf)
    conf([], project="neutron", default_config_files=[])   # a server parses its config first
    messaging.set_transport_defaults(control_exchange="neutron")   # as neutron does
    messaging.get_rpc_transport(conf, url=broker.url).cleanup()     # registers transport_url
    conf.set_override("transport_url", broker.url)
    conf.set_override("host", "compute-1")
    n_rpc.init(conf)
    db = Ml2Db()
    directory.add_plugin(plugin_constants.CORE, db)
    server = n_rpc.get_server(messaging.Target(topic=topics.PLUGIN, server="neutron-server"),
                              [SecurityGroupServerRpcCallback()])
    server.start()
    deliveries = Deliveries()
    source = RpcSource(conf)
    source.start(deliveries)
    source.set_devices(frozenset({LOCAL_TAP}))
    try:
        yield db, source, deliveries, AgentNotifierApi(topics.AGENT)
    finally:
        source.stop()
        server.stop()
        server.wait()
        n_rpc.cleanup()
        conf.clear_override("transport_url")
        conf.clear_override("host")


def test_neutrons_reply_is_understood(neutron) -> None:
    db, source, deliveries, _ = neutron
    policy = deliveries.next(0)
    assert policy.errors == ()
    (port,) = policy.ports
    assert (port.id, port.device, port.fixed_ips) == (LOCAL_ID, LOCAL_TAP, ("10.0.0.11",))
    # Provider rules (DHCP replies to this port) travel with the port.
    assert any(r.protocol == 17 and r.port_min == 68 and r.local_ip_prefix == "10.0.0.11/32"
               for r in port.security_group_rules)
    rules = policy.groups["sg-web"]
    assert len(rules) == 4
    assert any(r.remote_ip_prefix == "10.9.0.0/16" and r.port_min == 22 for r in rules)
    assert policy.members["sg-web"][4] == {"10.0.0.11/32", "10.0.0.12/32", "10.0.0.99/32"}
    assert policy.address_groups == {"ag-admins": ("2001:db8::/64",)}   # IPv6 rule only
    # neutron-lib rebuilt an admin context from the dict our agent sent.
    assert db.contexts and all(c.is_admin for c in db.contexts)
    assert source.status()["connected"]


def test_neutrons_casts_reach_the_agent(neutron) -> None:
    db, source, deliveries, notifier = neutron
    deliveries.next(0)
    wait_for(lambda: source.status()["connected"], 10, "connected")
    admin = n_context.get_admin_context()

    db.rules.append(db.rule(protocol="tcp", port_range_min=8080, port_range_max=8080))
    notifier.security_groups_rule_updated(admin, ["sg-web"])
    policy = deliveries.next(1)
    assert any(r.port_min == 8080 for r in policy.groups["sg-web"])

    db.ports["cccccccc-3333"] = api_port("cccccccc-3333", "10.0.0.13", "fa:16:3e:00:00:13",
                                         ["sg-web"])
    notifier.security_groups_member_updated(admin, ["sg-web"])
    policy = deliveries.next(2)
    assert "10.0.0.13/32" in policy.members["sg-web"][4]

    pulls = source.status()["pulls"]
    notifier.port_update(admin, port=db.ports[LOCAL_ID], network_type="vxlan",
                         segmentation_id=1001, physical_network=None)
    wait_for(lambda: source.status()["pulls"] > pulls, 10, "a pull after port_update")

    del db.ports[LOCAL_ID]
    notifier.port_delete(admin, port_id=LOCAL_ID)
    policy = deliveries.next(3)
    assert policy.ports == ()

    status = source.status()
    assert status["notifications"] == 4 and status["notifications_dropped"] == 0, status
