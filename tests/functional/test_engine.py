"""The engine against a real kernel: convergence, drift repair, good citizenship.

Each test gets a private network namespace and runs the engine in a thread
that entered it (as the daemon's writer does), for every backend.
"""

from __future__ import annotations

import importlib.util
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.compiler import Snapshot, compile_ruleset
from agent.dataplane.engine import Engine
from agent.dataplane.restore_backend import RestoreBackend
from agent.sources.policy_file import PolicyLoader
from agent.vocab.names import Names
from tests.support.agent import assert_root_clean
from tests.support.in_netns import call_in_netns
from tests.support.topology import NS_PREFIX, run, run_in

pytestmark = pytest.mark.kernel

BACKENDS = ["iptables-legacy", "iptables-nft"]
if importlib.util.find_spec("agent.dataplane.iptc_backend"):
    BACKENDS.append("iptc")
SAVE = {"iptables-legacy": "iptables-legacy", "iptables-nft": "iptables-nft",
        "iptc": "iptables-legacy"}


def make_backend(mode: str) -> Any:
    if mode == "iptc":
        from agent.dataplane.iptc_backend import IptcBackend
        return IptcBackend()
    return RestoreBackend(mode)


def policy(n_ports: int = 3, web_rules: list[dict] | None = None) -> dict:
    rules = web_rules if web_rules is not None else [
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": 80, "port_range_max": 80},
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp",
         "remote_group_id": "sg-web"},
        {"direction": "egress", "ethertype": "IPv4"},
        {"direction": "egress", "ethertype": "IPv6"},
    ]
    return {
        "security_groups": {"sg-web": rules},
        "ports": [{"id": f"port-{i:04d}", "device": f"tap{i:04d}",
                   "mac_address": f"fa:16:3e:00:{i // 256:02x}:{i % 256:02x}",
                   "fixed_ips": [f"10.0.{i // 250}.{i % 250 + 2}", f"fd00::{i + 2:x}"],
                   "security_groups": ["sg-web"]} for i in range(n_ports)],
    }


def compiled(raw: dict, devices: int | None = None) -> Any:
    """The ruleset of `raw` as the standalone agent builds it (members derived)."""
    pol = PolicyLoader().parse(raw)
    devs = frozenset(p.device for p in pol.ports[:devices])
    return compile_ruleset(Snapshot(pol, devs)).ruleset


class Writer:
    """A thread inside the namespace that runs engine calls, like the daemon's writer."""

    def __init__(self, ns: str, mode: str) -> None:
        self.ns = ns
        self.mode = mode
        self.engine: Engine | None = None

    def call(self, fn: Callable[[Engine], Any]) -> Any:
        def body() -> Any:
            if self.engine is None:
                self.engine = Engine(make_backend(self.mode), Names(), (4, 6))
            return fn(self.engine)
        return call_in_netns(self.ns, body)

    def save(self, family: int = 4) -> str:
        tool = SAVE[self.mode] + "-save"
        return run_in(self.ns, ["ip6" + tool[2:] if family == 6 else tool]).stdout

    def ipt(self, *args: str, family: int = 4) -> None:
        tool = SAVE[self.mode]
        run_in(self.ns, ["ip6" + tool[2:] if family == 6 else tool, "-w", *args])


@pytest.fixture(params=BACKENDS)
def writer(request: pytest.FixtureRequest) -> Iterator[Writer]:
    ns = f"{NS_PREFIX}{request.node.name[:20].replace('[', '-').strip(']')}"
    ns = "".join(c for c in ns if c.isalnum() or c in "-_")[:40]
    run(["ip", "netns", "add", ns])
    try:
        yield Writer(ns, request.param)
    finally:
        run(["ip", "netns", "del", ns], check=False)
        assert_root_clean()


def owned_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "hostfw" in line]


def test_second_apply_writes_nothing(writer: Writer) -> None:
    desired = compiled(policy())
    first = writer.call(lambda e: e.apply(desired))
    assert first.tables_written and first.lines_written > 0
    again = writer.call(lambda e: e.apply(desired, refresh=True, verify=True))
    assert again.tables_written == [] and again.lines_written == 0
    assert again.in_sync


def test_rule_change_rewrites_only_the_group_chain(writer: Writer) -> None:
    writer.call(lambda e: e.apply(compiled(policy(5))))
    rules = policy(5)["security_groups"]["sg-web"] + [
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": 443, "port_range_max": 443}]
    report = writer.call(lambda e: e.apply(compiled(policy(5, rules)), verify=True))
    assert report.tables_written == ["filter/v4"]
    assert report.chains_written == 1
    assert report.lines_written < 10
    assert report.in_sync


def test_member_change_touches_only_the_ipset(writer: Writer) -> None:
    writer.call(lambda e: e.apply(compiled(policy(4), devices=2)))
    # A third port of the group appears elsewhere: only its address joins the set.
    raw = policy(4)
    raw["ports"][3]["fixed_ips"].append("10.9.9.9")
    report = writer.call(lambda e: e.apply(compiled(raw, devices=2)))
    assert report.tables_written == []
    assert report.ipset_members_added == 1
    members = run_in(writer.ns, ["ipset", "list", "hfw4gsg-web"]).stdout
    assert "10.9.9.9" in members


def test_unchanged_tables_are_skipped_until_a_refresh_finds_drift(writer: Writer) -> None:
    """A members-only change hands the engine the very same tables: they are not
    compared (and a tamper since goes unseen) until a refresh re-reads the kernel."""
    first = compiled(policy(4), devices=2)
    writer.call(lambda e: e.apply(first))
    raw = policy(4)
    raw["ports"][3]["fixed_ips"].append("10.9.9.9")
    second = compiled(raw, devices=2)
    assert second.tables[(4, "filter")] is first.tables[(4, "filter")]
    writer.ipt("-F", Names().port_chain("i", "tap0000"))
    report = writer.call(lambda e: e.apply(second))
    assert (report.tables_written, report.ipset_members_added) == ([], 1)
    repaired = writer.call(lambda e: e.apply(second, refresh=True, verify=True))
    assert repaired.tables_written == ["filter/v4"] and repaired.drift_repaired
    assert repaired.in_sync


@pytest.mark.parametrize("tamper", [
    "flush", "delete_rule", "append_rule", "delete_hook", "duplicate_hook",
    "stale_chain", "ipset_member", "ipset_extra",
])
def test_drift_is_repaired_by_a_refresh(writer: Writer, tamper: str) -> None:
    desired = compiled(policy())
    writer.call(lambda e: e.apply(desired))
    before = owned_lines(writer.save())
    chain = "hostfw-i0001"
    if tamper == "flush":
        writer.ipt("-F", chain)
    elif tamper == "delete_rule":
        writer.ipt("-D", chain, "2")
    elif tamper == "append_rule":
        writer.ipt("-A", chain, "-j", "ACCEPT")
    elif tamper == "delete_hook":
        writer.ipt("-D", "FORWARD", "-j", "hostfw-FORWARD")
    elif tamper == "duplicate_hook":
        writer.ipt("-A", "FORWARD", "-j", "hostfw-FORWARD")
    elif tamper == "stale_chain":
        writer.ipt("-N", "hostfw-bogus")
        writer.ipt("-A", "hostfw-bogus", "-j", "ACCEPT")
    elif tamper == "ipset_member":
        run_in(writer.ns, ["ipset", "del", "hfw4gsg-web", "10.0.0.3"])
    elif tamper == "ipset_extra":
        run_in(writer.ns, ["ipset", "add", "hfw4gsg-web", "192.0.2.1"])
    # Incremental applies trust the engine's view; only a refresh sees the drift.
    quiet = writer.call(lambda e: e.apply(desired))
    assert quiet.lines_written == 0
    repair = writer.call(lambda e: e.apply(desired, refresh=True, verify=True))
    assert repair.changed and repair.drift_repaired and repair.in_sync
    assert owned_lines(writer.save()) == before
    members = run_in(writer.ns, ["ipset", "list", "hfw4gsg-web"]).stdout
    assert "10.0.0.3" in members and "192.0.2.1" not in members


@pytest.mark.parametrize("tamper", ["flush", "delete_rule", "ipset_member", "none"])
def test_read_back_of_touched_chains_finds_drift_there(writer: Writer, tamper: str) -> None:
    """`check` reads only what a write touched (one `-S <chain>` each, one `ipset
    save <set>`), agrees with the kernel when untampered, and where it differs
    the next incremental apply repairs it and counts it as drift."""
    desired = compiled(policy())
    writer.call(lambda e: e.apply(desired))
    raw = policy()
    raw["security_groups"]["sg-web"].append(
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": 81, "port_range_max": 81})
    raw["ports"][2]["fixed_ips"].append("10.9.9.9")
    changed = compiled(raw)
    report = writer.call(lambda e: e.apply(changed))
    group_chains = {c for c in report.touched[(4, "filter")] if c.startswith("hostfw-g")}
    assert group_chains and report.sets_touched == {"hfw4gsg-web"}
    assert len(report.touched[(4, "filter")]) < 5, report.touched
    chain = sorted(group_chains)[0]
    if tamper == "flush":
        writer.ipt("-F", chain)
    elif tamper == "delete_rule":
        writer.ipt("-D", chain, "1")
    elif tamper == "ipset_member":
        run_in(writer.ns, ["ipset", "del", "hfw4gsg-web", "10.9.9.9"])
    differs = writer.call(lambda e: e.check(report.touched, report.sets_touched))
    if tamper == "none":
        assert differs == []
        return
    assert differs == (["ipset hfw4gsg-web"] if tamper == "ipset_member"
                       else [f"filter/v4 {chain}"])
    repair = writer.call(lambda e: e.apply(changed))
    assert repair.changed and repair.drift_repaired
    assert writer.call(lambda e: e.check(repair.touched, repair.sets_touched)) == []


def test_a_stepwise_refresh_sees_what_a_full_read_sees(writer: Writer) -> None:
    desired = compiled(policy())
    writer.call(lambda e: e.apply(desired))
    writer.ipt("-F", "hostfw-i0001")
    steps = writer.call(lambda e: e.refresh_steps(desired))
    assert (4, "filter") in steps and steps[-1] is None
    for step in steps:
        writer.call(lambda e, step=step: e.refresh_step(step))
    repair = writer.call(lambda e: e.apply(desired, verify=True))
    assert repair.drift_repaired and repair.in_sync and repair.tables_written == ["filter/v4"]


def test_foreign_rules_and_chains_are_never_touched(writer: Writer) -> None:
    writer.ipt("-N", "FOREIGN")
    writer.ipt("-A", "FOREIGN", "-s", "192.0.2.1/32", "-j", "ACCEPT")
    writer.ipt("-A", "FORWARD", "-j", "FOREIGN")
    writer.ipt("-A", "INPUT", "-s", "192.0.2.2/32", "-j", "DROP")
    writer.ipt("-A", "OUTPUT", "-j", "ACCEPT", "-m", "comment", "--comment", "hostfw-lookalike")
    foreign = [line for line in writer.save().splitlines()
               if "192.0.2" in line or "FOREIGN" in line or "lookalike" in line]
    writer.call(lambda e: e.apply(compiled(policy(3))))
    writer.call(lambda e: e.apply(compiled(policy(1))))       # ports go: chains deleted
    writer.call(lambda e: e.apply(compiled(policy(3)), refresh=True))
    after = writer.save().splitlines()
    assert all(line in after for line in foreign)


def test_a_concurrent_foreign_writer_loses_nothing(writer: Writer) -> None:
    """Another process adds and deletes rules in FORWARD while the engine applies."""
    stop = threading.Event()
    tool = SAVE[writer.mode]
    added: list[str] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            addr = f"192.0.2.{i % 200 + 1}/32"
            run_in(writer.ns, [tool, "-w", "-A", "FORWARD", "-s", addr, "-j", "ACCEPT"])
            if i % 2:
                run_in(writer.ns, [tool, "-w", "-D", "FORWARD", "-s", addr, "-j", "ACCEPT"])
            else:
                added.append(addr)
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    sizes = [3, 5, 2, 6, 4, 1, 6, 3, 5, 2] * 2
    try:
        for n in sizes:
            writer.call(lambda e, n=n: e.apply(compiled(policy(n))))
    finally:
        stop.set()
        thread.join()
    forward = [line for line in writer.save().splitlines() if line.startswith("-A FORWARD -s")]
    for addr in set(added):
        assert sum(f"-s {addr} " in line for line in forward) == added.count(addr)
    assert writer.call(lambda e: e.in_sync(compiled(policy(sizes[-1]))))


def test_a_failed_commit_leaves_the_table_as_it_was(writer: Writer) -> None:
    desired = compiled(policy(3))
    writer.call(lambda e: e.apply(desired))
    before = writer.save()
    raw = policy(3, [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                      "port_range_min": 22, "port_range_max": 22,
                      "remote_group_id": "sg-missing-set"}])
    broken = compiled(raw)
    # Make the commit fail: the set the new rule needs is not created.
    object.__setattr__(broken, "ipsets", {})

    def apply_broken(engine: Engine) -> None:
        engine.view = engine.set_view = None  # force a fresh read first
        engine.apply(broken)

    with pytest.raises(Exception, match="(?i)set|exit|fail"):
        writer.call(apply_broken)
    assert ruleset_lines(writer.save()) == ruleset_lines(before)
    assert writer.call(lambda e: e.apply(desired)).lines_written == 0


def ruleset_lines(save: str) -> list[str]:
    """iptables-save output without its comment lines ("# Generated/Completed on <time>")."""
    return [line for line in save.splitlines() if not line.startswith("#")]


def test_iptables_save_of_our_rules_round_trips(writer: Writer) -> None:
    """Every rendered rule reads back with exactly the text we wrote (both families)."""
    desired = compiled(policy(4))
    writer.call(lambda e: e.apply(desired))
    for family in (4, 6):
        text = writer.save(family)
        for table in ("filter", "raw"):
            for chain, rules in desired.tables[(family, table)].chains.items():
                for rule in rules:
                    assert f"-A {chain} {rule.text}" in text, (family, chain, rule)


def test_nothing_lands_in_the_root_namespace(writer: Writer) -> None:
    writer.call(lambda e: e.apply(compiled(policy(2))))
    assert_root_clean()
    assert "hostfw" not in subprocess.run(["iptables-legacy-save"], capture_output=True,
                                          text=True).stdout
