"""Fanout casts to every agent, as Neutron's server sends them.

Rules of this room: the casts use the topics, versions and argument names
of Neutron's `SecurityGroupAgentRpcApiMixin` and ML2's `AgentNotifierApi`,
so Neutron's own agents could listen too. A cast
that fails (broker down) gives up on the rest of its batch at once rather
than stall the reload for minutes: agents pull everything after they
reconnect, so nothing is lost for good.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import oslo_messaging as messaging

from agent.controller.diff import Notifications
from agent.controller.wire import port_to_wire
from agent.sources import rpc_api

LOG = logging.getLogger(__name__)
CAST_RETRIES = 1   # the driver's own reconnect attempts per cast before giving up


class AgentNotifier:
    """Sends `Notifications` as fanout casts."""

    def __init__(self, transport: messaging.Transport) -> None:
        self._client = messaging.get_rpc_client(
            transport, messaging.Target(topic=rpc_api.SG_TOPIC, version="1.0"))

    @staticmethod
    def casts(notes: Notifications) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
        """(topic, version, method, kwargs) of every cast, in order."""
        for method, groups in ((rpc_api.RULE_UPDATED, notes.rules_updated),
                               (rpc_api.MEMBER_UPDATED, notes.members_updated)):
            if groups:  # Neutron never sends an empty list
                yield (rpc_api.SG_TOPIC, rpc_api.SG_NOTIFY_VERSION, method,
                       {"security_groups": list(groups)})
        for port in notes.ports_updated:
            yield (rpc_api.PORT_UPDATE_TOPIC, rpc_api.PORT_NOTIFY_VERSION, rpc_api.PORT_UPDATE,
                   {"port": port_to_wire(port), "network_type": None,
                    "segmentation_id": None, "physical_network": None})
        for port_id in notes.ports_deleted:
            yield (rpc_api.PORT_DELETE_TOPIC, rpc_api.PORT_NOTIFY_VERSION, rpc_api.PORT_DELETE,
                   {"port_id": port_id})

    def send(self, notes: Notifications) -> int:
        """Cast them all; returns how many were sent."""
        casts = list(self.casts(notes))
        for sent, (topic, version, method, kwargs) in enumerate(casts):
            try:
                self._client.prepare(topic=topic, version=version, fanout=True,
                                     retry=CAST_RETRIES).cast(
                    rpc_api.admin_context(), method, **kwargs)
            except messaging.MessagingException as exc:
                LOG.error("notifying agents failed (%s); %d of %d notifications not sent, "
                          "agents catch up when they reconnect or resync", exc,
                          len(casts) - sent, len(casts))
                return sent
        return len(casts)
