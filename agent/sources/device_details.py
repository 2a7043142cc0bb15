"""Trusted ports: which local devices belong to Neutron's own `network:*` ports.

Neutron's `security_group_info_for_devices` never returns ports whose
`device_owner` starts with `network:` (DHCP, routers): Neutron treats them as
trusted and its iptables driver lets their traffic through unfiltered, with
no anti-spoofing (`process_trusted_ports`: an ACCEPT per direction). Without
this module their taps would be unknown devices and fall under
`unknown_device_policy = drop`, cutting DHCP and routing on an all-in-one or
network node. ML2's `get_devices_details_list` (q-plugin) names the owner of
each device; this module asks it and reads the answer.

Rules of this room:

1. The reply is checked here, entry by entry, as `rpc_messages` checks pull
   replies: a reply whose outer shape is wrong is refused whole
   (`MalformedReply`); a bad entry is left out with a reason naming it, and
   its device stays unknown (dropped): a device is trusted only on a
   well-formed entry for a device that was asked for, whose owner starts
   with `network:`.
2. Ask only about devices the security group pull did not return
   (`rpc_cache.unexplained`): a device Neutron filters as a port is never
   trusted (Neutron's own rule), and the question stays small.
3. ML2's `get_device_details` moves a port to BUILD when asked with its
   binding host (or none), as an L2 agent starts wiring it. hostfw wires
   nothing, so it asks with `read_only_host(host)`, a host no port is bound
   to: ML2 then changes no status and still answers `device_owner` for
   `network:*` ports (for compute ports it answers `no_active_binding`, and
   those stay unknown, as they should).
4. `parse_details` is pure; `fetch_device_details` is the only I/O, one call
   per chunk, on the caller's thread and client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import oslo_messaging as messaging

from agent.model import Invalid, parse_device, parse_id
from agent.sources import rpc_api
from agent.sources.rpc_messages import MalformedReply

MAX_OWNER = 255   # Neutron's device_owner column


@dataclass(frozen=True)
class DeviceDetail:
    """What ML2 said about one device; `port_id` is None when it knows no such port."""

    device: str
    port_id: str | None = None
    device_owner: str = ""

    @property
    def trusted(self) -> bool:
        return self.port_id is not None and \
            self.device_owner.startswith(rpc_api.TRUSTED_OWNER_PREFIX)


@dataclass(frozen=True)
class DeviceDetails:
    """The parsed answers of one or more calls."""

    details: Mapping[str, DeviceDetail]
    errors: tuple[str, ...] = ()

    @property
    def trusted(self) -> frozenset[str]:
        """The devices to let through unfiltered."""
        return frozenset(d.device for d in self.details.values() if d.trusted)


def read_only_host(host: str) -> str:
    """The host sent with the question (rule 3): no port is bound to it."""
    return f"{host} (hostfw, read-only)"


def parse_details(asked: Iterable[str], reply: Any) -> DeviceDetails:
    """Check one `get_devices_details_list` reply against the devices asked for."""
    if not isinstance(reply, list | tuple):
        raise MalformedReply(f"{rpc_api.DEVICE_DETAILS_METHOD} reply {_show(reply)} "
                             f"is not a list")
    asked = frozenset(asked)
    details: dict[str, DeviceDetail] = {}
    errors: list[str] = []
    for index, entry in enumerate(reply):
        try:
            detail = _entry(entry, index)
            if detail.device not in asked:
                raise Invalid(f"device details entry {index}: device {detail.device!r} was "
                              f"not asked for")
            if detail.device in details and details[detail.device] != detail:
                raise Invalid(f"device details entry {index}: device {detail.device!r} is "
                              f"described twice, differently")
        except Invalid as exc:
            errors.append(str(exc))
            continue
        details[detail.device] = detail
    return DeviceDetails(details, tuple(errors))


def _entry(entry: Any, index: int) -> DeviceDetail:
    what = f"device details entry {index}"
    if not isinstance(entry, Mapping):
        raise Invalid(f"{what} {_show(entry)} is not a mapping")
    device = parse_device(entry.get("device"), f"{what}: device")
    if entry.get("port_id") is None:   # ML2 knows no bound port for it
        return DeviceDetail(device)
    port_id = parse_id(entry["port_id"], f"{what} ({device}): port_id")
    owner = entry.get("device_owner", "")
    if not isinstance(owner, str) or len(owner) > MAX_OWNER:
        raise Invalid(f"{what} ({device}): device_owner {_show(owner)} is not a string of "
                      f"at most {MAX_OWNER}")
    return DeviceDetail(device, port_id, owner)


def merge(results: Iterable[DeviceDetails]) -> DeviceDetails:
    details: dict[str, DeviceDetail] = {}
    errors: list[str] = []
    for result in results:
        details.update(result.details)
        errors += result.errors
    return DeviceDetails(details, tuple(errors))


def fetch_device_details(client: messaging.RPCClient, devices: Sequence[str],
                         timeout: float, host: str, chunk_size: int = 20) -> DeviceDetails:
    """Ask q-plugin about `devices`, `chunk_size` per call; raises what `call` raises.

    `client` targets `rpc_api.PLUGIN_TOPIC`; `host` is `[DEFAULT] host` (sent
    as `read_only_host(host)`, rule 3). Nothing is returned half-way: a
    failed call fails the whole fetch, and a malformed reply raises
    `MalformedReply`.
    """
    prepared = client.prepare(   # as the security group pull: fail fast, unrouted fails
        version=rpc_api.DEVICE_DETAILS_VERSION, timeout=timeout, retry=0,
        transport_options=messaging.TransportOptions(at_least_once=True))
    results = []
    for start in range(0, len(devices), chunk_size):
        chunk = list(devices[start:start + chunk_size])
        reply = prepared.call(rpc_api.admin_context(), rpc_api.DEVICE_DETAILS_METHOD,
                              devices=chunk, agent_id=f"hostfw-{host}",
                              host=read_only_host(host))
        results.append(parse_details(chunk, reply))
    return merge(results)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
