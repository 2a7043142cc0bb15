"""Trace one packet through a compiled ruleset, the way the kernel walks it.

Rules of this room:

1. Pure: a `Ruleset` and a `Packet` in, a `Trace` out; no kernel, no clock.
   `resolve` turns an operator's question (a port, a direction, addresses)
   into a `Packet` from the policy, also without I/O; the admin socket only
   hands both the agent's state (agent/admin/views.py).
2. Never guess. A rule matches when every one of its conditions (the IP part
   `-s -d -i -o -p`, then each `-m` module) holds; a condition the walker
   does not model (an unknown module, option or target, a field the packet
   description lacks) is *unknown*, and the trace ends UNDECIDED naming the
   rule, unless another condition of the same rule is false, in which case
   the rule cannot match whatever the unknown one says (conditions have no
   side effects, so the kernel's evaluation order does not matter).
3. Only what a Ruleset holds is walked: hostfw's chains and its hooks in the
   built-in chains. Whatever else the kernel keeps in a built-in chain, and
   the chain's policy, are not ours; a packet that gets past our hooks ends
   as CONTINUE ("hostfw lets it through, the rest of the chain decides").

Where a packet goes (br_netfilter): traffic bridged between two ports of a
node bridge, VM to VM or VM to the uplink, crosses PREROUTING (raw, mangle,
then nat for the first packet of a connection) and then filter FORWARD, once,
with both bridge ports known (`--physdev-in`, `--physdev-out`). A packet from
a VM to the node itself crosses PREROUTING then INPUT, where the output port
is unknown (the kernel then treats `--physdev-out` as matching). The node's
own packets to a VM cross OUTPUT and carry no bridge ports at all. Routed
traffic (through the node's IP stack to another network) is not modelled.
Address translation is not followed: a nat rule that would rewrite the packet
is a target the walker does not model, so the trace stops there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from agent.model import Policy, Port
from agent.vocab import protocols
from agent.vocab.rules import IptablesRule, Option
from agent.vocab.ruleset import IpSet, Ruleset, Table

ACCEPT, DROP, CONTINUE, UNDECIDED = "ACCEPT", "DROP", "CONTINUE", "UNDECIDED"

# The (table, built-in chain) a packet crosses, in order, to reach each filter hook.
PATHS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "FORWARD": (("raw", "PREROUTING"), ("mangle", "PREROUTING"), ("nat", "PREROUTING"),
                ("mangle", "FORWARD"), ("filter", "FORWARD")),
    "INPUT": (("raw", "PREROUTING"), ("mangle", "PREROUTING"), ("nat", "PREROUTING"),
              ("mangle", "INPUT"), ("filter", "INPUT")),
    "OUTPUT": (("raw", "OUTPUT"), ("mangle", "OUTPUT"), ("nat", "OUTPUT"),
               ("filter", "OUTPUT")),
}
CTSTATES = frozenset({"NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED"})
MAX_RULES = 100_000           # rule evaluations before the walker calls it a loop
UNPRIVILEGED = (1024, 65535)  # a client's source port when none is given
ANY_PORT = (0, 65535)
ECHO_REQUEST = {4: 8, 6: 128}
PORT_MODULES = frozenset(protocols.token(n) for n in protocols.MODULE_PROTOCOLS)
PORT_PROTOCOLS = frozenset(protocols.token(n) for n in protocols.PORT_PROTOCOLS)
ICMP_PROTOCOLS = frozenset(protocols.token(n) for n in protocols.ICMP_PROTOCOLS)


# ---------------------------------------------------------------- values

@dataclass(frozen=True)
class Packet:
    """One packet as the kernel sees it at the hook it is traced through.

    `physdev_in`/`physdev_out` are the bridge ports it enters and leaves by;
    None means a bridge port that is not a managed device (an uplink), whose
    name is unknown but cannot start with the managed device prefix. `sport`
    None means a client's unprivileged source port; `dport` None any port.
    """

    hook: str                      # FORWARD (bridged), INPUT (to the node), OUTPUT (from it)
    family: int
    proto: str                     # as render_rule writes it: tcp, udp, icmp, ipv6-icmp, "47"
    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int = 0
    physdev_in: str | None = None
    physdev_out: str | None = None
    in_iface: str | None = None    # -i: the bridge, for bridged packets
    out_iface: str | None = None   # -o
    src_mac: str | None = None
    ctstate: str = "NEW"
    mark: int = 0


@dataclass(frozen=True)
class Step:
    """One rule that fired (or an implicit return), in the order the kernel met them."""

    table: str
    chain: str
    rule: str | None               # the rule text; None for the end of a chain
    effect: str                    # what it did, e.g. "jump to hostfw-sg-chain", "DROP"


@dataclass(frozen=True)
class Trace:
    verdict: str                   # ACCEPT, DROP, CONTINUE or UNDECIDED
    reason: str                    # who decided, or why the walker cannot tell
    steps: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Unknown:
    """A condition the walker cannot evaluate, and why."""

    why: str


Truth = bool | Unknown


def _all(results: Iterable[Truth]) -> Truth:
    """Three-valued AND: false wins over unknown, unknown over true."""
    unknown: Unknown | None = None
    for result in results:
        if result is False:
            return False
        if isinstance(result, Unknown) and unknown is None:
            unknown = result
    return unknown or True


def _any(results: Iterable[Truth]) -> Truth:
    """Three-valued OR: true wins over unknown, unknown over false."""
    unknown: Unknown | None = None
    for result in results:
        if result is True:
            return True
        if isinstance(result, Unknown) and unknown is None:
            unknown = result
    return unknown or False


def _invert(result: Truth, negated: bool) -> Truth:
    return result if isinstance(result, Unknown) or not negated else not result


# ---------------------------------------------------------------- the walk

class _Undecided(Exception):
    """The walk cannot go on; carries the reason."""


class _Walker:
    """One packet's walk: its mutable mark and conntrack state, and the steps so far."""

    def __init__(self, ruleset: Ruleset, packet: Packet, managed_prefix: str) -> None:
        self.ruleset = ruleset
        self.packet = packet
        self.managed_prefix = managed_prefix
        self.mark = packet.mark
        self.ctstate = packet.ctstate
        self.ct_attached = False      # only the first CT rule a packet meets takes effect
        self.steps: list[Step] = []
        self.budget = MAX_RULES

    def run(self) -> Trace:
        for table_name, builtin in PATHS[self.packet.hook]:
            table = self.ruleset.tables.get((self.packet.family, table_name))
            if table is None or not any(h.chain == builtin for h in table.hooks):
                continue
            if table_name == "nat" and self.ctstate != "NEW":
                continue  # nat sees only the first packet of a tracked connection
            try:
                outcome, where = self._walk(table, builtin)
            except _Undecided as exc:
                return Trace(UNDECIDED, str(exc), tuple(self.steps))
            if outcome == DROP:
                return Trace(DROP, f"dropped in {where}", tuple(self.steps))
            if table_name == "filter" and outcome == ACCEPT:
                return Trace(ACCEPT, f"accepted in {where}", tuple(self.steps))
        return Trace(CONTINUE, f"hostfw's rules let it through; the rest of filter/"
                               f"{self.packet.hook} and its policy decide", tuple(self.steps))

    def _walk(self, table: Table, builtin: str) -> tuple[str, str]:
        """Walk one table from `builtin`: (ACCEPT | DROP | CONTINUE, where it was decided)."""
        chains: dict[str, tuple[IptablesRule, ...]] = dict(table.chains)
        chains[builtin] = tuple(h.rule for h in table.hooks if h.chain == builtin)
        stack: list[tuple[str, int]] = []   # where each -j returns to
        chain, index = builtin, 0
        while True:
            rules = chains[chain]
            if index >= len(rules):
                if not stack:
                    return CONTINUE, f"{table.name}/{chain}"
                caller, index = stack.pop()
                self._step(table, chain, None, f"end of chain, back to {caller}")
                chain = caller
                continue
            self.budget -= 1
            if self.budget < 0:
                raise _Undecided(f"more than {MAX_RULES} rules evaluated: a loop?")
            rule = rules[index]
            text = rule.text
            try:
                matched = self._matches(rule, builtin)
            except ValueError as exc:  # a value the walker cannot read (not a number, say)
                raise _Undecided(f"cannot read {table.name}/{chain} rule {text!r}: "
                                 f"{exc}") from None
            if isinstance(matched, Unknown):
                self._step(table, chain, text, f"cannot decide: {matched.why}")
                raise _Undecided(f"cannot tell whether this rule of {table.name}/{chain} "
                                 f"matches: {matched.why}")
            if not matched:
                index += 1
                continue
            where = f"{table.name}/{chain}" + (f" ({rule.comment})" if rule.comment else "")
            target = rule.target.name
            if target in (ACCEPT, DROP):
                self._step(table, chain, text, target)
                return target, where
            if target == "RETURN":
                if not stack:
                    self._step(table, chain, text, "RETURN with nothing to return to")
                    return CONTINUE, where
                caller, index = stack.pop()
                self._step(table, chain, text, f"RETURN to {caller}")
                chain = caller
            elif target in chains:
                if rule.target.goto:
                    self._step(table, chain, text, f"go to {target}")
                else:
                    self._step(table, chain, text, f"jump to {target}")
                    stack.append((chain, index + 1))
                chain, index = target, 0
            else:
                try:
                    effect = self._extension(rule, table.name, chain)
                except ValueError as exc:
                    raise _Undecided(f"cannot read {table.name}/{chain} rule {text!r}: "
                                     f"{exc}") from None
                self._step(table, chain, text, effect)
                index += 1

    def _step(self, table: Table, chain: str, rule: str | None, effect: str) -> None:
        self.steps.append(Step(table.name, chain, rule, effect))

    def _extension(self, rule: IptablesRule, table: str, chain: str) -> str:
        """Run a non-terminating target; return what it did."""
        name, options = rule.target.name, rule.target.options
        only = options[0] if len(options) == 1 else None
        if name == "MARK" and only and only.flag == "--set-xmark" and len(only.values) == 1:
            value, mask = _value_mask(only.values[0])
            self.mark = (self.mark & ~mask & 0xFFFFFFFF) ^ value
            return f"mark is now {self.mark:#x}"
        if name == "CT" and only and (only.flag == "--notrack" or len(only.values) == 1 and
                                      only.flag in ("--zone", "--zone-orig", "--zone-reply")):
            if self.ct_attached:
                return "no effect: an earlier CT rule already set this packet's conntrack"
            self.ct_attached = True
            if only.flag == "--notrack":
                self.ctstate = "UNTRACKED"
                return "not tracked: conntrack state UNTRACKED"
            return f"conntrack zone {only.values[0]}" + (
                "" if only.flag == "--zone" else f" ({only.flag[7:]} direction only)")
        raise _Undecided(f"{table}/{chain} rule {rule.text!r}: target "
                         f"{rule.target.render()[3:]} is neither modelled by trace "
                         f"nor a chain of the table")

    # ------------------------------------------------------------ matches

    def _matches(self, rule: IptablesRule, builtin: str) -> Truth:
        return _all([*(_invert(self._ip(flag, value), negated)
                       for flag, value, negated in rule.header()),
                     *(self._module(m.module, m.options, builtin) for m in rule.matches)])

    def _ip(self, flag: str, value: str) -> Truth:
        p = self.packet
        if flag in ("-s", "-d"):
            address = ipaddress.ip_address(p.src if flag == "-s" else p.dst)
            return address in ipaddress.ip_network(value, strict=False)
        if flag in ("-i", "-o"):
            name = p.in_iface if flag == "-i" else p.out_iface
            if name is None:
                return Unknown(f"the packet's {'input' if flag == '-i' else 'output'} "
                               f"interface is not known")
            return _iface_match(name, value)
        return protocols.canonical_token(value) == protocols.canonical_token(p.proto)

    def _module(self, name: str, options: tuple[Option, ...], builtin: str) -> Truth:
        handler = {
            "comment": lambda _o: True,
            "conntrack": self._conntrack, "state": self._conntrack,
            "tcp": self._ports, "udp": self._ports, "sctp": self._ports, "dccp": self._ports,
            "multiport": self._ports,
            "icmp": self._icmp, "icmp6": self._icmp,
            "set": self._set,
            "mac": self._mac,
            "mark": self._mark,
            "physdev": lambda o: self._physdev(o, builtin),
        }.get(name)
        if handler is None:
            return Unknown(f"-m {name} is not modelled by trace")
        if name in PORT_MODULES and self.packet.proto != name:
            return False  # iptables allows -m tcp only with -p tcp; be exact anyway
        return _all(handler(option) for option in options)

    def _conntrack(self, option: Option) -> Truth:
        if option.flag not in ("--ctstate", "--state") or len(option.values) != 1:
            return Unknown(f"conntrack {option.flag} is not modelled")
        states = set(option.values[0].split(","))
        # DNAT and SNAT are virtual states; the walker never follows NAT, so they never hold.
        return _invert(self.ctstate in states, option.negated)

    def _ports(self, option: Option) -> Truth:
        p = self.packet
        sport = (p.sport, p.sport) if p.sport is not None else UNPRIVILEGED
        dport = (p.dport, p.dport) if p.dport is not None else ANY_PORT
        kinds = {"--sport": (sport,), "--source-port": (sport,), "--sports": (sport,),
                 "--source-ports": (sport,), "--dport": (dport,), "--destination-port": (dport,),
                 "--dports": (dport,), "--destination-ports": (dport,),
                 "--ports": (sport, dport)}
        if option.flag not in kinds or len(option.values) != 1:
            return Unknown(f"{option.flag} is not modelled")
        if p.proto not in PORT_PROTOCOLS:
            return False  # multiport needs one of these protocols
        wanted = [_port_range(part) for part in option.values[0].split(",")]
        either = _any(_range_in(have, wanted) for have in kinds[option.flag])
        return _invert(either, option.negated)

    def _icmp(self, option: Option) -> Truth:
        p = self.packet
        if option.flag not in ("--icmp-type", "--icmpv6-type") or len(option.values) != 1:
            return Unknown(f"{option.flag} is not modelled")
        if p.proto not in ICMP_PROTOCOLS:
            return False
        if p.icmp_type is None:
            return Unknown("the packet's ICMP type is not given")
        text = option.values[0]
        if text == "any":
            return not option.negated
        kind, _, code = text.partition("/")
        if not kind.isdigit() or code and not code.isdigit():
            return Unknown(f"ICMP type {text!r} is not numeric")
        result = p.icmp_type == int(kind) and (not code or p.icmp_code == int(code))
        return _invert(result, option.negated)

    def _set(self, option: Option) -> Truth:
        if option.flag != "--match-set" or len(option.values) != 2 \
                or option.values[1] not in ("src", "dst"):
            return Unknown(f"set {option.flag} {' '.join(option.values)} is not modelled")
        name, flag = option.values
        ipset: IpSet | None = self.ruleset.ipsets.get(name)
        if ipset is None:
            return Unknown(f"ipset {name} is not in the ruleset")
        if ipset.kind not in ("hash:net", "hash:ip"):
            return Unknown(f"ipset {name} is a {ipset.kind}")
        address = ipaddress.ip_address(self.packet.src if flag == "src" else self.packet.dst)
        inside = any(address in ipaddress.ip_network(m, strict=False) for m in ipset.members)
        return _invert(inside, option.negated)

    def _mac(self, option: Option) -> Truth:
        if option.flag != "--mac-source" or len(option.values) != 1:
            return Unknown(f"mac {option.flag} is not modelled")
        if self.packet.src_mac is None:
            return Unknown("the sender's MAC address is not known")
        return _invert(self.packet.src_mac.lower() == option.values[0].lower(), option.negated)

    def _mark(self, option: Option) -> Truth:
        if option.flag != "--mark" or len(option.values) != 1:
            return Unknown(f"mark {option.flag} is not modelled")
        value, mask = _value_mask(option.values[0])
        return _invert(self.mark & mask == value, option.negated)

    def _physdev(self, option: Option, builtin: str) -> Truth:
        """xt_physdev: see the kernel's physdev_mt for the cases below."""
        p = self.packet
        if p.hook == "OUTPUT":  # no bridge information: only inverted options hold
            return option.negated and option.flag in (
                "--physdev-in", "--physdev-out", "--physdev-is-bridged")
        out_known = builtin in ("FORWARD", "POSTROUTING")  # the bridge chose the port
        if option.flag == "--physdev-is-bridged":
            return _invert(out_known and p.hook == "FORWARD", option.negated)
        if option.flag == "--physdev-in" and len(option.values) == 1:
            return _invert(self._bridge_port(p.physdev_in, option.values[0]), option.negated)
        if option.flag == "--physdev-out" and len(option.values) == 1:
            if not out_known or p.hook != "FORWARD":
                return True  # the kernel lets a not yet known output port match
            return _invert(self._bridge_port(p.physdev_out, option.values[0]), option.negated)
        return Unknown(f"physdev {option.flag} is not modelled")

    def _bridge_port(self, name: str | None, pattern: str) -> Truth:
        if name is not None:
            return _iface_match(name, pattern)
        stem = pattern.removesuffix("+")
        if pattern == "+":
            return True
        if stem.startswith(self.managed_prefix):
            return False  # an unmanaged port's name never starts with the managed prefix
        return Unknown(f"the name of the unmanaged bridge port is not known ({pattern})")


def _iface_match(name: str, pattern: str) -> bool:
    """iptables interface names: a trailing + is a prefix wildcard."""
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def _value_mask(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep:
        return int(low), int(low)
    return int(low or 0), int(high or 65535)


def _range_in(have: tuple[int, int], wanted: list[tuple[int, int]]) -> Truth:
    """Whether every port in `have` is in one of `wanted`: yes, no, or it depends."""
    low, high = have
    if any(a <= low and high <= b for a, b in wanted):
        return True
    if all(high < a or b < low for a, b in wanted):
        return False
    return Unknown(f"it depends on the exact port in {low}-{high}; give it")


def trace(ruleset: Ruleset, packet: Packet, managed_prefix: str = "tap") -> Trace:
    """Walk `packet` through `ruleset` as the kernel would; see the module docstring.

    `managed_prefix` is the device prefix of managed ports: an unmanaged bridge
    port (`physdev_in`/`physdev_out` None) never has a name starting with it.
    """
    if packet.hook not in PATHS:
        raise ValueError(f"hook {packet.hook!r} is not one of {sorted(PATHS)}")
    if packet.ctstate not in CTSTATES:
        raise ValueError(f"conntrack state {packet.ctstate!r} is not one of {sorted(CTSTATES)}")
    for address in (packet.src, packet.dst):
        if ipaddress.ip_address(address).version != packet.family:
            raise ValueError(f"{address} is not an IPv{packet.family} address")
    packet = replace(packet, proto=protocols.canonical_token(packet.proto))
    return _Walker(ruleset, packet, managed_prefix).run()


# ---------------------------------------------------------------- the operator's question

@dataclass(frozen=True)
class Probe:
    """A packet to (ingress) or from (egress) one port of this node, as agent-ctl asks.

    `peer` names the other end: a port id or device of this node, "node" for
    the node itself, or None to find it by address (a port of this node that
    holds the address, else a host outside the node, behind an unmanaged
    bridge port). The port's own address defaults to its first of the family.
    """

    port: str
    proto: str
    direction: str = "ingress"
    src: str | None = None
    dst: str | None = None
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int = 0
    ctstate: str = "NEW"
    peer: str | None = None
    src_mac: str | None = None


@dataclass(frozen=True)
class End:
    """One end of a traced packet: a device of this node (with its port, if known) or not."""

    label: str                      # for people: "port web (tapweb)", "outside the node"
    device: str | None = None
    port: Port | None = None
    mac: str | None = None


@dataclass(frozen=True)
class Resolved:
    packet: Packet
    sender: End
    receiver: End
    notes: tuple[str, ...] = ()


def resolve(probe: Probe, policy: Policy, devices: frozenset[str],
            bridges: Mapping[str, str]) -> Resolved:
    """The packet `probe` describes on this node; ValueError says what is wrong with it."""
    if probe.direction not in ("ingress", "egress"):
        raise ValueError(f"direction {probe.direction!r} is not ingress or egress")
    ingress = probe.direction == "ingress"
    local = _device_end(probe.port, policy, devices)
    named = None
    if probe.peer and probe.peer != "node":
        named = _device_end(probe.peer, policy, devices)
        if named.device == local.device:
            raise ValueError("the peer is the traced port itself")
    family = _family(probe)
    mine, theirs = (probe.dst, probe.src) if ingress else (probe.src, probe.dst)
    mine = mine or _first_ip(local, family)
    theirs = theirs or (_first_ip(named, family) if named else None)
    if not theirs:
        raise ValueError(f"give --{'src' if ingress else 'dst'}: the other end's address")
    if probe.peer == "node":
        other = End("this node")
    else:
        other = named or _end_by_address(theirs, local, policy, devices)
    sender, receiver = (other, local) if ingress else (local, other)
    src, dst = (theirs, mine) if ingress else (mine, theirs)
    hook = "FORWARD" if probe.peer != "node" else "OUTPUT" if ingress else "INPUT"
    bridge = bridges.get(sender.device or "") or bridges.get(receiver.device or "") or None
    proto = _proto(probe.proto, family)
    icmp_type = probe.icmp_type
    if proto in ICMP_PROTOCOLS and icmp_type is None:
        icmp_type = ECHO_REQUEST[family]
    packet = Packet(
        hook=hook, family=family, proto=proto, src=src, dst=dst, sport=probe.sport,
        dport=probe.dport, icmp_type=icmp_type, icmp_code=probe.icmp_code,
        physdev_in=sender.device, physdev_out=receiver.device,
        in_iface=bridge if hook != "OUTPUT" else None,
        out_iface=bridge if hook != "INPUT" else None,
        src_mac=probe.src_mac.lower() if probe.src_mac else sender.mac,
        ctstate=probe.ctstate)
    notes = []
    if proto in PORT_PROTOCOLS and probe.sport is None:
        notes.append("source port: any unprivileged port (--sport pins it)")
    if proto in PORT_PROTOCOLS and probe.dport is None:
        notes.append("destination port: any (--dport pins it)")
    return Resolved(packet, sender, receiver, tuple(notes))


def _device_end(key: str, policy: Policy, devices: frozenset[str]) -> End:
    port = next((p for p in policy.ports if key in (p.id, p.device)), None)
    if port is not None:
        if port.device not in devices:
            raise ValueError(f"port {port.id!r} has no device on this node "
                             f"({port.device} is absent)")
        return End(f"port {port.id} ({port.device})", port.device, port, port.mac_address)
    if key in devices:
        return End(f"device {key} (no known port)", key)
    raise ValueError(f"no port with id or device {key!r}, and no such device on this node")


def _family(probe: Probe) -> int:
    given = [a for a in (probe.src, probe.dst) if a]
    if not given:
        raise ValueError("give --src or --dst (or both)")
    try:
        families = {ipaddress.ip_address(a).version for a in given}
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if len(families) > 1:
        raise ValueError("--src and --dst are of different families")
    return families.pop()


def _first_ip(end: End, family: int) -> str:
    ips = end.port.ips(family) if end.port else ()
    if not ips:
        raise ValueError(f"{end.label} has no IPv{family} address: give --src and --dst")
    return ips[0]


def _proto(word: str, family: int) -> str:
    try:
        number = protocols.number(word.strip().lower(), family)
    except ValueError as exc:
        raise ValueError(f"protocol {word!r} {exc}") from None
    if number is None:
        raise ValueError("a packet has one protocol; 'any' cannot be traced")
    return protocols.token(number)


def _end_by_address(address: str, local: End, policy: Policy,
                    devices: frozenset[str]) -> End:
    """The port of this node that owns `address` (fixed IP, then address pair), or outside."""
    ip = ipaddress.ip_address(address)
    present = sorted((p for p in policy.ports
                      if p.device in devices and p.device != local.device),
                     key=lambda p: p.device)
    for port in present:
        if any(ip == ipaddress.ip_address(a) for a in port.fixed_ips):
            return End(f"port {port.id} ({port.device})", port.device, port, port.mac_address)
    for port in present:
        for pair in port.allowed_address_pairs:
            if ip in ipaddress.ip_network(pair.ip_address):
                return End(f"port {port.id} ({port.device}) by an allowed address pair",
                           port.device, port, pair.mac_address or port.mac_address)
    return End("outside the node (an unmanaged bridge port)")
