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
