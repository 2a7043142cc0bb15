"""Ports, security groups, rules and members: parse and validate at the edge.

Rules of this room:

1. Everything that comes from outside (policy file, RPC reply, RPC cast) is a
   plain dict until it passes through here; what leaves is a frozen object
   whose every string has passed a whitelist. Nothing downstream re-validates,
   so nothing downstream may accept a dict.
2. One bad object never spoils the others: each is rejected on its own with a
   reason that names it ("port 'p1': mac_address 'zz' is not a MAC"), and the
   parse result carries the good objects and the list of reasons.
3. No I/O, no clock: this module is as pure as the compiler.

Strictness follows the source: the policy file is written by hand, so unknown
keys on ports are typos and rejected; Neutron's RPC replies carry many extra
port keys, so `strict=False` ignores them. Rules are always strict about keys,
because a misspelt `port_range_min` would silently widen a rule.
"""

from __future__ import annotations

import ipaddress
import re
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.vocab import protocols

# Whitelists, always used with fullmatch: `$` would also match before a trailing
# newline, and a newline in a name would split an iptables-restore script.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
MAC_RE = re.compile(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}")
OWNER_RE = re.compile(r"[A-Za-z0-9_.:-]{0,64}")
# The characters of an address or CIDR: ipaddress also takes IPv6 scope ids
# ("fe80::1%anything") and str() keeps them, so they are refused up front.
ADDRESS_RE = re.compile(r"[0-9A-Fa-f:./]{1,64}")

_SHOW = reprlib.Repr()  # keyword arguments arrive in Python 3.12
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 3, 60, 60, 40
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = _SHOW.maxfrozenset = 4

ETHERTYPES = {"IPv4": 4, "IPv6": 6}
DIRECTIONS = ("ingress", "egress")

RULE_KEYS = frozenset({
    "direction", "ethertype", "protocol", "port_range_min", "port_range_max",
    "remote_ip_prefix", "source_ip_prefix", "dest_ip_prefix", "remote_group_id",
    "remote_address_group_id", "stateful", "source_port_range_min",
    "source_port_range_max",
    # Neutron bookkeeping keys that carry no filtering meaning.
    "id", "security_group_id", "tenant_id", "project_id", "description", "name",
    "created_at", "updated_at", "revision_number", "tags", "normalized_cidr",
    "belongs_to_default_sg", "standard_attr_id",
})

PORT_KEYS = frozenset({
    "id", "device", "mac_address", "fixed_ips", "allowed_address_pairs",
    "security_groups", "port_security_enabled", "device_owner", "network_id",
    "security_group_rules", "floating_ips", "name", "admin_state_up",
    "security_group_source_groups", "security_group_remote_address_groups",
})

POLICY_KEYS = frozenset({"security_groups", "ports", "sg_member_ips", "address_groups"})


class Invalid(ValueError):
    """One object failed validation; the message names the object and why."""


def cached_hash(self: Any) -> int:
    """Frozen model objects are keys of the compiler's memo caches, hashed on
    every compile; computing each object's hash once keeps that cheap. Set as
    `__hash__` in the class body, so that dataclass keeps it."""
    try:
        return self.__dict__["_hash"]
    except KeyError:
        # __dataclass_fields__ is what fields() filters; none of ours is a
        # ClassVar or InitVar, and fields() itself costs more than the hash.
        value = hash(tuple(getattr(self, name) for name in self.__dataclass_fields__))
        object.__setattr__(self, "_hash", value)
        return value


@dataclass(frozen=True, order=True)
class Rule:
    """One security group rule, normalised.

    `protocol` is a number or None (any). For ICMP, `port_min`/`port_max` are
    the type and code. `remote_ip_prefix` is a normalised network string on
    the far side; `local_ip_prefix` one on the port's side, which only
    Neutron's provider rules use (an ingress rule with `dest_ip_prefix`).
    """

    direction: str
    ethertype: str
    protocol: int | None = None
    port_min: int | None = None
    port_max: int | None = None
    source_port_min: int | None = None
    source_port_max: int | None = None
    remote_ip_prefix: str | None = None
    remote_group_id: str | None = None
    remote_address_group_id: str | None = None
    stateful: bool = True
    local_ip_prefix: str | None = None

    __hash__ = cached_hash

    @property
    def family(self) -> int:
        return ETHERTYPES[self.ethertype]


@dataclass(frozen=True)
class AddressPair:
    """An allowed address pair: a network (a host is /32 or /128) and a MAC."""

    ip_address: str
    mac_address: str | None = None


@dataclass(frozen=True)
class Port:
    """A VM port as the firewall needs it."""

    id: str
    device: str
    mac_address: str
    fixed_ips: tuple[str, ...] = ()
    allowed_address_pairs: tuple[AddressPair, ...] = ()
    security_groups: tuple[str, ...] = ()
    port_security_enabled: bool = True
    device_owner: str = ""
    network_id: str = ""
    security_group_rules: tuple[Rule, ...] = ()
    floating_ips: tuple[str, ...] = ()

    __hash__ = cached_hash

    def ips(self, family: int) -> tuple[str, ...]:
        """Fixed IPs of one family (they are canonical: IPv6 ones contain ':')."""
        return tuple(ip for ip in self.fixed_ips if (":" in ip) == (family == 6))


@dataclass(frozen=True)
class Policy:
    """Everything the sources know: ports, group rules, extra members."""

    ports: tuple[Port, ...] = ()
    groups: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    members: Mapping[str, Mapping[int, frozenset[str]]] = field(default_factory=dict)
    address_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    # Devices of Neutron's own `network:*` ports (DHCP, routers), which Neutron
    # leaves out of the ports and lets through unfiltered (agent/sources/
    # device_details.py). A device that is also a port's is filtered as a port.
    trusted_devices: frozenset[str] = frozenset()


# ---------------------------------------------------------------- primitives

def _show(value: Any) -> str:
    """A short, printable rendering of a hostile value for error messages.

    reprlib bounds the depth and the items it visits, so a huge or deeply
    nested value costs little and never recurses without limit.
    """
    text = _SHOW.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise Invalid(f"{what} {_show(value)} is not a valid id (letters, digits, '_.:-', "
                      f"at most 64)")
    return value


def parse_device(value: Any, what: str) -> str:
    if not isinstance(value, str) or not DEVICE_RE.fullmatch(value):
        raise Invalid(f"{what} {_show(value)} is not a valid device name (letters, digits, "
                      f"'_.-', at most 15)")
    return value


def parse_mac(value: Any, what: str) -> str:
    if not isinstance(value, str) or not MAC_RE.fullmatch(value):
        raise Invalid(f"{what} {_show(value)} is not a MAC address")
    mac = value.lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise Invalid(f"{what} {_show(value)} is a multicast MAC address")
    return mac


def parse_ip(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ADDRESS_RE.fullmatch(value):
        raise Invalid(f"{what} {_show(value)} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise Invalid(f"{what} {_show(value)} is not an IP address") from None


def parse_net(value: Any, what: str, family: int | None = None) -> str:
    """A network; a bare address becomes a host network, host bits are cleared."""
    if not isinstance(value, str) or not ADDRESS_RE.fullmatch(value):
        raise Invalid(f"{what} {_show(value)} is not an IP address or CIDR")
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(f"{what} {_show(value)} is not an IP address or CIDR") from None
    if family is not None and net.version != family:
        raise Invalid(f"{what} {_show(value)} is not an IPv{family} address")
    return str(net)


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise Invalid(f"{what} {_show(value)} is not a boolean")


def _port_number(value: Any, what: str, top: int) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise Invalid(f"{what} {_show(value)} is not a number")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= top:
        raise Invalid(f"{what} {_show(value)} is not a number from 0 to {top}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise Invalid(f"{what} {_show(value)} is not a list")
    return list(value)


def parse_protocol(value: Any, ethertype: str, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Invalid(f"{what} protocol {_show(value)} is not a protocol name or number")
    try:
        return protocols.number(value.strip().lower(), 6 if ethertype == "IPv6" else 4)
    except ValueError as exc:
        raise Invalid(f"{what} protocol {_show(value)} {exc}") from None


# ---------------------------------------------------------------- objects

def parse_rule(raw: Any, what: str) -> Rule:
    """Parse one Neutron-shaped rule dict."""
    if not isinstance(raw, Mapping):
        raise Invalid(f"{what} {_show(raw)} is not a mapping")
    unknown = sorted(str(k) for k in raw if k not in RULE_KEYS)
    if unknown:
        raise Invalid(f"{what} has unknown keys {unknown}")
    direction = raw.get("direction")
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise Invalid(f"{what} direction {_show(direction)} is not ingress or egress")
    ethertype = raw.get("ethertype", "IPv4")
    if not isinstance(ethertype, str) or ethertype not in ETHERTYPES:
        raise Invalid(f"{what} ethertype {_show(ethertype)} is not IPv4 or IPv6")
    family = ETHERTYPES[ethertype]
    proto = parse_protocol(raw.get("protocol"), ethertype, what)

    low = _port_number(raw.get("port_range_min"), f"{what} port_range_min", 65535)
    high = _port_number(raw.get("port_range_max"), f"{what} port_range_max", 65535)
    src_low = _port_number(raw.get("source_port_range_min"), f"{what} source_port_range_min",
                           65535)
    src_high = _port_number(raw.get("source_port_range_max"), f"{what} source_port_range_max",
                            65535)
    if proto in protocols.ICMP_PROTOCOLS:
        if low is None and high is None and src_low is not None:
            # Neutron's provider RA rule carries the ICMPv6 type here.
            low = src_low
        if low is not None and low > 255 or high is not None and high > 255:
            raise Invalid(f"{what} ICMP type/code {low}/{high} must be from 0 to 255")
        if low is None and high is not None:
            raise Invalid(f"{what} has an ICMP code ({high}) without a type")
        if low == 255 and proto == 1:
            raise Invalid(f"{what} ICMP type 255 cannot be matched (iptables reads it as "
                          f"any type)")
        src_low = src_high = None
    elif proto in protocols.PORT_PROTOCOLS:
        low, high = _range(low, high, what, "port_range")
        src_low, src_high = _range(src_low, src_high, what, "source_port_range")
    elif (low, high, src_low, src_high) != (None, None, None, None):
        # Neutron's API refuses these (SecurityGroupProtocolRequiredWithPorts,
        # SecurityGroupInvalidProtocolForPortRange); dropping the ports instead
        # would turn "port 22" into "every port of every protocol".
        shown = "no protocol" if proto is None else f"protocol {_show(raw.get('protocol'))}"
        raise Invalid(f"{what} has a port range but {shown}: ports need tcp, udp, udplite, "
                      f"sctp or dccp (or an ICMP type on icmp)")

    # The far side: remote_ip_prefix, or its direction-specific alias. The port's
    # side: the other alias, as Neutron's provider rules carry it.
    far_alias, near_alias = (("source_ip_prefix", "dest_ip_prefix") if direction == "ingress"
                             else ("dest_ip_prefix", "source_ip_prefix"))
    far_keys = [k for k in ("remote_ip_prefix", far_alias) if raw.get(k) not in (None, "")]
    if len(far_keys) > 1 and raw[far_keys[0]] != raw[far_keys[1]]:
        raise Invalid(f"{what} has both {far_keys[0]} and {far_keys[1]}")
    prefix = parse_net(raw[far_keys[0]], f"{what} {far_keys[0]}", family) if far_keys else None
    near = raw.get(near_alias)
    local = parse_net(near, f"{what} {near_alias}", family) if near not in (None, "") else None
    remotes = {k: raw.get(k) for k in ("remote_group_id", "remote_address_group_id")
               if raw.get(k) not in (None, "")}
    if prefix and remotes or len(remotes) > 1:
        raise Invalid(f"{what} may have only one of remote_ip_prefix, remote_group_id, "
                      f"remote_address_group_id")
    group = remotes.get("remote_group_id")
    address_group = remotes.get("remote_address_group_id")
    return Rule(
        direction=direction, ethertype=ethertype, protocol=proto,
        port_min=low, port_max=high, source_port_min=src_low, source_port_max=src_high,
        remote_ip_prefix=prefix,
        remote_group_id=parse_id(group, f"{what} remote_group_id") if group else None,
        remote_address_group_id=(parse_id(address_group, f"{what} remote_address_group_id")
                                 if address_group else None),
        stateful=_bool(raw.get("stateful", True), f"{what} stateful"),
        local_ip_prefix=local,
    )


def _range(low: int | None, high: int | None, what: str, key: str) -> tuple[int | None, ...]:
    """Neutron's port range rules: a lone max is an error, a lone min is one port."""
    if low is None and high is not None:
        raise Invalid(f"{what} has {key}_max without {key}_min")
    if low is not None and high is None:
        high = low
    if low is not None and high is not None and low > high:
        raise Invalid(f"{what} {key}_min {low} is greater than {key}_max {high}")
    if low == 0 and high == 65535:
        return None, None  # the whole range is no restriction at all
    return low, high


def parse_port(raw: Any, strict: bool, what: str = "port") -> Port:
    """Parse one Neutron-shaped port dict; `device` defaults to tap + id[:11]."""
    if not isinstance(raw, Mapping):
        raise Invalid(f"{what} {_show(raw)} is not a mapping")
    port_id = parse_id(raw.get("id"), f"{what} id")
    what = f"port {port_id!r}"
    if strict:
        unknown = sorted(str(k) for k in raw if k not in PORT_KEYS)
        if unknown:
            raise Invalid(f"{what} has unknown keys {unknown}")
    device = parse_device(raw.get("device") or "tap" + port_id[:11], f"{what} device")
    mac = parse_mac(raw.get("mac_address"), f"{what} mac_address")
    fixed = []
    for ip in _list(raw.get("fixed_ips"), f"{what} fixed_ips"):
        if isinstance(ip, Mapping):  # Neutron API shape {"ip_address": ...}
            ip = ip.get("ip_address")
        fixed.append(parse_ip(ip, f"{what} fixed_ips entry"))
    pairs = []
    for pair in _list(raw.get("allowed_address_pairs"), f"{what} allowed_address_pairs"):
        if not isinstance(pair, Mapping) or set(pair) - {"ip_address", "mac_address"}:
            raise Invalid(f"{what} allowed address pair {_show(pair)} must be a mapping of "
                          f"ip_address and optional mac_address")
        pair_mac = pair.get("mac_address")
        pairs.append(AddressPair(
            parse_net(pair.get("ip_address"), f"{what} allowed address pair ip_address"),
            parse_mac(pair_mac, f"{what} allowed address pair mac_address") if pair_mac
            else None))
    groups = [parse_id(g, f"{what} security group")
              for g in _list(raw.get("security_groups"), f"{what} security_groups")]
    rules = [parse_rule(r, f"{what} security_group_rules[{i}]")
             for i, r in enumerate(_list(raw.get("security_group_rules"),
                                         f"{what} security_group_rules"))]
    floating = [parse_ip(ip, f"{what} floating_ips entry")
                for ip in _list(raw.get("floating_ips"), f"{what} floating_ips")]
    owner = raw.get("device_owner") or ""
    if not isinstance(owner, str) or not OWNER_RE.fullmatch(owner):
        raise Invalid(f"{what} device_owner {_show(owner)} is not valid")
    network = raw.get("network_id") or ""
    if network:
        parse_id(network, f"{what} network_id")
    return Port(
        id=port_id, device=device, mac_address=mac,
        fixed_ips=tuple(dict.fromkeys(fixed)),
        allowed_address_pairs=tuple(dict.fromkeys(pairs)),
        security_groups=tuple(dict.fromkeys(groups)),
        port_security_enabled=_bool(raw.get("port_security_enabled", True),
                                    f"{what} port_security_enabled"),
        device_owner=owner, network_id=network,
        security_group_rules=tuple(dict.fromkeys(rules)),
        floating_ips=tuple(dict.fromkeys(floating)),
    )


def parse_members(raw: Any, what: str) -> dict[int, frozenset[str]]:
    """`{"IPv4": [[ip_or_cidr, mac_or_null], ...], "IPv6": [...]}` -> family -> networks."""
    if not isinstance(raw, Mapping):
        raise Invalid(f"{what} {_show(raw)} is not a mapping of ethertype to members")
    out: dict[int, frozenset[str]] = {}
    for ethertype, entries in raw.items():
        if ethertype not in ETHERTYPES:
            raise Invalid(f"{what} ethertype {_show(ethertype)} is not IPv4 or IPv6")
        family = ETHERTYPES[ethertype]
        nets = set()
        for entry in _list(entries, f"{what} {ethertype}"):
            ip = entry[0] if isinstance(entry, list | tuple) and entry else entry
            nets.add(parse_net(ip, f"{what} {ethertype} member", family))
        out[family] = frozenset(nets)
    return out


# ---------------------------------------------------------------- whole policies

def parse_groups(raw: Any, errors: list[str]) -> dict[str, tuple[Rule, ...]]:
    """Group id -> rules; a bad rule is dropped (rules only allow, so this fails closed)."""
    groups: dict[str, tuple[Rule, ...]] = {}
    if not isinstance(raw, Mapping):
        errors.append(f"security_groups {_show(raw)} is not a mapping of group id to rules")
        return groups
    for group_id, rules in raw.items():
        try:
            gid = parse_id(group_id, "security group")
            rule_list = _list(rules, f"security group {gid!r}")
        except Invalid as exc:
            errors.append(str(exc))
            continue
        good = []
        for i, rule in enumerate(rule_list):
            try:
                good.append(parse_rule(rule, f"security group {gid!r} rule {i}"))
            except Invalid as exc:
                errors.append(str(exc))
        groups[gid] = tuple(dict.fromkeys(good))
    return groups


def parse_ports(raw: Any, strict: bool, errors: list[str]) -> list[Port]:
    """Parse a list of ports; duplicate ids or devices reject every claimant (fail closed)."""
    ports = []
    for i, item in enumerate(_list_or_error(raw, "ports", errors)):
        try:
            ports.append(parse_port(item, strict, what=f"port #{i}"))
        except Invalid as exc:
            errors.append(str(exc))
    return dedupe_ports(ports, errors)


def dedupe_ports(ports: Iterable[Port], errors: list[str]) -> list[Port]:
    ports = list(ports)
    by_id: dict[str, int] = {}
    by_dev: dict[str, int] = {}
    for port in ports:
        by_id[port.id] = by_id.get(port.id, 0) + 1
        by_dev[port.device] = by_dev.get(port.device, 0) + 1
    good = []
    for port in ports:
        if by_id[port.id] > 1:
            errors.append(f"port {port.id!r} is defined {by_id[port.id]} times; all dropped")
        elif by_dev[port.device] > 1:
            errors.append(f"port {port.id!r} device {port.device!r} is claimed by "
                          f"{by_dev[port.device]} ports; all dropped")
        else:
            good.append(port)
    return good


def _list_or_error(raw: Any, what: str, errors: list[str]) -> list[Any]:
    try:
        return _list(raw, what)
    except Invalid as exc:
        errors.append(str(exc))
        return []


def parse_member_map(raw: Any, errors: list[str]) -> dict[str, dict[int, frozenset[str]]]:
    out: dict[str, dict[int, frozenset[str]]] = {}
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        errors.append(f"sg_member_ips {_show(raw)} is not a mapping")
        return out
    for group_id, members in raw.items():
        try:
            gid = parse_id(group_id, "sg_member_ips group")
            out[gid] = parse_members(members, f"sg_member_ips of {gid!r}")
        except Invalid as exc:
            errors.append(str(exc))
    return out


def parse_address_groups(raw: Any, errors: list[str]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        errors.append(f"address_groups {_show(raw)} is not a mapping")
        return out
    for group_id, cidrs in raw.items():
        try:
            gid = parse_id(group_id, "address group")
            out[gid] = tuple(sorted({parse_net(c, f"address group {gid!r} entry")
                                     for c in _list(cidrs, f"address group {gid!r}")}))
        except Invalid as exc:
            errors.append(str(exc))
    return out


def parse_policy(raw: Any, strict: bool = True) -> Policy:
    """Parse a whole policy document (CONTRACT 4.1); bad parts are listed in `errors`."""
    errors: list[str] = []
    if not isinstance(raw, Mapping):
        return Policy(errors=(f"policy {_show(raw)} is not a mapping",))
    unknown = sorted(str(k) for k in raw if k not in POLICY_KEYS)
    if unknown and strict:
        errors.append(f"policy has unknown top-level keys {unknown} (ignored)")
    groups = parse_groups(raw.get("security_groups") or {}, errors)
    ports = parse_ports(raw.get("ports") or [], strict, errors)
    members = parse_member_map(raw.get("sg_member_ips"), errors)
    address_groups = parse_address_groups(raw.get("address_groups"), errors)
    return Policy(ports=tuple(ports), groups=groups, members=members,
                  address_groups=address_groups, errors=tuple(errors))
