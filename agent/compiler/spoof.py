"""Anti-spoofing: which (source address, MAC) pairs a port may send from.

Rules of this room: pure; one function per family builds the pair rules at
the head of the port's `o` chain. A pair goes on to the port's profile; a
packet no pair matches goes to the shared `<p>-bad-source<f>` chain
(agent/compiler/common.py), which drops it. Neutron's order (allowed address
pairs first, then the port's own addresses) and its IPv6 link-local rule are
kept. Two deliberate differences close Neutron's gaps: every port is checked
in both families (an IPv4-only port may send IPv6 only from its EUI-64
link-local address), and a family without pairs drops everything but the
pre-address allowances rather than letting anything through.
"""

from __future__ import annotations

import ipaddress

from agent.model import Port
from agent.vocab.rules import IptablesRule, Target, mac_source

ANY_NET = {4: "0.0.0.0/0", 6: "::/0"}


def spoof_rules(port: Port, family: int, allowed: Target) -> list[IptablesRule]:
    """One rule per allowed (source, MAC) pair, ending in `allowed` (e.g. `-g <profile>`)."""
    pairs: list[tuple[str, str]] = []
    for pair in port.allowed_address_pairs:  # canonical networks from the model
        if (":" in pair.ip_address) == (family == 6):
            pairs.append((pair.ip_address, pair.mac_address or port.mac_address))
    host = "/32" if family == 4 else "/128"
    pairs += [(ip + host, port.mac_address) for ip in port.ips(family)]
    if family == 6:
        macs = [port.mac_address] + [m for _, m in pairs if m != port.mac_address]
        pairs += [(f"{eui64_link_local(m)}/128", m) for m in dict.fromkeys(macs)]
    rules = []
    if not port.fixed_ips and not port.allowed_address_pairs:
        rules.append(IptablesRule(allowed, matches=(mac_source(port.mac_address),),
                                  comment="port without IPs any address from its MAC"))
    for net, mac in dict.fromkeys(pairs):
        rules.append(IptablesRule(allowed, src=None if net == ANY_NET[family] else net,
                                  matches=(mac_source(mac),),
                                  comment="allowed IP and MAC pair"))
    return rules


def eui64_link_local(mac: str) -> str:
    """The fe80::/64 address SLAAC derives from `mac` (modified EUI-64)."""
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = octets[:3] + [0xFF, 0xFE] + octets[3:]
    iid = int.from_bytes(bytes(eui), "big")
    return str(ipaddress.IPv6Address((0xFE80 << 112) | iid))
