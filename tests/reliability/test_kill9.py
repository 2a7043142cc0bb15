"""SIGKILL at random points during applies: every table is always a whole generation.

Each round writes a new random policy (group rules, memberships, which ports
exist), makes the agent apply it (SIGHUP) and kills it with SIGKILL after a
random delay: before, during or after its kernel writes. Then, once any
orphaned iptables-restore/ipset child has finished:

- every owned table the kernel holds equals the compiled previous or new
  generation, chain for chain (iptables commits a table atomically; this
  checks that the agent never splits a generation over two commits of one
  table and never leaves a half-written script behind);
- no owned chain is jumped to but missing, or present but unreachable;
- the restarted agent converges: `resync --wait` succeeds, the next resync
  writes nothing, and the kernel equals the new generation.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import pytest

from tests.reliability.support import (
    backend_params,
    expected_tables,
    kernel_owned,
    plug_tap_ports,
    random_policy,
    read_kernel,
    reference_problems,
    scaled,
    wait_tools_done,
)
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import Topology

pytestmark = pytest.mark.kernel

TAPS = 40
MAX_DELAY = 0.5  # seconds after SIGHUP; an apply of 40 ports takes ~0.1-0.4 s here


def _difference(got: dict, want: dict) -> str:
    keys = sorted(set(got) | set(want))
    for key in keys:
        g, w = got.get(key, {}), want.get(key, {})
        extra, missing = sorted(set(g) - set(w)), sorted(set(w) - set(g))
        changed = sorted(c for c in set(g) & set(w) if g[c] != w[c])
        if extra or missing or changed:
            return f"{key}: extra {extra[:3]}, missing {missing[:3]}, changed {changed[:3]}"
    return "no difference"


@pytest.mark.parametrize("backend", backend_params("iptables-legacy", "iptables-nft", "iptc"))
def test_sigkill_during_applies_leaves_whole_generations_and_restart_converges(
        topology: Topology, tmp_path, backend: str) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ns = topology.node.ns
    taps = plug_tap_ports(ns, TAPS)
    devices = {t.device for t in taps}
    docs = [random_policy(rng, taps)]
    agent = AgentProcess(tmp_path, ns, docs[0], backend=backend)
    outcomes: Counter[str] = Counter()
    try:
        agent.start()
        agent.resync()
        for round_ in range(scaled(6)):
            previous, new = docs[-1], random_policy(rng, taps)
            docs.append(new)
            agent.write_policy(new)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            time.sleep(rng.uniform(0.0, MAX_DELAY))
            agent.stop(signal.SIGKILL)
            wait_tools_done(ns)

            kernel = read_kernel(ns, backend)
            problems = reference_problems(kernel)
            assert not problems, f"seed {seed} round {round_}: {problems[:5]}"
            got = kernel_owned(kernel)
            generations = [expected_tables(doc, devices) for doc in (previous, new)]
            for key, chains in got.items():
                held = [k for k, gen in enumerate(generations) if gen.get(key) == chains]
                assert held, (f"seed {seed} round {round_}: {key} is neither generation: "
                              f"{_difference({key: chains}, {key: generations[1].get(key)})}")
                outcomes["new" if held[-1] == 1 else "old"] += 1
            assert set(got) == set(generations[1]), f"tables {set(got)}"

            agent.start()
            agent.resync()
            agent.resync()
            last = agent.request({"command": "status"})["last_apply"]
            assert last["lines_written"] == 0, f"seed {seed}: second resync wrote {last}"
            assert last["ipset_members_added"] == last["ipset_members_removed"] == 0, last
            converged = kernel_owned(read_kernel(ns, backend))
            assert converged == generations[1], (
                f"seed {seed} round {round_}: {_difference(converged, generations[1])}")
    finally:
        agent.stop()
        assert_root_clean()
    print(f"kill -9 outcomes (tables found old/new), seed {seed}: {dict(outcomes)}")
