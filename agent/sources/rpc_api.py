"""The Neutron RPC API that hostfw-agent and hostfw-controller share (CONTRACT 5).

Rules of this room: topic names, method names, versions and the transport's
defaults are Neutron's and are spelt here only, so the agent, the controller
and a Neutron server cannot drift apart. Both sides build their transport
with `make_transport`, on the global `cfg.CONF`: oslo.messaging registers some
of its option groups on that object only, and `call()` fails on a private
`ConfigOpts`. No thread, no connection: the transport connects lazily.
"""

from __future__ import annotations

import uuid
from typing import Any

import oslo_messaging as messaging
from oslo_config import cfg

# Neutron's control exchange; a deployment's `[DEFAULT] control_exchange` still wins.
CONTROL_EXCHANGE = "neutron"

# Agent -> server (neutron-lib topics.PLUGIN; namespace RPC_NAMESPACE_SECGROUP is None).
PLUGIN_TOPIC = "q-plugin"
SG_INFO_METHOD = "security_group_info_for_devices"
SG_INFO_VERSION = "1.3"   # 1.3: members are [ip, mac] pairs

# Server -> agents, fanout (topics.get_topic_name("q-agent-notifier", resource, "update")).
SG_TOPIC = "q-agent-notifier-security_group-update"
PORT_UPDATE_TOPIC = "q-agent-notifier-port-update"
PORT_DELETE_TOPIC = "q-agent-notifier-port-delete"
SG_NOTIFY_VERSION = "1.1"     # SecurityGroupAgentRpcApiMixin.SG_RPC_VERSION
PORT_NOTIFY_VERSION = "1.0"   # ML2 AgentNotifierApi sends port_update/port_delete at 1.0
PORT_API_VERSION = "1.5"      # the ML2 agent notifier API an agent endpoint must accept

# Agent -> server on q-plugin: ML2's device details (PluginApi). 1.3 is the first
# version whose reply carries device_owner; the server answers any 1.x up to its own.
DEVICE_DETAILS_METHOD = "get_devices_details_list"
DEVICE_DETAILS_VERSION = "1.3"
TRUSTED_OWNER_PREFIX = "network:"   # neutron-lib DEVICE_OWNER_NETWORK_PREFIX

# Agent -> server heartbeats (topics.REPORTS; namespace RPC_NAMESPACE_STATE is
# None). 1.1: report_state returns the agent's status (new, alive, revived).
REPORTS_TOPIC = "q-reports-plugin"
REPORT_STATE_METHOD = "report_state"
REPORT_STATE_VERSION = "1.1"
AGENT_TYPE = "hostfw agent"    # what `openstack network agent list` shows
AGENT_BINARY = "hostfw-agent"
AGENT_TOPIC = "N/A"            # as Neutron's L2 agents: no per-agent topic
AGENT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"   # neutron-lib ISO8601_TIME_FORMAT, UTC

RULE_UPDATED = "security_groups_rule_updated"
MEMBER_UPDATED = "security_groups_member_updated"
PORT_UPDATE = "port_update"
PORT_DELETE = "port_delete"


def make_transport(conf: cfg.ConfigOpts = cfg.CONF) -> messaging.Transport:
    """The RPC transport from `[DEFAULT] transport_url`, on Neutron's exchange by default."""
    messaging.set_transport_defaults(control_exchange=CONTROL_EXCHANGE)
    return messaging.get_rpc_transport(conf)


def admin_context() -> dict[str, Any]:
    """The request context sent with every call and cast.

    Neutron's servers rebuild a `neutron_lib.context.Context` from this dict;
    an agent talks to them as an admin, like Neutron's own agents do.
    """
    return {"is_admin": True, "roles": ["admin"], "user_id": None, "project_id": None,
            "tenant_id": None, "request_id": f"req-{uuid.uuid4()}"}
