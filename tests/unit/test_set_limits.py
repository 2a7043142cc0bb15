"""One oversized remote group is refused on its own (issue 14.3).

Why: every set change goes into one `ipset restore`, run before any table
write. A set the kernel refuses (`Hash is full`) therefore once failed every
apply of the node, and changes elsewhere never landed. The compiler now
leaves a set over `Settings.max_set_members` empty (its rules match nothing,
fail closed) and says why, naming the group; everything else compiles as
before. The kernel side is in tests/reliability/test_hostile_policy.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agent.compiler import Settings, Snapshot, compile_ruleset
from agent.model import parse_policy

LIMIT = 5


def doc(big: int, small: int = 2, address_nets: int = 2) -> dict[str, Any]:
    rules = [{"direction": "ingress", "protocol": "tcp", "port_range_min": 22,
              "remote_group_id": "big"},
             {"direction": "ingress", "protocol": "tcp", "port_range_min": 80,
              "remote_group_id": "small"},
             {"direction": "ingress", "protocol": "tcp", "port_range_min": 443,
              "remote_address_group_id": "ag"}]
    return {
        "security_groups": {"web": rules, "big": [], "small": []},
        "ports": [{"id": "p1", "device": "tap1", "mac_address": "fa:16:3e:00:00:01",
                   "fixed_ips": ["10.0.0.2"], "security_groups": ["web"]}],
        "sg_member_ips": {
            "big": {"IPv4": [f"10.1.{i >> 8}.{i & 255}" for i in range(big)]},
            "small": {"IPv4": [f"10.2.0.{i}" for i in range(small)]}},
        "address_groups": {"ag": [f"10.3.{i}.0/24" for i in range(address_nets)]},
    }


def compile_with_limit(raw: dict[str, Any], limit: int = LIMIT) -> Any:
    policy = parse_policy(raw)
    assert policy.errors == ()
    settings = Settings(max_set_members=limit)
    return compile_ruleset(Snapshot(policy, frozenset({"tap1"}), settings))


def test_a_group_over_the_limit_gets_an_empty_set_and_an_error_naming_it() -> None:
    compiled = compile_with_limit(doc(big=LIMIT + 1, small=3))
    sets = compiled.ruleset.ipsets
    assert sets["hfw4gbig"].members == frozenset()
    assert len(sets["hfw4gsmall"].members) == 3 and len(sets["hfw4aag"].members) == 2
    [error] = compiled.errors
    assert error.startswith("security group 'big': 6 IPv4 members, over the limit of 5")
    assert "match nothing" in error


def test_the_tables_do_not_change_when_a_group_goes_over_the_limit() -> None:
    """Only the set is refused: rules keep naming it, so nothing else moves."""
    within, over = (compile_with_limit(doc(big=n)) for n in (LIMIT, LIMIT + 1))
    assert within.ruleset.tables == over.ruleset.tables
    assert len(within.ruleset.ipsets["hfw4gbig"].members) == LIMIT and within.errors == ()


def test_an_address_group_over_the_limit_is_refused_too() -> None:
    compiled = compile_with_limit(doc(big=1, address_nets=LIMIT + 2))
    assert compiled.ruleset.ipsets["hfw4aag"].members == frozenset()
    assert [e.split(":")[0] for e in compiled.errors] == ["address group 'ag'"]


def test_an_unreferenced_big_group_is_no_error() -> None:
    raw = doc(big=LIMIT + 1)
    raw["security_groups"]["web"] = raw["security_groups"]["web"][1:]
    assert compile_with_limit(raw).errors == ()


def test_the_default_limit_is_felixs_and_a_70000_member_group_fits() -> None:
    """70,000 members was over the kernel's default maxelem; the set now gets
    it (agent/dataplane/ipsets.py sizes it) and the compiler keeps them all."""
    assert Settings().max_set_members == 1 << 20
    policy = parse_policy(doc(big=1))
    members = {f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32" for i in range(70000)}
    policy = replace(policy, members={**policy.members, "big": {4: frozenset(members)}})
    compiled = compile_ruleset(Snapshot(policy, frozenset({"tap1"})))
    assert len(compiled.ruleset.ipsets["hfw4gbig"].members) == 70000 and not compiled.errors
