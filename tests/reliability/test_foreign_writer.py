"""A foreign writer in the same tables during many applies: none of its rules is lost.

While the agent applies a stream of policy changes (and taps come and go),
a background thread plays another firewall tool on the node: it appends,
inserts and deletes its own rules in FORWARD and INPUT (next to the agent's
hooks) and in a chain of its own, with the ordinary CLI (`-w`, so it queues
on the xtables lock like any well-behaved tool). It keeps its own account of
what should exist. At the end the kernel must hold exactly those rules, and
the agent must be in sync without rewriting anything: its view of the
built-in chains never makes it drop, reorder or resurrect a foreign rule.
"""

from __future__ import annotations

import random
import threading

import pytest

from agent.dataplane.plan import jump_target, rules_ahead_of_hooks
from tests.reliability.support import (
    NAMES,
    add_taps,
    backend_params,
    plug_tap_ports,
    random_policy,
    read_kernel,
    scaled,
    tool,
)
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import Topology

pytestmark = pytest.mark.kernel

TAPS = 20
FOREIGN = "FOREIGN-FW"  # not the agent's prefix


class ForeignWriter(threading.Thread):
    """Adds and deletes its own rules until stopped; `expected` is what must exist."""

    def __init__(self, topo: Topology, cli: str, seed: int) -> None:
        super().__init__(name="foreign-writer", daemon=True)
        self.topo = topo
        self.cli = cli
        self.rng = random.Random(seed)
        self.expected: dict[str, list[str]] = {"FORWARD": [], "INPUT": [], FOREIGN: []}
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.ops = 0
        self._serial = 0

    def _cli(self, *argv: str) -> bool:
        proc = self.topo.node.run([self.cli, "-w", *argv], check=False)
        if proc.returncode != 0:
            self.errors.append(f"{self.cli} {' '.join(argv)}: {proc.stderr.strip()}")
            return False
        self.ops += 1
        return True

    def run(self) -> None:
        # A short pause per operation: a busy but plausible neighbour, not a fork bomb
        # that starves the agent of the CPU and the xtables lock.
        while not self.stop_event.wait(0.02) and len(self.errors) < 5:
            chain = self.rng.choice(list(self.expected))
            rules = self.expected[chain]
            if rules and self.rng.random() < 0.4:
                spec = self.rng.choice(rules)
                if self._cli("-D", chain, *spec.split()):
                    rules.remove(spec)
                continue
            self._serial += 1
            n = self._serial
            target = "RETURN" if chain == FOREIGN else "ACCEPT"
            spec = f"-s 198.18.{n >> 8 & 0xff}.{n & 0xff}/32 -j {target}"
            if self.rng.random() < 0.3:
                ok = self._cli("-I", chain, "1", *spec.split())
            else:
                ok = self._cli("-A", chain, *spec.split())
            if ok:
                rules.append(spec)


@pytest.mark.parametrize("backend", backend_params("iptables-legacy", "iptables-nft", "iptc"))
def test_foreign_rules_survive_many_applies(topology: Topology, tmp_path, backend: str) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ns = topology.node.ns
    taps = plug_tap_ports(ns, TAPS)
    present = {t.device for t in taps}
    cli = tool(backend)
    topology.node.run([cli, "-w", "-N", FOREIGN])
    topology.node.run([cli, "-w", "-A", "FORWARD", "-j", FOREIGN])
    agent = AgentProcess(tmp_path, ns, random_policy(rng, taps), backend=backend)
    writer = ForeignWriter(topology, cli, seed)
    try:
        agent.start()
        writer.start()
        for _ in range(scaled(10)):
            if rng.random() < 0.3:  # a tap comes or goes: an apply driven by netlink
                tap = rng.choice(taps)
                if tap.device in present:
                    topology.remove_device(tap.device)
                    present.discard(tap.device)
                else:
                    add_taps(ns, [tap.device])
                    present.add(tap.device)
            agent.write_policy(random_policy(rng, taps))
            agent.resync()
        writer.stop_event.set()
        writer.join(timeout=60)
        assert not writer.errors, f"seed {seed}: the foreign writer failed: {writer.errors}"
        assert writer.ops > 20, f"the foreign writer barely ran ({writer.ops} operations)"

        filt = read_kernel(ns, backend)[4]["filter"].chains
        for chain, want in writer.expected.items():
            got = [spec for spec in filt.get(chain, [])
                   if not (jump_target(spec) or "").startswith((NAMES.chain_prefix, FOREIGN))]
            assert sorted(got) == sorted(want), (
                f"seed {seed}: {chain} lost {sorted(set(want) - set(got))[:5]}, "
                f"gained {sorted(set(got) - set(want))[:5]} after {writer.ops} foreign ops")
        assert f"-j {FOREIGN}" in filt["FORWARD"], "the foreign jump was lost"
        assert f"-j {NAMES.chain('FORWARD')}" in filt["FORWARD"], "the agent's hook is gone"

        agent.resync()
        agent.resync()
        last = agent.request({"command": "status"})["last_apply"]
        assert last["lines_written"] == 0, f"foreign rules made the agent rewrite: {last}"
    finally:
        writer.stop_event.set()
        agent.stop()
        assert_root_clean()


@pytest.mark.parametrize("backend", backend_params("iptables-legacy", "iptables-nft"))
def test_a_foreign_accept_ahead_of_our_hook_is_found_and_left_alone(
        topology: Topology, tmp_path, backend: str) -> None:
    """Issue 14.10b: `-I FORWARD 1 -j ACCEPT` by another tool passes every bridged
    packet before our hook sees it. The kernel's own listing shows it ahead of
    the hook; the agent does not fight it (a resync writes nothing)."""
    ns = topology.node.ns
    taps = plug_tap_ports(ns, 2)
    agent = AgentProcess(tmp_path, ns, random_policy(random.Random(14), taps), backend=backend)
    try:
        agent.start()
        assert rules_ahead_of_hooks(read_kernel(ns, backend)[4]["filter"],
                                    NAMES.owns_chain) == {}
        topology.node.run([tool(backend), "-w", "-I", "FORWARD", "1", "-j", "ACCEPT"])
        agent.resync()
        filt = read_kernel(ns, backend)[4]["filter"]
        assert rules_ahead_of_hooks(filt, NAMES.owns_chain) == {"FORWARD": ["-j ACCEPT"]}
        assert agent.request({"command": "status"})["last_apply"]["lines_written"] == 0
    finally:
        agent.stop()
        assert_root_clean()
