"""The chains every port shares, once per family: what Neutron repeats per port.

Rules of this room: pure; these chains depend on the family and the settings
only, so they are the same whatever the ports. Neutron writes the same dozen
rules into every port's `i` and `o` chains; here they live once:

- `<p>-common-e<f>` (from a VM, after its spoof check): clears the accept
  mark, drops router advertisements (v6) and DHCP server replies, then lets
  known sessions, other ICMPv6 (v6) and DHCP client traffic through by
  setting the mark (`-g <p>-accept`). A profile chain jumps here first and
  RETURNs on the mark, so an established packet stops right after the drops
  Neutron puts before RELATED,ESTABLISHED.
- `<p>-common-i<f>` (to a VM): clears the mark; known sessions and
  neighbour discovery / MLD (v6) set it.
- `<p>-bad-source<f>`: where a port chain goes when none of the port's
  (address, MAC) pairs matched. Only what Neutron allows before the spoof
  check passes (DHCP discover, MLD and DAD from the unspecified address);
  everything else is dropped as spoofed.
- `<p>-sg-fallback`: INVALID, then DROP for whatever nothing allowed.

Why the verdicts equal Neutron's although the order differs: every allow
(RETURN, or the mark) gives the same verdict whatever allow matches first,
so allows may be reordered among themselves; a drop moved ahead of an allow
never matches the same packet (RA and DHCP server replies are disjoint from
other ICMPv6 and DHCP client traffic), and the drops that must precede
RELATED,ESTABLISHED still do. The pre-address allowances sit after the pairs
instead of before: a packet from `0.0.0.0` or `::` that matches a pair
(an address pair of /0) reaches the profile, whose DHCP client and ICMPv6
allows let it through just the same.
"""

from __future__ import annotations

from functools import lru_cache

from agent.vocab.names import Names
from agent.vocab.rules import IptablesRule, Target, ctstate, goto, icmp, jump, opt, ports

ESTABLISHED = ctstate("RELATED,ESTABLISHED")
INVALID = ctstate("INVALID")

# ICMPv6 types a VM must receive for neighbour discovery and MLD.
ICMPV6_INGRESS_ALLOWED = (130, 135, 136)
# ICMPv6 types a VM may send from :: before it has an address (MLD, DAD).
ICMPV6_UNSPEC_ALLOWED = (131, 135, 143)
ICMPV6_RA = 134
DHCP = {4: (68, 67), 6: (546, 547)}  # (client port, server port)


def common_chain(names: Names, direction: str, family: int) -> str:
    """The shared checks of one direction ("ingress": to a VM, "egress": from it)."""
    return names.chain(f"common-{direction[0]}{family}")


def bad_source_chain(names: Names, family: int) -> str:
    return names.chain(f"bad-source{family}")


@lru_cache(maxsize=64)
def shared_chains(names: Names, family: int,
                  accept_mark: int) -> dict[str, tuple[IptablesRule, ...]]:
    """The family's shared chains (see the module docstring), by name."""
    accept = goto(names.chain("accept"))
    drop, returns = jump("DROP"), jump("RETURN")
    clear = IptablesRule(jump("MARK", opt("--set-xmark", f"0x0/{accept_mark:#x}")),
                         comment="clear the accept mark")
    session = IptablesRule(accept, matches=(ESTABLISHED,), comment="known session")
    client, server = DHCP[family]
    egress = [clear]
    if family == 6:
        egress.append(_icmp6(ICMPV6_RA, drop, "no router advertisements from a VM"))
    egress += [IptablesRule(drop, proto="udp", matches=(ports("udp", server, client),),
                            comment="no DHCP server on a VM"),
               session]
    if family == 6:
        egress.append(IptablesRule(accept, proto="ipv6-icmp", comment="other ICMPv6"))
    egress.append(IptablesRule(accept, proto="udp", matches=(ports("udp", client, server),),
                               comment="DHCP client"))
    ingress = [clear, session]
    if family == 6:
        ingress += [_icmp6(t, accept, "neighbour discovery and MLD")
                    for t in ICMPV6_INGRESS_ALLOWED]
    if family == 4:
        unaddressed = [IptablesRule(returns, src="0.0.0.0/32", dst="255.255.255.255/32",
                                    proto="udp", matches=(ports("udp", client, server),),
                                    comment="DHCP discover before an address")]
    else:
        unaddressed = [_icmp6(t, returns, "MLD and DAD before an address",
                              src="::/128", dst="ff02::/16") for t in ICMPV6_UNSPEC_ALLOWED]
    return {
        common_chain(names, "egress", family): tuple(egress),
        common_chain(names, "ingress", family): tuple(ingress),
        bad_source_chain(names, family): (*unaddressed,
                                          IptablesRule(drop, comment="spoofed source")),
        names.chain("sg-fallback"): (
            IptablesRule(drop, matches=(INVALID,), comment="drop invalid"),
            IptablesRule(drop, comment="default drop for unmatched traffic")),
    }


def _icmp6(kind: int, target: Target, comment: str, src: str | None = None,
           dst: str | None = None) -> IptablesRule:
    return IptablesRule(target, src=src, dst=dst, proto="ipv6-icmp",
                        matches=(icmp(6, kind),), comment=comment)
