"""Model objects back to Neutron's wire shapes (neutron.md 4.1).

Rules of this room: the controller only ever sends what `agent.model`
accepted, so it serialises the parsed objects instead of forwarding the
file's raw dicts; this module is that serialiser and nothing else (no
validation: the objects are valid by construction). The shapes are those of
Neutron's `security_group_info_for_devices` reply: a rule's far-side prefix
is `source_ip_prefix` (ingress) or `dest_ip_prefix` (egress), fixed IPs are
plain strings, members are `[address, mac_or_null]` pairs, and host
networks are written as bare addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from agent.model import Port, Rule
from agent.vocab import protocols

FAR_SIDE = {"ingress": "source_ip_prefix", "egress": "dest_ip_prefix"}
NEAR_SIDE = {"ingress": "dest_ip_prefix", "egress": "source_ip_prefix"}


def plain(net: str) -> str:
    """`10.0.0.5/32` -> `10.0.0.5`; other networks stay CIDRs.

    Host networks (most members) are cut as strings: the model's networks
    are canonical (`agent.model.parse_net`), so the address part already is
    what ipaddress would print, at a fraction of the cost.
    """
    address, _, length = net.partition("/")
    if length == ("128" if ":" in address else "32"):
        return address
    network = ipaddress.ip_network(net)
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def rule_to_wire(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"direction": rule.direction, "ethertype": rule.ethertype}
    if rule.protocol is not None:
        out["protocol"] = protocols.token(rule.protocol)
    for key, value in (("port_range_min", rule.port_min), ("port_range_max", rule.port_max),
                       ("source_port_range_min", rule.source_port_min),
                       ("source_port_range_max", rule.source_port_max),
                       (FAR_SIDE[rule.direction], rule.remote_ip_prefix),
                       (NEAR_SIDE[rule.direction], rule.local_ip_prefix),
                       ("remote_group_id", rule.remote_group_id),
                       ("remote_address_group_id", rule.remote_address_group_id)):
        if value is not None:
            out[key] = value
    out["stateful"] = rule.stateful
    return out


def port_to_wire(port: Port, device: str | None = None) -> dict[str, Any]:
    """A port as Neutron's reply (and port_update) carry it; `device` as requested."""
    out: dict[str, Any] = {
        "id": port.id,
        "device": device or port.device,
        "mac_address": port.mac_address,
        "fixed_ips": list(port.fixed_ips),
        "allowed_address_pairs": [
            {"ip_address": plain(pair.ip_address), "mac_address": pair.mac_address}
            if pair.mac_address else {"ip_address": plain(pair.ip_address)}
            for pair in port.allowed_address_pairs],
        "security_groups": list(port.security_groups),
        "port_security_enabled": port.port_security_enabled,
        "device_owner": port.device_owner,
        "network_id": port.network_id,
        "admin_state_up": True,
        "security_group_rules": [rule_to_wire(r) for r in port.security_group_rules],
    }
    if port.floating_ips:
        out["floating_ips"] = list(port.floating_ips)
    return out


def members_to_wire(nets: Iterable[str]) -> list[list[str | None]]:
    """Members as 1.3 pairs; the model keeps no member MACs, so the MAC is null."""
    return [[plain(net), None] for net in sorted(nets)]
