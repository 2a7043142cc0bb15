"""Remote security groups and address groups: ipsets, judged with packets.

Mirrors FirewallTestCase.test_remote_security_groups, the ipset functional
tests (`neutron/tests/functional/agent/linux/test_ipset.py`:
test_add_member_allows_ping, test_del_member_denies_ping), fullstack's
"adding a remote-group member works", and the address-group fix (LP#2058138).
Membership changes must touch only ipsets, never a chain: that is the point
of Neutron's ipset design, checked here through `status` and the kernel set.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.conformance.helpers import (
    EGRESS_ALL,
    FAIL,
    FAMILIES,
    PASS,
    Sandbox,
    icmp_name,
    ingress,
    ipset_members,
    measure_change,
    passing,
    remote_port,
)
from tests.support.topology import ping, tcp_connect

pytestmark = pytest.mark.kernel


def host(addr: str) -> str:
    return str(ipaddress.ip_network(addr))


def set_holding(sb: Sandbox, member: str) -> str:
    """The name of the compiled ipset that holds `member` (from `agent-ctl dump`)."""
    dump = sb.agent.request({"command": "dump"})
    names = [name for name, s in dump["ipsets"].items() if host(member) in s["members"]]
    assert len(names) == 1, dump["ipsets"]
    return names[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_group_admits_members_only(sb: Sandbox, family: int) -> None:
    """Mirrors FirewallTestCase.test_remote_security_groups: ICMP and tcp/80
    from members of sg-b pass; `c` (not a member) is refused; tcp/81 from a
    member is still closed, and `a` gains no egress from the rule (its tcp to b,
    which b admits, stays blocked).
    """
    a, b, c = sb.a, sb.b, sb.c
    dst = a.ip_for(family)
    rules = [ingress(family, icmp_name(family), remote_group_id="sg-b"),
             ingress(family, "tcp", 80, remote_group_id="sg-b")]
    sb.apply(sb.policy({"sg-a": rules,
                        "sg-b": [*EGRESS_ALL, ingress(family, "tcp", 80)]}))
    assert passing(
        member_icmp=lambda: ping(b, dst, PASS),
        member_tcp80=lambda: tcp_connect(b, dst, 80, PASS),
        other_icmp=lambda: ping(c, dst, FAIL),
        other_tcp80=lambda: tcp_connect(c, dst, 80, FAIL),
        member_tcp81=lambda: tcp_connect(b, dst, 81, FAIL),
        a_egress=lambda: tcp_connect(a, b.ip_for(family), 80, FAIL),
    ) == ["member_icmp", "member_tcp80"]


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_group_member_added_and_removed(sb: Sandbox, family: int) -> None:
    """Mirrors test_ipset.py test_add_member_allows_ping / test_del_member_denies_ping
    and fullstack's remote-group member add, end to end.

    The new member is a port of another node (host `r`, behind the uplink)
    added to sg-b in the policy: it is admitted once added and refused once
    removed. Each change adds/removes ipset members and writes no chain.
    """
    r = sb.r
    dst = sb.a.ip_for(family)
    groups = {"sg-a": [ingress(family, "tcp", 80, remote_group_id="sg-b")]}
    base = sb.policy(groups)
    with_r = sb.policy(groups, extra_ports=[remote_port(r, "sg-b")])

    sb.apply(base)
    assert passing(b=lambda: tcp_connect(sb.b, dst, 80, PASS),
                   r=lambda: tcp_connect(r, dst, 80, FAIL)) == ["b"]

    added = measure_change(sb, base, with_r)
    assert added["tables_written"] == [], added
    assert added["ipset_members_added"] >= 1, added
    assert added["ipset_members_removed"] == 0, added
    name = set_holding(sb, r.ip_for(family))
    assert host(r.ip_for(family)) in ipset_members(sb, name)
    assert tcp_connect(r, dst, 80, PASS)

    removed = measure_change(sb, with_r, base)
    assert removed["tables_written"] == [], removed
    assert removed["ipset_members_removed"] >= 1, removed
    assert removed["ipset_members_added"] == 0, removed
    assert host(r.ip_for(family)) not in ipset_members(sb, name)
    assert passing(b=lambda: tcp_connect(sb.b, dst, 80, PASS),
                   r=lambda: tcp_connect(r, dst, 80, FAIL)) == ["b"]


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_address_group(sb: Sandbox, family: int) -> None:
    """`remote_address_group_id` restricts like a remote group (Neutron 5e1188ef38,
    LP#2058138: iptables drivers used to ignore it and were wide open).

    ag-web first holds b's address (b in, c out); then c's prefix (c in, b
    out), a change that only rewrites the address group's ipset.
    """
    a, b, c = sb.a, sb.b, sb.c
    dst = a.ip_for(family)
    groups = {"sg-a": [ingress(family, "tcp", 80, remote_address_group_id="ag-web")]}

    def policy(*members: str) -> dict[str, Any]:
        return sb.policy(groups, address_groups={"ag-web": list(members)})

    with_b = policy(host(b.ip_for(family)), "192.0.2.0/24", "2001:db8::/64")
    sb.apply(with_b)
    assert passing(b=lambda: tcp_connect(b, dst, 80, PASS),
                   c=lambda: tcp_connect(c, dst, 80, FAIL)) == ["b"]

    c_net = {4: "10.0.0.28/30", 6: "fd00::30/126"}[family]
    report = measure_change(sb, with_b, policy(c_net, "192.0.2.0/24", "2001:db8::/64"))
    assert report["tables_written"] == [], report
    assert report["ipset_members_added"] >= 1 and report["ipset_members_removed"] >= 1, report
    assert passing(b=lambda: tcp_connect(b, dst, 80, FAIL),
                   c=lambda: tcp_connect(c, dst, 80, PASS)) == ["c"]
