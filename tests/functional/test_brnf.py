"""The bridge netfilter hook check in a real namespace (issue 14.8).

The node namespace of a Topology has br_netfilter's sysctls, which are per
namespace; the check runs in a thread that entered it, as the writer does,
and must see that namespace's values, never the root namespace's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.dataplane import brnf
from tests.functional.test_flowcut import in_ns
from tests.support.topology import Topology

pytestmark = pytest.mark.kernel

ROOT_VALUE = Path(brnf.ROOT, brnf.SYSCTLS[4])


def sysctl(topo: Topology, name: str) -> str:
    return topo.node.run(["sysctl", "-n", f"net.bridge.{name}"]).stdout.strip()


def test_a_dead_hook_is_reported_and_set_only_when_managed(topology: Topology) -> None:
    if not ROOT_VALUE.exists():
        pytest.skip("br_netfilter is not loaded")
    root_before = ROOT_VALUE.read_text()
    topology.node.run(["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0"])

    seen = in_ns(topology.node.ns, lambda: brnf.check((4, 6)))
    assert seen.values == {4: 0, 6: 1} and seen.ok == {4: False, 6: True}
    assert len(seen.problems) == 1 and "bridge-nf-call-iptables is 0" in seen.problems[0]
    assert sysctl(topology, "bridge-nf-call-iptables") == "0"  # not managed: left alone

    fixed = in_ns(topology.node.ns, lambda: brnf.check((4, 6), manage=True))
    assert fixed.problems == () and fixed.values == {4: 1, 6: 1}
    assert fixed.changed == ("net.bridge.bridge-nf-call-iptables",)
    assert sysctl(topology, "bridge-nf-call-iptables") == "1"
    assert ROOT_VALUE.read_text() == root_before


def test_a_missing_sysctl_is_a_problem_too(tmp_path: Path) -> None:
    """Without br_netfilter the files do not exist: as dead as 0."""
    (tmp_path / brnf.SYSCTLS[6]).write_text("1\n")
    seen = brnf.check((4, 6), manage=True, root=str(tmp_path))
    assert seen.values == {4: None, 6: 1}
    assert len(seen.problems) == 1 and "br_netfilter is not loaded" in seen.problems[0]
