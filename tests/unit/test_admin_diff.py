"""`diff` (agent/admin/diff.py) through the real planner, on a kernel made of text.

The kernel is a fake backend's iptables-save text and a fake `ipset save`;
the plans come from the real `Engine.plans` and `plan_ipsets`, so these tests
cover the cases the end-to-end test cannot provoke cheaply: new and stale
chains, a hook out of place, an ipset of the wrong type and one nobody wants.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

from agent.admin.diff import diff, render
from agent.compiler import Compiled, Settings, Snapshot, compile_ruleset
from agent.dataplane.engine import Engine
from agent.model import parse_policy
from agent.vocab.names import Names
from agent.vocab.rule_text import parse_rule_text
from agent.vocab.ruleset import Hook, Ruleset

POLICY = parse_policy({
    "security_groups": {"sg-a": [{"direction": "ingress", "ethertype": "IPv4",
                                  "protocol": "tcp", "port_range_min": 22,
                                  "port_range_max": 22, "remote_group_id": "sg-a"}]},
    "ports": [{"id": "port-a", "device": "tapa", "mac_address": "fa:16:3e:00:00:0a",
               "fixed_ips": ["10.0.0.10"], "security_groups": ["sg-a"]}],
    "sg_member_ips": {"sg-a": {"IPv4": [["10.0.0.10", None], ["10.0.0.11", None]]}},
})
COMPILED: Compiled = compile_ruleset(Snapshot(POLICY, frozenset({"tapa"}),
                                              Settings(enable_ipv6=False)))


def save_text(ruleset: Ruleset) -> str:
    """The ruleset as iptables-save would print it once applied."""
    out = []
    for (_, name), table in sorted(ruleset.tables.items()):
        builtins = dict.fromkeys(h.chain for h in table.hooks)
        out += [f"*{name}", *(f":{c} ACCEPT [0:0]" for c in builtins),
                *(f":{c} - [0:0]" for c in table.chains)]
        out += [f"-A {h.chain} {h.spec}" for h in table.hooks]
        out += [f"-A {c} {r.text}" for c, rules in table.chains.items() for r in rules]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def ipset_text(ruleset: Ruleset) -> str:
    out = []
    for name, s in sorted(ruleset.ipsets.items()):
        out.append(f"create {name} {s.kind} family inet hashsize 1024 maxelem 65536")
        out += [f"add {name} {m.removesuffix('/32')}" for m in sorted(s.members)]
    return "\n".join(out) + "\n"


@dataclass
class FakeBackend:
    text: str
    mode: str = "fake"

    def save(self, family: int) -> str:
        return self.text

    def commit(self, plan: Any) -> None:
        raise AssertionError("diff must never write")


@dataclass
class FakeIpsets:
    text: str

    def save(self) -> str:
        return self.text

    def restore(self, lines: list[str]) -> None:
        raise AssertionError("diff must never write")


@dataclass
class FakeState:
    compiled: Compiled | None = COMPILED
    generation: int = 7
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeAgent:
    """What diff needs of the daemon: its state and a writer thread (run inline)."""

    def __init__(self, iptables: str, ipsets: str) -> None:
        self.state = FakeState()
        self.engine = Engine(FakeBackend(iptables), Names(), (4,))
        self.engine.ipsets = FakeIpsets(ipsets)  # type: ignore[assignment]

    def call_on_writer(self, fn: Any, timeout: float = 30.0) -> Any:
        return fn(self.engine)


def test_in_sync() -> None:
    reply = diff(FakeAgent(save_text(COMPILED.ruleset), ipset_text(COMPILED.ruleset)))
    assert reply == {"ok": True, "in_sync": True, "generation": 7, "tables": [],
                     "ipsets": []}
    assert render(reply) == "no changes: the kernel matches the agent's ruleset"


def test_nothing_compiled_yet() -> None:
    agent = FakeAgent("", "")
    agent.state.compiled = None
    assert diff(agent) == {"ok": False, "error": "the agent has not compiled a ruleset yet"}


def test_every_kind_of_change() -> None:
    # The port's ingress chain lost its first rule, the accept chain is gone, a
    # stale chain of ours lingers, FORWARD lost its hook and INPUT has two.
    desired = COMPILED.ruleset.tables[(4, "filter")]
    chains = dict(desired.chains)
    port_chain = "hostfw-ia"
    chains[port_chain] = chains[port_chain][1:]
    del chains["hostfw-accept"]
    chains["hostfw-old"] = (parse_rule_text("-j DROP"),)
    hooks = (*(h for h in desired.hooks if h.chain != "FORWARD"), Hook("INPUT", "hostfw-INPUT"))
    kernel = Ruleset({**COMPILED.ruleset.tables,
                      (4, "filter"): replace(desired, chains=chains, hooks=hooks)})
    sets = ("create hfw4gsg-a hash:ip family inet hashsize 1024 maxelem 65536\n"
            "add hfw4gsg-a 10.0.0.10\n"
            "create hfw4gstale hash:net family inet hashsize 1024 maxelem 65536\n")
    reply = diff(FakeAgent(save_text(kernel), sets))
    assert reply["in_sync"] is False
    [table] = reply["tables"]
    assert table["table"] == "ipv4/filter"
    changes = {c["chain"]: c for c in table["chains"]}
    assert set(changes) == {port_chain, "hostfw-accept", "hostfw-old"}
    assert changes[port_chain]["action"] == "rewrite"
    assert changes[port_chain]["desired"][1:] == changes[port_chain]["kernel"]
    assert (changes["hostfw-accept"]["action"], changes["hostfw-accept"]["kernel"]) == \
        ("create", None)
    assert changes["hostfw-old"] == {"chain": "hostfw-old", "action": "delete",
                                     "kernel": ["-j DROP"], "desired": None}
    assert "-A FORWARD -j hostfw-FORWARD" in table["hooks_inserted"]
    assert "-A INPUT -j hostfw-INPUT" in table["hooks_deleted"]
    assert reply["ipsets"] == [
        {"name": "hfw4gsg-a", "create": False, "rebuild": True, "destroy": False,
         "add": ["10.0.0.10/32", "10.0.0.11/32"], "del": []},
        {"name": "hfw4gstale", "create": False, "rebuild": False, "destroy": True,
         "add": [], "del": []},
    ]
    lines = render(reply).splitlines()

    def section(header: str, length: int) -> list[str]:
        return lines[lines.index(header):][:length]

    assert section(f"=== ipv4/filter {port_chain}: rewrite", 3) == [
        f"=== ipv4/filter {port_chain}: rewrite", "@@ -1 +1,2 @@",
        f"+-A {port_chain} {desired.chains[port_chain][0].text}"]
    assert section("=== ipv4/filter hostfw-accept: new chain", 2)[1] == "@@ -0,0 +1 @@"
    assert section("=== ipv4/filter hostfw-old: delete chain", 3)[1:] == [
        "@@ -1 +0,0 @@", "--A hostfw-old -j DROP"]
    assert section("=== ipv4/filter hook: insert at the top", 2)[1] in (
        "+-A FORWARD -j hostfw-FORWARD", "+-A INPUT -j hostfw-INPUT")
    assert lines[-4:] == ["=== ipset hfw4gsg-a: rebuild", "+10.0.0.10/32", "+10.0.0.11/32",
                          "=== ipset hfw4gstale: destroy"]
