"""The writer's decision table (agent/reconciler.py), without a kernel.

These are the rules that keep the agent's work in proportion to the change:
a change is one incremental apply with no kernel read before it, a full
re-read happens only on resync or the timer and never ahead of a queued
change, and what was written is read back alone.
"""

from __future__ import annotations

from agent.reconciler import (
    CHECK_DELAY,
    CHECK_MAX,
    FORCE_AFTER_FAILURES,
    Apply,
    BeginRefresh,
    Check,
    Reconciler,
    RefreshStep,
)

T0 = 1000.0


def ready(interval: float = 30.0) -> Reconciler:
    rec = Reconciler(interval, now=T0)
    rec.devices_changed()
    assert rec.next_action(T0) == Apply()
    rec.applied(False, {}, set())
    return rec


def test_nothing_before_the_first_device_dump() -> None:
    rec = Reconciler(30.0, now=T0)
    rec.policy_changed()
    rec.resync_asked("waiter")
    assert rec.next_action(T0) is None
    rec.devices_changed()
    assert rec.next_action(T0) == Apply()


def test_a_change_is_one_apply_with_no_kernel_read() -> None:
    rec = ready()
    for event in (rec.policy_changed, rec.devices_changed):
        event()
        assert rec.next_action(T0 + 1) == Apply(force=False, verify=False)
        rec.applied(False, {}, set())
        assert rec.next_action(T0 + 1) is None


def test_a_member_update_never_reads_the_kernel() -> None:
    """A members-only change writes one ipset; only that set is read back."""
    rec = ready()
    rec.policy_changed()
    assert rec.next_action(T0) == Apply()
    rec.applied(True, {}, {"hfw4abc"})
    assert rec.next_action(T0 + CHECK_DELAY / 2) is None
    action = rec.next_action(T0 + CHECK_DELAY)
    assert action == Check({}, frozenset({"hfw4abc"}))
    rec.checked(drift=False)
    assert rec.next_action(T0 + 2 * CHECK_DELAY) is None


def test_read_back_covers_what_every_write_touched_and_drift_repairs() -> None:
    rec = ready()
    rec.policy_changed()
    rec.next_action(T0)
    rec.applied(True, {(4, "filter"): {"hostfw-sg-a"}}, set())
    rec.policy_changed()
    rec.next_action(T0 + 0.5)
    rec.applied(True, {(4, "filter"): {"hostfw-sg-b"}, (6, "filter"): {"hostfw-sg-b"}}, set())
    action = rec.next_action(T0 + 0.5 + CHECK_DELAY)
    assert action == Check({(4, "filter"): frozenset({"hostfw-sg-a", "hostfw-sg-b"}),
                            (6, "filter"): frozenset({"hostfw-sg-b"})}, frozenset())
    rec.checked(drift=True)
    assert rec.next_action(T0 + 2) == Apply()


def test_a_large_write_is_read_back_table_by_table() -> None:
    rec = ready()
    rec.policy_changed()
    rec.next_action(T0)
    rec.applied(True, {(4, "filter"): {f"c{i}" for i in range(CHECK_MAX + 1)}}, set())
    assert rec.next_action(T0 + CHECK_DELAY) == BeginRefresh(source=False)
    assert rec.check_at is None


def test_an_apply_that_wrote_nothing_schedules_no_read() -> None:
    rec = ready()
    rec.policy_changed()
    rec.next_action(T0)
    rec.applied(False, {}, set())
    assert rec.check_at is None
    assert rec.next_action(T0 + 10) is None


def test_resync_is_a_stepwise_reread_then_a_verifying_apply() -> None:
    rec = ready()
    rec.resync_asked("w")
    assert rec.next_action(T0) == BeginRefresh(source=False)
    rec.refresh_planned([(4, "filter"), (6, "filter"), None])
    assert rec.next_action(T0) == RefreshStep((4, "filter"))
    rec.step_done()
    assert rec.next_action(T0) == RefreshStep((6, "filter"))
    rec.step_done()
    assert rec.next_action(T0) == RefreshStep(None)
    rec.step_done()
    assert rec.next_action(T0) == Apply(verify=True)
    assert rec.applied(False, {}, set()) == ["w"]
    assert rec.next_action(T0) is None


def test_a_refresh_replaces_the_pending_read_back() -> None:
    rec = ready()
    rec.policy_changed()
    rec.next_action(T0)
    rec.applied(True, {(4, "filter"): {"c"}}, set())
    rec.resync_asked()
    assert rec.next_action(T0) == BeginRefresh()
    rec.refresh_planned([None])
    rec.next_action(T0)
    rec.step_done()
    rec.next_action(T0)
    rec.applied(False, {}, set())
    assert rec.next_action(T0 + 2 * CHECK_DELAY) is None


def test_a_resync_without_waiters_does_not_verify() -> None:
    rec = ready()
    rec.resync_asked()
    rec.next_action(T0)
    rec.refresh_planned([None])
    rec.next_action(T0)
    rec.step_done()
    assert rec.next_action(T0) == Apply(verify=False)


def test_a_queued_change_goes_before_the_next_refresh_step() -> None:
    rec = ready()
    rec.resync_asked("w")
    rec.next_action(T0)
    rec.refresh_planned([(4, "filter"), (6, "filter"), None])
    rec.next_action(T0)
    rec.step_done()
    rec.policy_changed()
    assert rec.next_action(T0) == Apply(verify=False)
    assert rec.applied(True, {}, set()) == []   # the refresh is not over
    assert rec.next_action(T0) == RefreshStep((6, "filter"))


def test_the_timer_refreshes_and_asks_the_source() -> None:
    rec = ready(interval=30.0)
    assert rec.next_action(T0 + 29) is None
    assert rec.deadline() == T0 + 30
    assert rec.next_action(T0 + 30) == BeginRefresh(source=True)


def test_a_waiter_during_a_refresh_waits_for_the_next_one() -> None:
    rec = ready()
    rec.resync_asked("first")
    rec.next_action(T0)
    rec.refresh_planned([None])
    rec.resync_asked("second")
    rec.next_action(T0)
    rec.step_done()
    assert rec.applied(False, {}, set()) == ["first"]
    assert rec.next_action(T0) == BeginRefresh()
    rec.refresh_planned([None])
    rec.next_action(T0)
    rec.step_done()
    assert rec.next_action(T0) == Apply(verify=True)
    assert rec.applied(False, {}, set()) == ["second"]


def test_failed_applies_back_off_then_force() -> None:
    rec = ready()
    rec.policy_changed()
    now = T0
    for _ in range(FORCE_AFTER_FAILURES):
        action = rec.next_action(now)
        assert action == Apply(force=False)
        rec.failed(action)
        assert rec.next_action(now) is None, "no retry before the backoff"
        now = rec.deadline()
    assert rec.next_action(now) == Apply(force=True)
    rec.applied(True, {}, set())
    assert rec.failures == 0


def test_a_failed_refresh_step_answers_its_waiters_and_retries() -> None:
    rec = ready()
    rec.resync_asked("w")
    rec.next_action(T0)
    rec.refresh_planned([(4, "filter"), None])
    action = rec.next_action(T0)
    assert rec.failed(action) == ["w"]
    assert rec.next_action(T0) is None
    assert rec.next_action(rec.deadline()) == BeginRefresh()


def test_a_failed_read_back_asks_for_a_full_reread() -> None:
    rec = ready()
    rec.policy_changed()
    rec.next_action(T0)
    rec.applied(True, {(4, "filter"): {"c"}}, set())
    action = rec.next_action(T0 + CHECK_DELAY)
    assert isinstance(action, Check)
    rec.failed(action)
    assert rec.next_action(rec.deadline()) == BeginRefresh()
