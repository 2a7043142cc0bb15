"""The controller's answer to `security_group_info_for_devices` (topic q-plugin, 1.3).

Rules of this room:

1. Devices map to ports the way Neutron's ML2 does: a device named after a
   port (`tap` + the first 11 characters of its id, or the port's explicit
   `device`) is that port; otherwise the `tap` prefix is stripped and the
   rest must start exactly one port id. Unknown or ambiguous devices are left
   out of the reply, and the agent fails closed on them.
2. The reply has Neutron's shape (neutron.md 4.1): the requested ports keyed
   by id with `device` set back to the requested name and their
   `security_group_source_groups`; the rules of every group those ports are
   in (a group without rules, or not defined, is `[]`); and members of every
   remote group or address group those rules use, with an ethertype key only
   where a rule of that ethertype refers to it. Neutron leaves trusted
   (`network:*`) ports out because its agents handle them elsewhere; hostfw's
   agent has no such path, so they are served like any port.
3. Each call reads one `Snapshot` (swapped whole on reload), so a reply is
   consistent even while the file is being reloaded. The snapshot carries
   the reply parts of its version (answers.py), so a call only assembles
   them: O(devices + their groups).
4. `get_devices_details_list` answers as ML2 does for the fields the agent
   reads (device_owner, port_id): one entry per known device, `{"device":
   name}` for one it does not know. The agent asks it about devices the
   security group reply left out, to find Neutron's trusted ports.
5. `AgentReports` takes the agents' `report_state` heartbeats
   (q-reports-plugin), so an agent configured for Neutron runs against the
   controller without errors; it only remembers which agents it heard.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import oslo_messaging as messaging

from agent.controller.answers import Answers, PortPart
from agent.model import Invalid, Policy, Port, parse_device
from agent.sources import rpc_api

LOG = logging.getLogger(__name__)
NEUTRON_TAP_PREFIX = "tap"
MAX_DEVICES = 10_000   # per call; Neutron's agents send 20


@dataclass(frozen=True)
class Snapshot:
    """A loaded policy and its device index; replaced whole, never mutated."""

    policy: Policy = field(default_factory=Policy)
    by_device: dict[str, Port] = field(default_factory=dict)
    ids: tuple[str, ...] = ()           # sorted, for prefix search
    by_id: dict[str, Port] = field(default_factory=dict)
    answers: Answers = field(default_factory=lambda: Answers(Policy()), compare=False)

    @classmethod
    def of(cls, policy: Policy) -> Snapshot:
        by_id = {p.id: p for p in policy.ports}
        return cls(policy, {p.device: p for p in policy.ports}, tuple(sorted(by_id)), by_id,
                   Answers(policy))

    def port_for(self, device: str) -> Port | None:
        """The port behind a device name, as Neutron's get_ports_from_devices finds it."""
        port = self.by_device.get(device)
        if port is not None or not device.startswith(NEUTRON_TAP_PREFIX):
            return port
        partial = device[len(NEUTRON_TAP_PREFIX):]
        if not partial:
            return None
        at = bisect.bisect_left(self.ids, partial)
        found = [i for i in self.ids[at:at + 2] if i.startswith(partial)]
        if len(found) != 1:
            if found:
                LOG.warning("device %r matches several ports; left out", device)
            return None
        return self.by_id[found[0]]


def build_reply(snap: Snapshot, devices: Iterable[str]) -> dict[str, Any]:
    """Neutron's security_group_info_for_devices reply for these devices.

    Assembled from the snapshot's memoised parts (agent/controller/answers.py):
    O(devices + their groups) per call.
    """
    answers = snap.answers
    devices_out: dict[str, dict[str, Any]] = {}
    parts: list[PortPart] = []
    for device in devices:
        port = snap.port_for(device)
        if port is not None:
            devices_out[port.id], part = answers.port(port, device)
            parts.append(part)
    group_ids = dict.fromkeys(g for p in devices_out.values() for g in p["security_groups"])
    remote_groups: dict[str, set[str]] = {}      # remote group -> ethertypes used
    remote_addresses: dict[str, set[str]] = {}   # address group -> ethertypes used
    for part in parts:
        for group, ethertype in part.remote_groups:
            remote_groups.setdefault(group, set()).add(ethertype)
        for group, ethertype in part.address_groups:
            remote_addresses.setdefault(group, set()).add(ethertype)
    members: dict[str, dict[str, list[list[str | None]]]] = {}
    for group, ethertypes in remote_groups.items():
        members[group] = {e: answers.members(group, e) for e in sorted(ethertypes)}
    for group, ethertypes in remote_addresses.items():
        members[group] = {e: answers.address_members(group, e) for e in sorted(ethertypes)}
    return {
        "devices": devices_out,
        "security_groups": {g: answers.rules(g) for g in group_ids},
        "sg_member_ips": members,
    }


def device_details(snap: Snapshot, devices: Iterable[str]) -> list[dict[str, Any]]:
    """ML2's get_devices_details_list reply, for the fields a firewall agent reads."""
    out: list[dict[str, Any]] = []
    for device in devices:
        port = snap.port_for(device)
        if port is None:
            out.append({"device": device})
            continue
        wire, _ = snap.answers.port(port, device)
        out.append({
            "device": device, "port_id": port.id, "network_id": port.network_id,
            "mac_address": port.mac_address, "admin_state_up": True,
            "device_owner": port.device_owner,
            "fixed_ips": [{"ip_address": ip} for ip in wire["fixed_ips"]],
            "allowed_address_pairs": wire["allowed_address_pairs"],
            "port_security_enabled": port.port_security_enabled,
        })
    return out


class SecurityGroupInfo:
    """The q-plugin endpoint; `current` returns the snapshot in force."""

    target = messaging.Target(version=rpc_api.SG_INFO_VERSION)

    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self._current = current

    @messaging.expected_exceptions(ValueError)
    def security_group_info_for_devices(self, context: Any, **kwargs: Any) -> dict[str, Any]:
        """Answer one chunk; a malformed request is refused with ValueError."""
        return build_reply(self._current(),
                           requested_devices(kwargs, "security_group_info_for_devices"))

    @messaging.expected_exceptions(ValueError)
    def get_devices_details_list(self, context: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """ML2's device details (rule 4); a malformed request is refused with ValueError."""
        return device_details(self._current(),
                              requested_devices(kwargs, "get_devices_details_list"))


def requested_devices(kwargs: dict[str, Any], method: str) -> list[str]:
    """The request's device names: not a list (or too long) is refused with ValueError,
    a bad name is logged and left out."""
    devices = kwargs.get("devices")
    if not isinstance(devices, list) or len(devices) > MAX_DEVICES:
        LOG.warning("refused %s: devices is not a list of at most %d names", method,
                    MAX_DEVICES)
        raise ValueError("devices must be a list of device names")
    names = []
    for device in devices:
        try:
            names.append(parse_device(device, "device"))
        except Invalid as exc:
            LOG.warning("%s: %s; left out", method, exc)
    return names


class AgentReports:
    """The q-reports-plugin endpoint (rule 5): heartbeats are heard, not stored."""

    target = messaging.Target(version=rpc_api.REPORT_STATE_VERSION)

    def __init__(self) -> None:
        self.heard: set[tuple[str, str]] = set()   # (agent_type, host)

    @messaging.expected_exceptions(ValueError)
    def report_state(self, context: Any, **kwargs: Any) -> str:
        """"new" for an agent not heard before, then "alive", as Neutron answers."""
        outer = kwargs.get("agent_state")
        state = outer.get("agent_state") if isinstance(outer, dict) else None
        if not isinstance(state, dict) or not all(
                isinstance(state.get(k), str) for k in ("agent_type", "host")):
            raise ValueError("agent_state must be {'agent_state': {agent_type, host, ...}}")
        key = (state["agent_type"], state["host"])
        LOG.debug("report_state from %s on %s", *key)
        if key in self.heard:
            return "alive"
        self.heard.add(key)
        LOG.info("first report_state from %s on %s", *key)
        return "new"
