"""flowcut's matching of cuts to entries, without a kernel (entries as plain values).

The kernel side is tests/functional/test_flowcut.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from agent.dataplane.flowcut import _Index, as_flow
from agent.vocab.flows import FlowCut


def entry(src: str, dst: str, proto: int = 6, zone: int | None = None,
          reply_src: str | None = None, reply_dst: str | None = None) -> SimpleNamespace:
    orig = SimpleNamespace(saddr=src, daddr=dst, proto=proto, sport=1000, dport=22,
                           icmp_type=None, icmp_code=None)
    reply = SimpleNamespace(saddr=reply_src or dst, daddr=reply_dst or src)
    return SimpleNamespace(tuple_orig=orig, tuple_reply=reply, zone=zone)


def test_networks_of_both_families_match_by_prefix() -> None:
    v4 = _Index(4, [FlowCut(4, 6, src="10.1.0.0/16", dst="10.0.0.10", zone=5, reason="ag")])
    assert v4.match(entry("10.1.255.1", "10.0.0.10", zone=5)) is not None
    assert v4.match(entry("10.2.0.1", "10.0.0.10", zone=5)) is None
    assert v4.match(entry("10.1.0.1", "10.0.0.10", zone=6)) is None       # other zone
    assert v4.match(entry("10.1.0.1", "10.0.0.10", proto=17, zone=5)) is None
    v6 = _Index(6, [FlowCut(6, dst="fd00:1::/64", reason="ag"),
                    FlowCut(6, reply_dst="2001:db8::7", reason="fip")])
    assert v6.match(entry("fd00::5", "fd00:1::abcd")) is not None
    assert v6.match(entry("fd00::5", "fd00:2::abcd")) is None
    assert v6.match(entry("fd00::5", "fd00:2::1", reply_dst="2001:db8::7")) is not None


def test_as_flow_marks_nat() -> None:
    assert not as_flow(4, entry("10.0.0.20", "10.0.0.10")).nat
    assert as_flow(4, entry("10.0.0.20", "203.0.113.5", reply_src="10.0.0.10")).nat
