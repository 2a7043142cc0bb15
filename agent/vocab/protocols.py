"""IP protocol names and numbers, as data.

Rules of this room: one table maps every protocol name a Neutron user may
write to its number, and one set says which names the compiler renders as
names; everything else is rendered as a number. iptables-save prints numbers
through the host's /etc/protocols, which differs between distributions, so the
dataplane normalises what it reads back with `canonical_token` instead of the
compiler guessing the host's file.
"""

from __future__ import annotations

# Neutron's protocol names (neutron-lib IP_PROTOCOL_MAP) and their numbers.
NAME_TO_NUMBER: dict[str, int] = {
    "ah": 51, "dccp": 33, "egp": 8, "esp": 50, "gre": 47, "icmp": 1,
    "icmpv6": 58, "igmp": 2, "ipip": 4, "ipv6-encap": 41, "ipv6-frag": 44,
    "ipv6-icmp": 58, "ipv6-nonxt": 59, "ipv6-opts": 60, "ipv6-route": 43,
    "ospf": 89, "pgm": 113, "rsvp": 46, "sctp": 132, "tcp": 6, "udp": 17,
    "udplite": 136, "vrrp": 112,
}

# Numbers rendered as names: the names every iptables build prints the same way.
CANONICAL_NAMES: dict[int, str] = {
    1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 50: "esp", 51: "ah",
    58: "ipv6-icmp", 132: "sctp", 136: "udplite",
}

# Protocols whose rules may carry ports; ports on others are ignored (Neutron).
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})
# Protocols that have a `-m <name>` match module for --dport/--sport.
MODULE_PROTOCOLS = frozenset({6, 17, 33, 132})
ICMP, ICMPV6 = 1, 58
ICMP_PROTOCOLS = frozenset({ICMP, ICMPV6})

ANY_PROTOCOL_WORDS = frozenset({"", "0", "any", "all"})


def number(word: str, family: int) -> int | None:
    """The protocol a user wrote (a name or 0-255, lower case) for one family.

    None for "any"; ValueError saying why otherwise. `icmp` on IPv6 means
    ICMPv6, as Neutron rewrites it; ICMPv6 on IPv4 is refused.
    """
    if word in ANY_PROTOCOL_WORDS:
        return None
    if word.isascii() and word.isdigit() and len(word) <= 3:
        value = int(word)
        if not 0 <= value <= 255:
            raise ValueError("is not from 0 to 255")
    elif word in NAME_TO_NUMBER:
        value = NAME_TO_NUMBER[word]
    else:
        raise ValueError("is not a known protocol")
    if value == ICMP and family == 6:
        value = ICMPV6
    if value == ICMPV6 and family == 4:
        raise ValueError("is ICMPv6 with IPv4")
    return value or None


def token_number(word: str) -> int | None:
    """The number behind a `-p` token `token()` wrote (a name above or digits)."""
    if word.isdigit():
        return int(word)
    return NAME_TO_NUMBER.get(word)


def token(number: int) -> str:
    """The `-p` argument the compiler writes for protocol `number`."""
    return CANONICAL_NAMES.get(number, str(number))


def canonical_token(word: str, lookup: dict[str, int] | None = None) -> str:
    """Normalise a `-p` argument read back from the kernel to `token()` form.

    `lookup` maps host-specific names (from /etc/protocols) to numbers; the
    dataplane passes it so that this module stays free of I/O.
    """
    if word.isdigit():
        return token(int(word))
    if word in NAME_TO_NUMBER:
        return token(NAME_TO_NUMBER[word])
    if lookup and word in lookup:
        return token(lookup[word])
    return word
