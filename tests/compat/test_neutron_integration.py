"""hostfw inside a Neutron deployment, checked against Neutron's own code (neutron 29).

- The firewall driver shim: the OVS agent's security group layer
  (`SecurityGroupAgentRpc.init_firewall`) loads `firewall_driver = hostfw`
  through the `neutron.agent.firewall_drivers` entry point of the installed
  package, treats it as a no-op firewall (so it does no security group work
  of its own), and the expression the OVS agent reports as `ovs_hybrid_plug`
  is true; a tripwire checks that the OVS agent still reports it that way.
- report_state: our reporter's heartbeats, over the broker, reach Neutron's
  `AgentExtRpcCallback` behind neutron-lib's RPC server; its
  `AgentDbMixin` (on an sqlite file) stores them, and `get_agents`, what
  `GET /v2.0/agents` lists, shows hostfw alive with its configurations.
- Trusted ports: ML2's own `RpcCallbacks.get_devices_details_list` answers
  our fetch; only the port lookup (`Ml2Ports`) is replaced by dicts. Its
  `network:dhcp` entry makes the device trusted, and asking with the
  read-only host leaves every port's status as it was (asked with the
  binding host, ML2 moves it to BUILD).

Runs in `tox -e compat`; skipped where the neutron package is not installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("neutron")

import oslo_messaging as messaging  # noqa: E402
from neutron.agent import firewall as n_firewall  # noqa: E402
from neutron.agent import securitygroups_rpc as sg_rpc  # noqa: E402
from neutron.db import agents_db  # noqa: E402
from neutron.plugins.ml2 import rpc as ml2_rpc  # noqa: E402
from neutron_lib import context as n_context  # noqa: E402
from neutron_lib import rpc as n_rpc  # noqa: E402
from neutron_lib.agent import topics  # noqa: E402
from neutron_lib.plugins import constants as plugin_constants  # noqa: E402
from neutron_lib.plugins import directory  # noqa: E402
from oslo_config import cfg  # noqa: E402

from agent import config  # noqa: E402
from agent.neutron_firewall import HostfwFirewallDriver  # noqa: E402
from agent.sources import rpc_api  # noqa: E402
from agent.sources.device_details import fetch_device_details  # noqa: E402
from agent.sources.report_state import StateReporter  # noqa: E402
from tests.rpc.broker import Broker  # noqa: E402

HOST = "network-1"


@pytest.fixture(scope="module")
def neutron_rpc(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A neutron-server's configuration and RPC layer on the private broker, and a database."""
    from neutron.conf import common as n_common
    from neutron.db.migration.models import head  # noqa: F401 - every table's model
    from neutron_lib.db import api as db_api
    from neutron_lib.db import model_base
    from oslo_db import options as db_options

    conf = cfg.CONF
    n_common.register_core_common_config_opts()   # Neutron's [DEFAULT] host first
    config.register_opts(conf)                     # then ours (duplicates are skipped)
    db = tmp_path_factory.mktemp("neutron-db") / "neutron.sqlite"
    db_options.set_defaults(conf, connection=f"sqlite:///{db}")
    conf([], project="neutron", default_config_files=[])
    messaging.set_transport_defaults(control_exchange="neutron")
    messaging.get_rpc_transport(conf, url=broker.url).cleanup()   # registers transport_url
    conf.set_override("transport_url", broker.url)
    n_rpc.init(conf)
    model_base.BASEV2.metadata.create_all(db_api.CONTEXT_WRITER.get_engine())
    try:
        yield
    finally:
        n_rpc.cleanup()
        conf.clear_override("transport_url")


def serve(topic: str, endpoint: Any) -> messaging.MessageHandlingServer:
    server = n_rpc.get_server(messaging.Target(topic=topic, server=f"neutron-{uuid.uuid4()}"),
                              [endpoint])
    server.start()
    return server


# ---------------------------------------------------------------- the shim

def test_the_ovs_agent_loads_hostfw_and_reports_hybrid_plugging(neutron_rpc) -> None:
    assert n_firewall.load_firewall_driver_class("hostfw") is HostfwFirewallDriver
    cfg.CONF.set_override("firewall_driver", "hostfw", group="SECURITYGROUP")
    try:
        # What OVSNeutronAgent.__init__ builds, with the driver it names.
        sg_agent = sg_rpc.SecurityGroupAgentRpc(n_context.get_admin_context(), None,
                                                defer_refresh_firewall=True,
                                                integration_bridge=None)
    finally:
        cfg.CONF.clear_override("firewall_driver", group="SECURITYGROUP")
    assert isinstance(sg_agent.firewall, HostfwFirewallDriver)
    # The OVS agent's own expressions (ovs_neutron_agent.py): reported hybrid plugging,
    # ARP protection kept in OVS, and no security group work of its own.
    assert getattr(sg_agent.firewall, "OVS_HYBRID_PLUG_REQUIRED", False) is True
    assert not sg_agent.firewall.provides_arp_spoofing_protection
    assert sg_agent.noopfirewall_or_firewall_disabled
    sg_agent.prepare_devices_filter(["tap0"])   # skipped: no RPC, no chains


def test_the_ovs_agent_still_reports_what_its_firewall_driver_declares() -> None:
    """A tripwire on the OVS agent itself, whose constructor needs a running Open
    vSwitch (Neutron's own unit test of this is skipped): it must still read
    the flag off `sg_agent.firewall` and report it as `ovs_hybrid_plug`."""
    import inspect

    from neutron.plugins.ml2.drivers.openvswitch.agent import ovs_neutron_agent

    source = " ".join(inspect.getsource(ovs_neutron_agent.OVSNeutronAgent.__init__).split())
    assert "hybrid_plug = getattr(self.sg_agent.firewall, 'OVS_HYBRID_PLUG_REQUIRED', " \
        "False)" in source
    assert "portbindings.OVS_HYBRID_PLUG: hybrid_plug" in source
    assert "self.sg_agent = agent_sg_rpc.SecurityGroupAgentRpc(" in source


# ---------------------------------------------------------------- report_state

def test_neutron_lists_the_agent_alive_with_its_configurations(neutron_rpc) -> None:
    plugin = agents_db.AgentDbMixin()
    server = serve(topics.REPORTS, agents_db.AgentExtRpcCallback(plugin))
    transport = messaging.get_rpc_transport(cfg.CONF)
    try:
        reporter = StateReporter(transport, HOST, 10.0,
                                 lambda: {"backend": "iptc", "ports": 3, "in_sync": True})
        assert reporter.report_once() == "new"
        assert reporter.report_once() == "alive"
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
    (agent,) = [a for a in plugin.get_agents(n_context.get_admin_context())
                if a["host"] == HOST]
    assert agent["agent_type"] == rpc_api.AGENT_TYPE and agent["binary"] == "hostfw-agent"
    assert agent["alive"] is True and agent["admin_state_up"] is True
    assert agent["configurations"] == {"backend": "iptc", "ports": 3, "in_sync": True}
    assert agent["started_at"] is not None   # start_flag was honoured


# ---------------------------------------------------------------- trusted ports

DHCP_ID = "d4c9a3f0-1111-4000-8000-00000000000d"
VM_ID = "5e4f0b1a-2222-4000-8000-000000000001"


class Network:
    def __init__(self) -> None:
        self._network = {"id": "net-1", "mtu": 1450, "qos_policy_id": None}
        self.current = self._network


class PortContext:
    """What ML2's get_bound_port_context returns, for a port bound to `HOST`."""

    def __init__(self, port: dict[str, Any]) -> None:
        self.current = port
        self.host = port["binding:host_id"]
        self.network = Network()
        self.bottom_bound_segment = {"network_type": "vxlan", "segmentation_id": 1001,
                                     "physical_network": None}
        self.vif_type = "bridge"


class Ml2Ports:
    """ML2's port lookups from dicts; the status updates it is asked for are recorded."""

    def __init__(self) -> None:
        self.ports = {pid: {"id": pid, "network_id": "net-1", "mac_address": mac,
                            "admin_state_up": True, "status": "ACTIVE",
                            "fixed_ips": [{"subnet_id": "s-1", "ip_address": ip}],
                            "device_owner": owner, "allowed_address_pairs": [],
                            "binding:host_id": HOST, "binding:profile": {},
                            "port_security_enabled": True}
                      for pid, mac, ip, owner in (
                          (DHCP_ID, "fa:16:3e:00:00:0d", "10.0.0.2", "network:dhcp"),
                          (VM_ID, "fa:16:3e:00:00:01", "10.0.0.5", "compute:nova"))}
        self.status_updates: list[tuple[str, str]] = []

    def _device_to_port_id(self, context: Any, device: str, pci_slot: Any = None) -> str:
        return device.removeprefix("tap")   # ML2 strips the interface prefix

    def get_bound_port_context(self, context: Any, port_id: str, host: Any = None,
                               cached_networks: Any = None) -> PortContext | None:
        found = [p for pid, p in self.ports.items() if pid.startswith(port_id)]
        return PortContext(found[0]) if len(found) == 1 else None

    def update_port_status(self, context: Any, port_id: str, status: str,
                           host: Any = None) -> None:
        self.status_updates.append((port_id, status))


@pytest.fixture
def ml2(neutron_rpc) -> Iterator[tuple[Ml2Ports, messaging.RPCClient]]:
    ports = Ml2Ports()
    directory.add_plugin(plugin_constants.CORE, ports)
    server = serve(topics.PLUGIN, ml2_rpc.RpcCallbacks(None, None))
    transport = messaging.get_rpc_transport(cfg.CONF)
    try:
        yield ports, messaging.get_rpc_client(transport,
                                              messaging.Target(topic=rpc_api.PLUGIN_TOPIC))
    finally:
        server.stop()
        server.wait()
        transport.cleanup()


def test_ml2_names_the_dhcp_port_trusted_and_changes_no_status(ml2) -> None:
    ports, client = ml2
    devices = ["tap" + DHCP_ID[:11], "tap" + VM_ID[:11], "tapnobody0000"]
    result = fetch_device_details(client, devices, timeout=10, host=HOST)
    assert result.errors == ()
    assert result.trusted == {"tap" + DHCP_ID[:11]}
    assert result.details["tap" + DHCP_ID[:11]].port_id == DHCP_ID
    assert result.details["tap" + VM_ID[:11]].port_id is None   # no_active_binding
    assert ports.status_updates == []


def test_asked_with_the_binding_host_ml2_would_move_ports_to_build(ml2) -> None:
    """Why the read-only host: the same question with our own host changes statuses."""
    ports, client = ml2
    client.prepare(version=rpc_api.DEVICE_DETAILS_VERSION, timeout=10).call(
        rpc_api.admin_context(), rpc_api.DEVICE_DETAILS_METHOD,
        devices=["tap" + DHCP_ID[:11]], agent_id="x", host=HOST)
    assert ports.status_updates == [(DHCP_ID[:11], "BUILD")]   # ML2 passes the id as asked
