"""The ipset planner: parse `ipset save`, plan member deltas, never touch foreign sets.

Why: member changes are the most frequent kernel writes (every port that
comes or goes changes its groups' sets), so the plan must be the smallest
delta, must not churn on notation (`ipset save` prints a /32 member as a bare
address), and must keep its hands off sets that other software owns.
"""

from __future__ import annotations

import pytest

from agent.dataplane.ipsets import (
    DEFAULT_MAXELEM,
    KernelSet,
    maxelem_for,
    parse_ipset_save,
    plan_ipsets,
    temporary_name,
    written,
)
from agent.vocab.names import Names
from agent.vocab.ruleset import IpSet

owns = Names().owns_ipset


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
create hfw-allow hash:net family inet hashsize 1024 maxelem 65536
add hfw-allow 192.0.2.0/24
create hfwd_ports hash:ip,port family inet hashsize 1024 maxelem 65536
add hfwd_ports 10.0.0.1,tcp:22
create hfwbits bitmap:port range 0-1024
add hfwbits 22
create hfw hash:net family inet hashsize 1024 maxelem 65536
"""


def kernel() -> dict[str, KernelSet]:
    return parse_ipset_save(SAVE_TEXT, owns)


def want(name: str, family: int, *members: str) -> IpSet:
    return IpSet(name, family, frozenset(members))


def test_parse_reads_owned_sets_only_and_normalises_members() -> None:
    sets = kernel()
    assert sets == {
        "hfw4gsg-web": KernelSet("hfw4gsg-web", 4, "hash:net",
                                 {"10.0.0.5/32", "10.0.1.0/24", "10.0.0.9/32"}, 65536),
        "hfw6gsg-web": KernelSet("hfw6gsg-web", 6, "hash:net",
                                 {"2001:db8::5/128", "2001:db8:1::/48"}, 65536),
        "hfw4gold": KernelSet("hfw4gold", 4, "hash:net", {"192.0.2.1/32"}, 65536),
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
        "create hfw4aempty hash:net family inet maxelem 65536",
        "add hfw4gsg-web 10.0.0.7/32",
        "del hfw4gsg-web 10.0.0.9/32",
        "create hfw6gnew hash:net family inet6 maxelem 65536",
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
            assert not any(name in line for name in ("KUBE", "f2b", "docker", "hfw-allow",
                                                     "hfwd_ports", "hfwbits")), line


def test_nothing_wanted_destroys_every_owned_set_and_nothing_else() -> None:
    plan = plan_ipsets({}, kernel())
    assert plan.before == []
    assert plan.after == ["destroy hfw4gold", "destroy hfw4gsg-web", "destroy hfw6gsg-web"]


def test_a_set_of_the_wrong_kind_is_rebuilt_under_its_name() -> None:
    actual = {"hfw4gx": KernelSet("hfw4gx", 4, "hash:ip", {"10.0.0.1/32"})}
    plan = plan_ipsets({"hfw4gx": want("hfw4gx", 4, "10.0.0.1/32", "10.0.2.0/24")}, actual)
    assert plan.before == [
        "destroy hfw4gx",
        "create hfw4gx hash:net family inet maxelem 65536",
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
            actual[words[1]] = KernelSet(words[1], 6 if "inet6" in words else 4, words[2],
                                         maxelem=int(words[words.index("maxelem") + 1]))
        elif words[0] == "add":
            actual[words[1]].members.add(words[2])
        elif words[0] == "del":
            actual[words[1]].members.discard(words[2])
        elif words[0] == "destroy":
            del actual[words[1]]
    assert plan_ipsets(desired, actual).empty
    assert sorted(actual) == ["hfw4gnew", "hfw4gsg-web"]


# ---------------------------------------------------------------- ownership (issue 14.4)

@pytest.mark.parametrize("name", ["hfw-allow", "hfwd_ports", "hfwbits", "hfw", "hfw4",
                                  "hfwx4g", "xhfw4gsg", "HFW4gsg"])
def test_sets_sharing_only_the_prefix_are_foreign(name: str) -> None:
    """CONTRACT section 8: ours is the prefix, then 4 or 6, then a suffix."""
    assert not owns(name)


@pytest.mark.parametrize("name", ["hfw4gsg-web", "hfw6aag1", "hfw4g" + "x" * 26])
def test_names_the_compiler_makes_are_ours(name: str) -> None:
    assert owns(name)
    assert owns(Names().ipset(4, "g", "x" * 40)) and owns(temporary_name(name))


def test_an_owned_set_of_a_foreign_type_is_parsed_not_a_crash() -> None:
    """A set of ours recreated by hand as hash:ip,port: its members are kept as
    written (ValueError on the writer thread once killed it), and the plan
    replaces the set."""
    text = ("create hfw4gx hash:ip,port family inet hashsize 1024 maxelem 65536\n"
            "add hfw4gx 10.0.0.1,tcp:22\n")
    sets = parse_ipset_save(text, owns)
    assert sets["hfw4gx"].members == {"10.0.0.1,tcp:22"}
    plan = plan_ipsets({"hfw4gx": want("hfw4gx", 4, "10.0.0.1/32")}, sets)
    assert plan.before[:2] == ["destroy hfw4gx",
                               "create hfw4gx hash:net family inet maxelem 65536"]


# ---------------------------------------------------------------- sizes (issue 14.3)

def test_maxelem_is_the_default_or_room_to_double() -> None:
    assert maxelem_for(0) == maxelem_for(32768) == DEFAULT_MAXELEM
    assert maxelem_for(32769) == maxelem_for(65536) == 131072
    assert maxelem_for(70000) == 262144
    assert all(maxelem_for(n) >= 2 * n for n in (1, 1000, 65537, 10**6))


def test_a_big_new_set_is_created_big_enough() -> None:
    members = {f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32" for i in range(70000)}
    plan = plan_ipsets({"hfw4gbig": IpSet("hfw4gbig", 4, frozenset(members))}, {})
    assert plan.before[0] == "create hfw4gbig hash:net family inet maxelem 262144"
    assert plan.added == 70000


def test_a_set_outgrowing_its_maxelem_is_rebuilt_and_swapped_in() -> None:
    """The kernel cannot raise maxelem in place: a temporary set of the new
    size gets every member, is swapped in (rules keep referencing the name)
    and the old contents go with the temporary."""
    old = {f"10.0.{i >> 8}.{i & 255}/32" for i in range(100)}
    new = old | {"10.1.0.0/24", "10.2.0.0/24"}
    temp = temporary_name("hfw4gx")
    plan = plan_ipsets({"hfw4gx": IpSet("hfw4gx", 4, frozenset(new))},
                       {"hfw4gx": KernelSet("hfw4gx", 4, "hash:net", set(old), 101),
                        temp: KernelSet(temp, 4, "hash:net", {"10.9.9.9/32"}, 65536)})
    assert plan.before[:2] == [f"destroy {temp}",
                               f"create {temp} hash:net family inet maxelem 65536"]
    assert plan.before[-2:] == [f"swap {temp} hfw4gx", f"destroy {temp}"]
    assert sorted(line.split()[2] for line in plan.before if line.startswith("add ")) == \
        sorted(new)
    assert plan.after == [] and (plan.added, plan.removed) == (2, 0)


def test_a_set_within_its_size_gets_deltas_only() -> None:
    have = KernelSet("hfw4gx", 4, "hash:net", {"10.0.0.1/32"})  # maxelem not read
    plan = plan_ipsets({"hfw4gx": want("hfw4gx", 4, "10.0.0.1/32", "10.0.0.2/32")},
                       {"hfw4gx": have})
    assert plan.before == ["add hfw4gx 10.0.0.2/32"]


def test_an_unread_maxelem_is_assumed_no_bigger_than_the_members_prove() -> None:
    """The engine records what it wrote without `maxelem`; the planner then
    assumes the least size those members prove, so it may rebuild once too
    often but never lets a restore hit `Hash is full`."""
    assert KernelSet("x", 4, "hash:net", {str(i) for i in range(10)}).capacity == 65536
    assert KernelSet("x", 4, "hash:net", {str(i) for i in range(70000)}).capacity == 131072
    assert KernelSet("x", 4, "hash:net", set(), 1 << 20).capacity == 1 << 20


def test_the_view_after_a_plan_keeps_the_kernels_maxelem_or_takes_the_new_one() -> None:
    """For the writer's view (agent/dataplane/engine.py): a set only given
    members keeps the maxelem read from the kernel, so a later growth past it
    is planned as a rebuild instead of failing with `Hash is full`."""
    small = KernelSet("hfw4gx", 4, "hash:net", {"10.0.0.1/32"}, 2)
    grown = written(want("hfw4gx", 4, "10.0.0.1/32", "10.0.0.2/32"), small)
    assert grown.maxelem == 2 and grown.members == {"10.0.0.1/32", "10.0.0.2/32"}
    assert plan_ipsets({"hfw4gx": want("hfw4gx", 4, "10.0.0.1/32", "10.0.0.2/32",
                                       "10.0.0.3/32")}, {"hfw4gx": grown}).before[-2] == \
        f"swap {temporary_name('hfw4gx')} hfw4gx"
    rebuilt = written(want("hfw4gx", 4, "10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"), small)
    assert rebuilt.maxelem == 65536
    assert written(want("hfw4gy", 4), None).maxelem == 65536
