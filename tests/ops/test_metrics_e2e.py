"""/metrics, /healthz and /readyz scraped over HTTP from the real hostfw-agent.

The agent manages a sandbox node through `[agent] netns`, while its HTTP
listener stays on the root namespace's loopback (the main thread's namespace).
Drift is made the way an operator or another tool would make it: by flushing
an owned chain with iptables inside the node namespace.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ops.helpers import HeldLock, free_port, http_get, metric, policy, scrape
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import Topology

pytestmark = pytest.mark.kernel

EXPECTED = {
    "hostfw_apply_duration_seconds", "hostfw_apply_failures", "hostfw_events",
    "hostfw_network_programming_duration_seconds", "hostfw_kernel_writes",
    "hostfw_kernel_write_errors", "hostfw_kernel_reads", "hostfw_kernel_read_errors",
    "hostfw_chains_written", "hostfw_restore_lines_written", "hostfw_ipset_member_changes",
    "hostfw_drift_repairs", "hostfw_last_apply_success_timestamp_seconds",
    "hostfw_last_queued_change_timestamp_seconds", "hostfw_ready", "hostfw_in_sync",
    "hostfw_generation", "hostfw_ports_active", "hostfw_pending_changes",
    "hostfw_oldest_pending_change_seconds", "hostfw_last_apply_chains_written",
    "hostfw_last_apply_lines_written", "hostfw_rules", "hostfw_chains", "hostfw_ipsets",
    "hostfw_ipset_members", "hostfw_xtables_lock_waits", "hostfw_source_error",
    "hostfw_writer_errors", "hostfw_build_info",
    "process_cpu_seconds",
}


@dataclass
class Served:
    topology: Topology
    agent: AgentProcess
    base: str
    lock: HeldLock


def make_served(topology: Topology, tmp_path: Path, resync_interval: int = 30) -> Served:
    vms = [topology.add_vm("a"), topology.add_vm("b")]
    port = free_port()
    agent = AgentProcess(tmp_path / "agent", topology.node.ns, policy(*vms),
                         resync_interval=resync_interval,
                         extra_conf=f"[metrics]\nlisten = 127.0.0.1:{port}\n")
    return Served(topology, agent, f"http://127.0.0.1:{port}", HeldLock(tmp_path / "xt.lock"))


@pytest.fixture
def served(topology: Topology, tmp_path: Path) -> Iterator[Served]:
    s = make_served(topology, tmp_path)
    try:
        s.agent.start(env={"XTABLES_LOCKFILE": s.lock.path})
        yield s
    finally:
        s.lock.release()
        s.agent.stop()
        assert_root_clean()


def family_names(base: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name for f in text_string_to_metric_families(http_get(base + "/metrics")[1])}


def test_every_metric_is_exported(served: Served) -> None:
    missing = EXPECTED - family_names(served.base)
    assert not missing, missing


def test_an_apply_moves_the_counters(served: Served) -> None:
    agent, base = served.agent, served.base
    agent.resync()   # the start's own re-read is over
    before = scrape(base)
    assert metric(before, "hostfw_ready") == 1
    assert metric(before, "hostfw_generation") == agent.status()["generation"]
    assert metric(before, "hostfw_ports_active") == 2
    assert metric(before, "hostfw_rules", ip_version="4", table="filter") > 0
    assert metric(before, "hostfw_ipset_members", ip_version="4") == 2  # sg-ops members

    vms = list(served.topology.vms.values())
    generation = agent.status()["generation"]
    agent.write_policy(policy(*vms, open_port=80))     # the agent notices the file itself
    agent.wait_for(lambda: agent.status()["generation"] > generation, what="the change")
    changed = scrape(base)
    assert metric(changed, "hostfw_last_apply_chains_written") > 0
    assert metric(changed, "hostfw_apply_duration_seconds_count", kind="full") == \
        metric(before, "hostfw_apply_duration_seconds_count", kind="full"), \
        "a policy change must not re-read the kernel"
    agent.resync()                                       # a full re-read, then an apply
    after = scrape(base)

    def grew(name: str, **labels: str) -> bool:
        return metric(after, name, **labels) > metric(before, name, **labels)

    assert grew("hostfw_kernel_writes_total", tool="iptables")
    assert grew("hostfw_kernel_reads_total", tool="iptables")
    assert grew("hostfw_apply_duration_seconds_count", kind="full")
    assert grew("hostfw_events_total", kind="resync")
    assert grew("hostfw_events_total", kind="policy")
    assert grew("hostfw_network_programming_duration_seconds_count", kind="resync")
    assert grew("hostfw_network_programming_duration_seconds_count", kind="policy")
    assert grew("hostfw_chains_written_total")
    assert grew("hostfw_last_apply_success_timestamp_seconds")
    assert metric(after, "hostfw_kernel_write_errors_total", tool="iptables") == 0
    assert metric(after, "hostfw_writer_errors_total", kind="internal") == 0
    assert metric(after, "hostfw_pending_changes") == 0
    assert metric(after, "hostfw_network_programming_duration_seconds_count",
                  kind="devices") >= 1


def test_drift_repair_is_counted(served: Served) -> None:
    agent, base = served.agent, served.base
    chain = next(line.split()[1] for line in agent.save().splitlines()
                 if line.startswith("-A hostfw-") and "hostfw-sg" not in line.split()[1])
    before = metric(scrape(base), "hostfw_drift_repairs_total")
    served.topology.node.run(["iptables-legacy", "-F", chain])
    agent.resync()
    assert metric(scrape(base), "hostfw_drift_repairs_total") == before + 1
    assert f"-A {chain} " in agent.save()


def test_readyz_and_healthz_follow_the_writer(topology: Topology, tmp_path: Path) -> None:
    """Held xtables lock: the first apply blocks in its kernel write. Not ready;
    healthy until the queued changes are older than 2 x resync_interval (2 s);
    both recover once the lock is released. An idle agent stays healthy."""
    s = make_served(topology, tmp_path, resync_interval=1)
    try:
        s.lock.acquire()
        s.agent.start(wait=False, env={"XTABLES_LOCKFILE": s.lock.path})
        code, body = s.agent.wait_for(lambda: _answer(s.base + "/readyz"), what="/readyz")
        assert code == 503 and json.loads(body)["ready"] is False
        assert http_get(s.base + "/healthz")[0] == 200
        time.sleep(2.5)
        code, body = http_get(s.base + "/healthz")
        assert code == 503, body
        assert any("a change has waited" in p for p in json.loads(body)["problems"])
        assert metric(scrape(s.base), "hostfw_pending_changes") >= 1
        s.lock.release()
        s.agent.wait_for(lambda: http_get(s.base + "/readyz")[0] == 200, timeout=15,
                         what="/readyz 200")
        s.agent.wait_for(lambda: http_get(s.base + "/healthz")[0] == 200, what="/healthz")
        time.sleep(3.0)                      # idle for longer than the health timeout
        code, body = http_get(s.base + "/healthz")
        assert code == 200, body
        assert http_get(s.base + "/nope")[0] == 404
    finally:
        s.lock.release()
        s.agent.stop()
        assert_root_clean()


def _answer(url: str) -> tuple[int, str] | None:
    try:
        return http_get(url)
    except OSError:  # not listening yet
        return None
