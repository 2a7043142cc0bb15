"""What the agent accepts over RPC: notifications and pull replies, validated.

Rules of this room:

1. Every message is checked here before it changes anything. A notification
   that fails is rejected whole (`Invalid`, naming the method and why), and
   the caller drops it; a pull reply whose outer shape is wrong is rejected
   whole (`MalformedReply`), so a broken server never replaces a good policy
   with an empty one.
2. Inside a well-formed reply, objects are parsed by `agent.model` one by one
   (ports with `strict=False`: Neutron sends many extra keys); a bad object is
   left out with a reason in `Policy.errors`, which fails closed for its
   device. Nothing here re-implements the model's validation.
3. A reply may only describe what was asked: a port keyed by another id, or
   bound to a device that was not in the request, is refused.
4. Pure: no I/O, no clock, no threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.model import (
    Invalid,
    Port,
    Rule,
    parse_id,
    parse_port,
)
from agent.sources import rpc_api

MAX_IDS = 100_000  # a notification naming more groups than this is not Neutron's


class MalformedReply(ValueError):
    """A pull reply whose overall shape is wrong; the whole pull is discarded."""


@dataclass(frozen=True)
class Notice:
    """One validated notification: what it says changed."""

    method: str
    groups: frozenset[str] = frozenset()    # rule_updated / member_updated
    port_id: str | None = None              # port_update / port_delete
    device: str | None = None               # port_update: the port's device name


def parse_notice(method: str, kwargs: Mapping[str, Any]) -> Notice:
    """Validate a cast's arguments; raises `Invalid` naming what is wrong.

    Extra arguments are ignored (ML2's port_update also sends network_type,
    segmentation_id and physical_network); the ones we act on must be right.
    """
    if method in (rpc_api.RULE_UPDATED, rpc_api.MEMBER_UPDATED):
        groups = kwargs.get("security_groups")
        if not isinstance(groups, list | tuple):
            raise Invalid(f"{method}: security_groups {_show(groups)} is not a list")
        if len(groups) > MAX_IDS:
            raise Invalid(f"{method}: {len(groups)} security groups is too many")
        return Notice(method, groups=frozenset(
            parse_id(g, f"{method}: security group") for g in groups))
    if method == rpc_api.PORT_UPDATE:
        port = parse_port(kwargs.get("port"), strict=False, what=f"{method}: port")
        return Notice(method, port_id=port.id, device=port.device)
    if method == rpc_api.PORT_DELETE:
        return Notice(method, port_id=parse_id(kwargs.get("port_id"), f"{method}: port_id"))
    raise Invalid(f"unknown notification {_show(method)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(reply: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = reply.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedReply(f"reply {key} {_show(value)} is not a mapping")
    return value


def reply_section(reply: Any, key: str) -> Mapping[str, Any]:
    """One section of a pull reply (`devices`, `security_groups`, `sg_member_ips`)."""
    if not isinstance(reply, Mapping):
        raise MalformedReply(f"reply {_show(reply)} is not a mapping")
    return _mapping(reply, key)


def parse_reply_ports(reply: Any, asked: frozenset[str]
                      ) -> list[tuple[str, Port | None, str]]:
    """(device, port, "") for each good port of a reply, (device, None, why) for each
    bad one; a bad port's device is the one it names, else its key."""
    out: list[tuple[str, Port | None, str]] = []
    for key, raw in reply_section(reply, "devices").items():
        named = raw.get("device") if isinstance(raw, Mapping) else None
        device = named if isinstance(named, str) else f"port {_show(key)}"
        try:
            port = parse_port(raw, strict=False, what=f"reply device {key!r}")
            if port.id != key:
                raise Invalid(f"port {port.id!r} is filed under another id {_show(key)}")
            if port.device not in asked:
                raise Invalid(f"port {port.id!r} device {port.device!r} was not asked for")
        except Invalid as exc:
            out.append((device, None, str(exc)))
            continue
        out.append((port.device, port, ""))
    return out


def referenced_remotes(rule_sets: Iterable[Iterable[Rule]], ports: Iterable[Port],
                       address_groups: bool = False) -> set[str]:
    """Remote group ids (or address group ids) used by these rules and ports' own rules."""
    rules = [r for rs in rule_sets for r in rs] + \
        [r for p in ports for r in p.security_group_rules]
    attr = "remote_address_group_id" if address_groups else "remote_group_id"
    return {getattr(r, attr) for r in rules if getattr(r, attr)}
