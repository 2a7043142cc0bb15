"""The ipset planner: parse `ipset save`, plan member deltas, never touch foreign sets.

Why: member changes are the most frequent kernel writes (every port that
comes or goes changes its groups' sets), so the plan must be the smallest
delta, must not churn on notation (`ipset save` prints a /32 member as a bare
address), and must keep its hands off sets that other software owns.
"""

from __future__ import annotations

import pytest

from agent.dataplane.ipsets import KernelSet, parse_ipset_save, plan_ipsets
from agent.dataplane.ruleset import IpSet


def owns(name: str) -> bool:
    return name.startswith("hfw")


SAVE_TEXT = """\
create hfw4gsg-web hash:net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x8d1e5f2a
add hfw4gsg-web 10.0.0.5
add hfw4gsg-web 10.0.1.0/24
add hfw4gsg-web 10.0.0.9
create hfw6gsg-web hash:net family inet6 hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1
add hfw6gsg-web 2001:db8::5
add hfw6gsg-web 2001:db8:1::/48
create hfw4gold hash:net family inet hashsize 1024 maxelem 65536
add hfw4gold 192.0.2.1
create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-CLUSTER-IP 10.96.0.1,tcp:443
create f2b-sshd hash:ip family inet hashsize 1024 maxelem 65536 timeout 600
add f2b-sshd 203.0.113.7 timeout 512
create docker-hfw hash:net family inet hashsize 1024 maxelem 65536
add docker-hfw 198.51.100.0/24
"""


def kernel() -> dict[str, KernelSet]:
    return parse_ipset_save(SAVE_TEXT, owns)


def want(name: str, family: int, *members: str) -> IpSet:
    return IpSet(name, family, frozenset(members))


def test_parse_reads_owned_sets_only_and_normalises_members() -> None:
    sets = kernel()
    assert sets == {
        "hfw4gsg-web": KernelSet("hfw4gsg-web", 4, "hash:net",
                                 {"10.0.0.5/32", "10.0.1.0/24", "10.0.0.9/32"}),
        "hfw6gsg-web": KernelSet("hfw6gsg-web", 6, "hash:net",
                                 {"2001:db8::5/128", "2001:db8:1::/48"}),
        "hfw4gold": KernelSet("hfw4gold", 4, "hash:net", {"192.0.2.1/32"}),
    }


def test_parse_of_nothing() -> None:
    assert parse_ipset_save("", owns) == {}


def test_equal_sets_need_no_change_whatever_the_notation() -> None:
    """`ipset save` prints 10.0.0.5 for 10.0.0.5/32: that is not a difference."""
    desired = {"hfw4gsg-web": want("hfw4gsg-web", 4, "10.0.0.5/32", "10.0.1.0/24",
                                   "10.0.0.9/32"),
               "hfw6gsg-web": want("hfw6gsg-web", 6, "2001:db8::5/128", "2001:db8:1::/48"),
               "hfw4gold": want("hfw4gold", 4, "192.0.2.1/32")}
    plan = plan_ipsets(desired, kernel())
    assert plan.empty
    assert (plan.before, plan.after, plan.added, plan.removed) == ([], [], 0, 0)


def test_member_deltas_create_and_destroy() -> None:
    desired = {
        "hfw4gsg-web": want("hfw4gsg-web", 4, "10.0.0.5/32", "10.0.0.7/32", "10.0.1.0/24"),
        "hfw6gsg-web": want("hfw6gsg-web", 6, "2001:db8::5/128", "2001:db8:1::/48"),
        "hfw6gnew": want("hfw6gnew", 6, "2001:db8::9/128", "2001:db8::8/128"),
        "hfw4aempty": want("hfw4aempty", 4),
    }
    plan = plan_ipsets(desired, kernel())
    assert plan.before == [
        "create hfw4aempty hash:net family inet",
        "add hfw4gsg-web 10.0.0.7/32",
        "del hfw4gsg-web 10.0.0.9/32",
        "create hfw6gnew hash:net family inet6",
        "add hfw6gnew 2001:db8::8/128",
        "add hfw6gnew 2001:db8::9/128",
    ]
    assert plan.after == ["destroy hfw4gold"]  # after the tables: rules may still use it
    assert (plan.added, plan.removed) == (3, 1)
    assert not plan.empty


def test_foreign_sets_never_appear_in_a_plan() -> None:
    for desired in ({}, {"hfw4gx": want("hfw4gx", 4, "10.0.0.1/32")}):
        plan = plan_ipsets(desired, kernel())
        for line in plan.before + plan.after:
            assert line.split()[1].startswith("hfw"), line
            assert not any(name in line for name in ("KUBE", "f2b", "docker")), line


def test_nothing_wanted_destroys_every_owned_set_and_nothing_else() -> None:
    plan = plan_ipsets({}, kernel())
    assert plan.before == []
    assert plan.after == ["destroy hfw4gold", "destroy hfw4gsg-web", "destroy hfw6gsg-web"]


def test_a_set_of_the_wrong_kind_is_rebuilt_under_its_name() -> None:
    actual = {"hfw4gx": KernelSet("hfw4gx", 4, "hash:ip", {"10.0.0.1/32"})}
    plan = plan_ipsets({"hfw4gx": want("hfw4gx", 4, "10.0.0.1/32", "10.0.2.0/24")}, actual)
    assert plan.before == [
        "destroy hfw4gx",
        "create hfw4gx hash:net family inet",
        "add hfw4gx 10.0.0.1/32",
        "add hfw4gx 10.0.2.0/24",
    ]
    assert plan.after == []


@pytest.mark.parametrize(("family", "kind"), [(6, "hash:net"), (4, "hash:ip")])
def test_a_wrong_family_or_kind_is_not_repaired_by_an_impossible_swap(family: int,
                                                                       kind: str) -> None:
    actual = {"hfw4gx": KernelSet("hfw4gx", family, kind)}
    plan = plan_ipsets({"hfw4gx": want("hfw4gx", 4, "10.0.0.1/32")}, actual)
    assert not any(line.startswith("swap ") for line in plan.before), plan.before


def test_planning_against_the_result_of_a_plan_is_empty() -> None:
    """Replaying `before`/`after` on the kernel view leaves nothing to do."""
    desired = {"hfw4gsg-web": want("hfw4gsg-web", 4, "10.0.0.5/32"),
               "hfw4gnew": want("hfw4gnew", 4, "0.0.0.0/1", "128.0.0.0/1")}
    actual = kernel()
    plan = plan_ipsets(desired, actual)
    for line in plan.before + plan.after:
        words = line.split()
        if words[0] == "create":
            actual[words[1]] = KernelSet(words[1], 6 if "inet6" in words else 4, words[2])
        elif words[0] == "add":
            actual[words[1]].members.add(words[2])
        elif words[0] == "del":
            actual[words[1]].members.discard(words[2])
        elif words[0] == "destroy":
            del actual[words[1]]
    assert plan_ipsets(desired, actual).empty
    assert sorted(actual) == ["hfw4gnew", "hfw4gsg-web"]
