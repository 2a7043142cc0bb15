"""Member churn must not grow the compiler's memory (issue 14.9), in process.

A 10,000-member remote group changes at every compile, as a busy tenant's
group does. The memos of agent/compiler/rules.py used to keep 4,096 versions
of it (about 1.6 MiB each, gigabytes in all); bounded by members they stop
growing once full. The test compiles past that point, then checks that the
resident set stays flat for many more versions and that an unchanged group
still gets the very same IpSet object back.
"""

from __future__ import annotations

import gc
import os
from dataclasses import replace

from agent.compiler import Snapshot, compile_ruleset
from agent.compiler import rules as compiler_rules
from agent.model import Policy, parse_policy
from tests.reliability.support import scaled

MEMBERS = 10_000
SET = "hfw4gsg-big"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def policy() -> Policy:
    return parse_policy({
        "security_groups": {"sg-web": [{"direction": "ingress", "ethertype": "IPv4",
                                         "protocol": "tcp", "port_range_min": 22,
                                         "port_range_max": 22, "remote_group_id": "sg-big"}]},
        "ports": [{"id": "a", "device": "tapa", "mac_address": "fa:16:3e:00:00:0a",
                   "fixed_ips": ["10.0.0.10"], "security_groups": ["sg-web"]}]})


def version(base: Policy, v: int) -> Snapshot:
    """The group at version `v`: a window of MEMBERS addresses sliding by 100."""
    first = v * 100
    members = frozenset(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/32"
                        for i in range(first, first + MEMBERS))
    return Snapshot(replace(base, members={"sg-big": {4: members}}), frozenset({"tapa"}))


def test_rss_stays_flat_under_member_churn() -> None:
    base = policy()
    budget = compiler_rules.MEMBER_BUDGET
    warmup = 2 * budget // MEMBERS + 10  # both memos full, the oldest versions evicted
    for v in range(warmup):
        compile_ruleset(version(base, v))
    before = rss()
    for v in range(warmup, warmup + scaled(150)):
        compile_ruleset(version(base, v))
    grown = rss() - before
    assert grown < 32 << 20, f"RSS grew {grown >> 20} MiB over {scaled(150)} versions"
    for memo in (compiler_rules._ipset, compiler_rules._group_members):
        assert memo.held <= budget

    same = version(base, 7)
    first = compile_ruleset(same).ruleset.ipsets[SET]
    assert compile_ruleset(same).ruleset.ipsets[SET] is first
