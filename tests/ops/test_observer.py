"""agent/metrics.py without a kernel: the Observer's bookkeeping and its HTTP server.

A fake clock drives health and latency so the rules are checked exactly; the
end-to-end tests (test_metrics_e2e.py) check the same against the real agent.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import agent
from agent.compiler import Compiled
from agent.dataplane.command import KernelWriteError
from agent.dataplane.engine import ApplyReport
from agent.dataplane.xtables_lock import xtables_lock
from agent.metrics import Observer, parse_listen
from agent.vocab.rules import IptablesRule, jump
from agent.vocab.ruleset import IpSet, Ruleset, Table

RESYNC = 30.0


class FakeNotifier:
    """Records what would go to systemd."""

    def __init__(self, watchdog_period: float | None = None) -> None:
        self.watchdog_period = watchdog_period
        self.sent: list[list[str]] = []

    def notify(self, *lines: str) -> bool:
        self.sent.append(list(lines))
        return True

    def close(self) -> None:
        pass

    def lines(self) -> list[str]:
        return [line for message in self.sent for line in message]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(watchdog: float | None = None,
         source: dict[str, Any] | None = None) -> tuple[Observer, FakeNotifier, Clock]:
    notifier, clock = FakeNotifier(watchdog), Clock()
    observer = Observer(RESYNC, lambda: source or {}, notifier, clock)  # type: ignore[arg-type]
    return observer, notifier, clock


DROP = IptablesRule(jump("DROP"))


def compiled() -> Compiled:
    ruleset = Ruleset(
        tables={(4, "filter"): Table(4, "filter", {"hostfw-a": (DROP, IptablesRule(jump("ACCEPT"))),
                                                   "hostfw-b": (IptablesRule(jump("RETURN")),)}),
                (6, "filter"): Table(6, "filter", {"hostfw-a": (DROP,)})},
        ipsets={"hfw4gx": IpSet("hfw4gx", 4, frozenset({"10.0.0.1/32", "10.0.0.2/32"}))})
    return Compiled(ruleset, active_ports=("p1", "p2"))


def report(**kw: Any) -> ApplyReport:
    return ApplyReport(**{"in_sync": True, "seconds": 0.02, **kw})


def samples(observer: Observer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(observer.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(observer: Observer, name: str, **labels: str) -> float:
    return samples(observer)[(name, tuple(sorted(labels.items())))]


def test_ready_once_the_first_apply_completed_and_ready_sent_once() -> None:
    observer, notifier, _ = make()
    assert observer.readiness()[0] is False
    observer.apply_failed("iptables-restore exited 1")
    assert observer.readiness()[0] is False
    assert "READY=1" not in notifier.lines()
    observer.applied(report(), compiled(), 1)
    observer.applied(report(), compiled(), 2)
    ready, doc = observer.readiness()
    assert ready and doc == {"ready": True, "generation": 2, "in_sync": True}
    assert notifier.lines().count("READY=1") == 1
    assert "STATUS=generation 2: 2 active ports, in sync" in notifier.lines()


def test_kept_rules_while_waiting_for_a_policy_is_not_ready_but_healthy() -> None:
    observer, notifier, clock = make()
    observer.event_queued("devices")
    observer.events_taken(["devices"])
    observer.waiting_for_policy()
    clock.now += 3 * RESYNC
    observer.loop_alive()
    assert observer.readiness()[0] is False
    assert observer.health()[0] is True
    assert any(line.startswith("STATUS=waiting for the first policy")
               for line in notifier.lines())


def test_unhealthy_when_a_change_waits_longer_than_twice_the_resync_interval() -> None:
    observer, _, clock = make()
    observer.loop_alive()
    observer.event_queued("policy")
    clock.now += 2 * RESYNC - 1
    observer.loop_alive()
    assert observer.health()[0] is True
    clock.now += 2
    observer.loop_alive()
    healthy, doc = observer.health()
    assert not healthy and doc["pendingChanges"] == 1
    assert "a change has waited" in doc["problems"][0]
    observer.events_taken(["policy"])      # taken but the apply fails: still pending
    observer.apply_failed("boom")
    assert observer.health()[0] is False
    observer.applied(report(), compiled(), 1)
    healthy, doc = observer.health()
    assert healthy and doc["pendingChanges"] == 0


def test_an_idle_agent_is_healthy_but_a_loop_that_stopped_turning_is_not() -> None:
    observer, _, clock = make()
    observer.loop_alive()
    clock.now += 2 * RESYNC - 1
    assert observer.health()[0] is True
    clock.now += 2
    healthy, doc = observer.health()
    assert not healthy and "has not turned" in doc["problems"][0]


def test_a_change_queued_during_an_apply_stays_pending() -> None:
    observer, _, clock = make()
    observer.event_queued("devices")
    observer.events_taken(["devices", "call"])  # a call event is not a change
    observer.event_queued("policy")           # arrives while the writer applies
    clock.now += 0.5
    observer.applied(report(), compiled(), 1)
    assert observer.health()[1]["pendingChanges"] == 1
    assert value(observer, "hostfw_network_programming_duration_seconds_count",
                 kind="devices") == 1
    assert value(observer, "hostfw_network_programming_duration_seconds_count",
                 kind="policy") == 0


def test_event_to_kernel_latency_is_measured_from_the_queueing() -> None:
    observer, _, clock = make()
    observer.event_queued("resync")
    clock.now += 0.3
    observer.events_taken(["resync"])
    clock.now += 0.4
    observer.applied(report(), compiled(), 1)
    assert value(observer, "hostfw_network_programming_duration_seconds_sum",
                 kind="resync") == pytest.approx(0.7)
    assert value(observer, "hostfw_network_programming_duration_seconds_bucket",
                 kind="resync", le="0.5") == 0
    assert value(observer, "hostfw_network_programming_duration_seconds_bucket",
                 kind="resync", le="1.0") == 1
    assert value(observer, "hostfw_events_total", kind="resync") == 1


def test_full_and_partial_applies_have_their_own_histograms() -> None:
    observer, _, _ = make()
    observer.applied(report(refreshed=True, seconds=1.5), compiled(), 1)
    observer.applied(report(seconds=0.01), compiled(), 2)
    observer.applied(report(seconds=0.02), compiled(), 3)
    assert value(observer, "hostfw_apply_duration_seconds_count", kind="full") == 1
    assert value(observer, "hostfw_apply_duration_seconds_count", kind="partial") == 2
    assert value(observer, "hostfw_apply_duration_seconds_sum", kind="full") == 1.5


def test_owned_and_written_counts_follow_the_last_apply() -> None:
    observer, _, _ = make()
    observer.applied(report(chains_written=3, lines_written=9, ipset_members_added=2,
                            drift_repaired=True, refreshed=True), compiled(), 1)
    observer.applied(report(), compiled(), 2)
    assert value(observer, "hostfw_rules", ip_version="4", table="filter") == 3
    assert value(observer, "hostfw_chains", ip_version="4", table="filter") == 2
    assert value(observer, "hostfw_rules", ip_version="6", table="filter") == 1
    assert value(observer, "hostfw_ipset_members", ip_version="4") == 2
    assert value(observer, "hostfw_ipsets", ip_version="6") == 0
    assert value(observer, "hostfw_last_apply_chains_written") == 0
    assert value(observer, "hostfw_chains_written_total") == 3
    assert value(observer, "hostfw_restore_lines_written_total") == 9
    assert value(observer, "hostfw_ipset_member_changes_total", op="add") == 2
    assert value(observer, "hostfw_drift_repairs_total") == 1
    assert value(observer, "hostfw_generation") == 2
    assert value(observer, "hostfw_ports_active") == 2
    assert value(observer, "hostfw_in_sync") == 1
    assert value(observer, "hostfw_last_apply_success_timestamp_seconds") > 0


def test_source_state_is_read_at_scrape_time() -> None:
    observer, _, _ = make(source={"connected": False, "rpc_errors": 4, "error": "timeout"})
    assert value(observer, "hostfw_rpc_connected") == 0
    assert value(observer, "hostfw_rpc_errors_total") == 4
    assert value(observer, "hostfw_source_error") == 1
    standalone, _, _ = make(source={"policy_file": "/p", "error": None})
    names = {name for name, _ in samples(standalone)}
    assert "hostfw_source_error" in names and "hostfw_rpc_connected" not in names


def test_kernel_calls_and_their_errors_are_counted() -> None:
    observer, _, _ = make()

    class Backend:
        mode = "iptc"

        def save(self, family: int, table: str | None = None) -> str:
            return "# saved"

        def commit(self, plan: Any) -> None:
            raise KernelWriteError("iptables-restore exited 1")

    class Plan:
        family = 6

    backend = observer.counted(Backend())
    assert backend.save(4) == "# saved"
    with pytest.raises(KernelWriteError):
        backend.commit(Plan())  # type: ignore[arg-type]
    assert backend.mode == "iptc"  # other attributes reach the real backend
    assert value(observer, "hostfw_kernel_reads_total", tool="iptables") == 1
    assert value(observer, "hostfw_kernel_writes_total", tool="ip6tables") == 1
    assert value(observer, "hostfw_kernel_write_errors_total", tool="ip6tables") == 1
    assert value(observer, "hostfw_kernel_write_errors_total", tool="ipset") == 0
    observer.counted_ipsets().restore([])  # nothing to do: no kernel call, nothing counted
    assert value(observer, "hostfw_kernel_writes_total", tool="ipset") == 0


def test_watchdog_pings_from_the_loop_at_most_every_quarter_interval() -> None:
    observer, notifier, clock = make(watchdog=1.0)  # WatchdogSec=2: ping every 1 s
    observer.loop_alive()
    assert observer.watchdog_deadline() == clock.now + 1.0
    clock.now += 0.3
    observer.loop_alive()       # too soon after the last ping
    clock.now += 0.3
    observer.loop_alive()
    pings = notifier.lines().count("WATCHDOG=1")
    assert pings == 2
    assert observer.watchdog_deadline() == clock.now + 1.0


def test_no_watchdog_no_pings_and_no_extra_wakeups() -> None:
    observer, notifier, _ = make(watchdog=None)
    observer.loop_alive()
    assert "WATCHDOG=1" not in notifier.lines()
    assert observer.watchdog_deadline() == float("inf")


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9191", ("127.0.0.1", 9191)),
    ("[::1]:9191", ("::1", 9191)),
    (":9191", ("", 9191)),
])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["9191", "host:", "host:99999", "::1:9191", "h:p"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


@pytest.fixture
def served() -> Iterator[tuple[Observer, FakeNotifier, str]]:
    observer, notifier, _ = make()
    host, port = observer.serve("127.0.0.1:0")
    try:
        yield observer, notifier, f"http://{host}:{port}"
    finally:
        observer.stop()


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read(), reply.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def test_http_endpoints(served) -> None:
    observer, notifier, base = served
    code, body, ctype = get(base + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    assert b"hostfw_ready 0.0" in body and b"process_cpu_seconds_total" in body
    code, body, _ = get(base + "/readyz")
    assert code == 503 and json.loads(body)["ready"] is False
    code, body, _ = get(base + "/healthz")
    assert code == 200 and json.loads(body)["healthy"] is True
    observer.applied(report(), compiled(), 1)
    assert get(base + "/readyz")[0] == 200
    assert get(base + "/nope")[0] == 404
    observer.stop()
    assert notifier.sent[-1][0] == "STOPPING=1"


def test_openmetrics_when_asked(served) -> None:
    _, _, base = served
    request = urllib.request.Request(base + "/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        assert reply.read().rstrip().endswith(b"# EOF")


def test_build_info_names_the_version_and_python() -> None:
    observer, _, _ = make()
    assert value(observer, "hostfw_build_info", version=agent.version(),
                 python=platform.python_version()) == 1
    assert agent.version() != agent.FALLBACK_VERSION    # the venv's install came from git


def test_xtables_lock_waits_count_each_wait_for_another_writer(tmp_path: Path) -> None:
    observer, _, _ = make()
    lock = str(tmp_path / "xtables.lock")
    before = value(observer, "hostfw_xtables_lock_waits_total")
    with xtables_lock(path=lock):                       # free: no wait
        pass
    assert value(observer, "hostfw_xtables_lock_waits_total") == before

    other = os.open(lock, os.O_RDONLY)                  # another writer, as iptables takes it
    fcntl.flock(other, fcntl.LOCK_EX)
    got = threading.Event()

    def writer() -> None:
        with xtables_lock(timeout=30, path=lock):
            got.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while value(observer, "hostfw_xtables_lock_waits_total") == before:
        assert time.monotonic() < deadline, "the waiting writer was never counted"
        time.sleep(0.01)
    assert not got.is_set()                             # it is waiting, counted once
    os.close(other)                                     # the other writer lets go
    thread.join(10)
    assert got.is_set()
    assert value(observer, "hostfw_xtables_lock_waits_total") == before + 1

    other = os.open(lock, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(KernelWriteError, match="stayed busy"), \
                xtables_lock(timeout=0.05, path=lock):
            pass
    finally:
        os.close(other)
    assert value(observer, "hostfw_xtables_lock_waits_total") == before + 2  # gave up: counted


def test_a_dead_bridge_hook_makes_the_agent_not_ready_with_the_reason() -> None:
    """Issue 14.8: with bridge-nf-call-iptables at 0 the agent said ready."""
    observer, _, _ = make()
    observer.applied(report(), compiled(), 1)
    problem = "net.bridge.bridge-nf-call-iptables is 0 in the managed namespace"
    observer.bridge_nf_checked({4: False, 6: True}, [problem])
    ready, doc = observer.readiness()
    assert not ready and not observer.ready and doc["problems"] == [problem]
    assert value(observer, "hostfw_ready") == 0
    assert value(observer, "hostfw_bridge_nf_call_ok", ip_version="4") == 0
    assert value(observer, "hostfw_bridge_nf_call_ok", ip_version="6") == 1
    observer.bridge_nf_checked({4: True, 6: True}, [])
    assert observer.readiness() == (True, {"ready": True, "generation": 1, "in_sync": True})
    assert value(observer, "hostfw_ready") == 1


def test_foreign_rules_ahead_of_a_hook_are_a_gauge_per_chain() -> None:
    """Issue 14.10b: a foreign ACCEPT ahead of our FORWARD hook was invisible."""
    observer, _, _ = make()
    observer.foreign_rules_ahead({(4, "filter", "FORWARD"): 1})
    assert value(observer, "hostfw_foreign_rules_ahead_of_hook", ip_version="4",
                 table="filter", chain="FORWARD") == 1
    observer.foreign_rules_ahead({})
    assert ("hostfw_foreign_rules_ahead_of_hook", (("chain", "FORWARD"), ("ip_version", "4"),
                                                   ("table", "filter"))) not in samples(observer)
