"""Stateless security groups (`stateful: false`), judged with packets.

Mirrors Neutron's fullstack stateless tests (`test_securitygroup.py`:
`_validate_stateless_rules` looks for the NOTRACK rule; stateful and
stateless groups conflict on one port) and research 1.8: a stateless port's
traffic is not tracked (raw table `CT --notrack`), so RELATED/ESTABLISHED
never admit its replies and the user needs rules in both directions. The
API rejects a port mixing the two; this agent rejects it too, with a reason,
and drops the port's traffic (fail closed).

The client is `r` (behind the uplink, unfiltered here), so only `a`'s own
chains decide. Port 7001 is used by nothing else in the suite, so the
conntrack table can be asked about these flows alone.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.helpers import (
    EGRESS_ALL,
    FAIL,
    FAMILIES,
    PASS,
    Sandbox,
    conntrack_entries,
    egress,
    icmp_name,
    ingress,
    passing,
)
from tests.support.topology import ping, tcp_connect

pytestmark = pytest.mark.kernel
PORT = 7001


def stateless(*rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**r, "stateful": False} for r in rules]


@pytest.mark.parametrize("family", FAMILIES)
def test_stateless_group_needs_rules_both_ways(sb: Sandbox, family: int) -> None:
    """A stateful ingress rule alone admits a connection (the reply is
    ESTABLISHED); the same rule made stateless does not, because a's SYN-ACK
    is untracked and no egress rule allows it; a stateless egress rule for
    tcp completes it. No conntrack entry of the stateless flow exists.
    """
    a, r = sb.a, sb.r
    dst = a.ip_for(family)
    sb.apply(sb.policy({"sg-a": [ingress(family, "tcp", PORT)]}))
    assert tcp_connect(r, dst, PORT, PASS)

    sb.apply(sb.policy({"sg-a": stateless(ingress(family, "tcp", PORT))}))
    assert not tcp_connect(r, dst, PORT, FAIL)

    sb.node("conntrack", "-D", "-f", f"ipv{family}", "-p", "tcp", "-d", dst,
            "--dport", str(PORT), check=False)
    sb.apply(sb.policy({"sg-a": stateless(ingress(family, "tcp", PORT), egress(family, "tcp"))}))
    assert tcp_connect(r, dst, PORT, PASS)
    assert conntrack_entries(sb, family, "tcp", dst, PORT) == []
    assert "-j CT --notrack" in sb.save(family)


def test_port_mixing_stateful_and_stateless_groups_is_rejected(sb: Sandbox) -> None:
    """Fullstack's stateful/stateless conflict: a port in a stateful and a
    stateless group is rejected with a reason naming it in `status` errors,
    and all its traffic is dropped although each group alone would admit the
    probes; other ports keep working.
    """
    a = sb.a
    groups = {"sg-a": [ingress(4, "tcp", PORT), *EGRESS_ALL],
              "sg-a-stateless": stateless(ingress(4, "tcp", PORT), egress(4))}
    sb.apply(sb.policy({**groups, "sg-c": [*EGRESS_ALL, ingress(4, icmp_name(4))]},
                       ports={"a": {"security_groups": ["sg-a", "sg-a-stateless"]}}))
    errors = sb.status()["errors"]
    assert any(a.port_id in e and "stateful" in e for e in errors), errors
    assert passing(
        into_a=lambda: tcp_connect(sb.r, a.ipv4, PORT, FAIL),
        out_of_a=lambda: tcp_connect(a, sb.r.ipv4, 80, FAIL),
        others=lambda: ping(sb.b, sb.c.ipv4, PASS)) == ["others"]
