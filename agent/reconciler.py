"""The writer's decisions as a pure state machine: events in, one action out.

Rules of this room:

1. No I/O, no threads, no clock of its own: every call gets `now`
   (monotonic seconds) from the caller, events are plain values, and the
   answer is an action value for `agent.daemon.Agent` to carry out. So the
   rules that keep the agent's work in proportion to the change are written
   down here once, and unit-tested without a kernel
   (tests/unit/test_reconciler.py).
2. The decision table:

   | event                     | kernel work it causes                         |
   | ------------------------- | --------------------------------------------- |
   | devices / policy changed  | one incremental apply (no read before it)     |
   | member-only change        | the same apply; it writes ipsets only         |
   | an apply that wrote       | a read-back of what it wrote, `CHECK_DELAY` on|
   |                           | (over `CHECK_MAX` chains: a stepwise re-read) |
   | read-back found drift     | an incremental apply that repairs it          |
   | resync (agent-ctl, timer) | a full re-read in small steps, then an apply  |
   | resync --wait             | the same, then a verifying re-read            |
   | failure (apply or step)   | retry with a doubling delay; forced rewrite   |
   |                           | after `FORCE_AFTER_FAILURES` in a row         |

3. Leading edge: a change is acted on as soon as the writer is free; what
   arrives while it works is gathered by the caller and handled in one go.
   A pending change always goes before the next step of a full re-read, so
   a refresh never holds a change back by more than one step.
4. Waiters (`resync --wait`) are answered after the verifying apply of the
   refresh they asked for; a waiter that comes before the first device dump
   waits for it, within the caller's own timeout.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

CHECK_DELAY = 1.0            # seconds after a write before it is read back
CHECK_MAX = 32               # chains + sets beyond which a stepwise full re-read is cheaper
FORCE_AFTER_FAILURES = 3     # failed applies in a row before every chain is rewritten
MAX_RETRY_DELAY = 30.0


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Apply:
    """Compile and apply incrementally; `verify` re-reads everything afterwards."""

    force: bool = False
    verify: bool = False


@dataclass(frozen=True)
class BeginRefresh:
    """Plan a full re-read (the caller answers with `refresh_planned(steps)`) and
    ask the policy source to re-read too when `source` is set (the periodic timer)."""

    source: bool = False


@dataclass(frozen=True)
class RefreshStep:
    """Re-read one part of the kernel (one table, or the ipsets)."""

    step: Hashable


@dataclass(frozen=True)
class Check:
    """Read back only what earlier writes touched."""

    touched: dict[tuple[int, str], frozenset[str]]
    sets: frozenset[str]


Action = Apply | BeginRefresh | RefreshStep | Check


# ---------------------------------------------------------------- state


@dataclass
class Reconciler:
    """What the writer owes the kernel and when; see the module docstring."""

    resync_interval: float
    now: float = 0.0
    devices_seen: bool = False
    dirty: bool = False                  # a change not yet applied
    failures: int = 0                    # failed applies or steps in a row
    retry_at: float | None = None        # no apply or step before this
    refresh_wanted: bool = False         # a full re-read to start
    refresh_source: bool = False         # ... and the source asked to re-read
    refresh_steps: list[Hashable] | None = None   # steps left of a running refresh
    verify_pending: bool = False         # the refresh ends in a verifying apply
    waiters: list[object] = field(default_factory=list)        # for the running refresh
    next_waiters: list[object] = field(default_factory=list)   # for the next one
    touched: dict[tuple[int, str], set[str]] = field(default_factory=dict)
    sets_touched: set[str] = field(default_factory=set)
    check_at: float | None = None
    resync_at: float = 0.0

    def __post_init__(self) -> None:
        self.resync_at = self.now + self.resync_interval

    # ------------------------------------------------------------ events

    def devices_changed(self) -> None:
        """The device list (and bridges) changed; a full dump counts the same."""
        self.devices_seen = True
        self.dirty = True

    def policy_changed(self) -> None:
        self.dirty = True

    def resync_asked(self, waiter: object | None = None) -> None:
        """`agent-ctl resync` (the source has re-read already): re-read the kernel."""
        self.refresh_wanted = True
        if waiter is not None:
            self.next_waiters.append(waiter)

    # ------------------------------------------------------------ the next action

    def next_action(self, now: float) -> Action | None:
        """What to do now, or None to sleep until `deadline()` or the next event."""
        self.now = now
        if now >= self.resync_at:
            self.resync_at = now + self.resync_interval
            self.refresh_wanted = self.refresh_source = True
        if not self.devices_seen or (self.retry_at is not None and now < self.retry_at):
            return None
        final = self.refresh_steps is not None and not self.refresh_steps
        if self.dirty or final:   # a refresh's last apply repairs, and verifies for waiters
            return Apply(force=self.failures >= FORCE_AFTER_FAILURES,
                         verify=final and bool(self.waiters))
        if self.check_at is not None and now >= self.check_at and \
                sum(map(len, self.touched.values())) + len(self.sets_touched) > CHECK_MAX:
            # A large write (a cold start, say): one table at a time beats a read per chain.
            self.touched, self.sets_touched, self.check_at = {}, set(), None
            self.refresh_wanted = True
        if self.refresh_steps is None and self.refresh_wanted:
            source, self.refresh_wanted, self.refresh_source = self.refresh_source, False, False
            self.waiters, self.next_waiters = self.next_waiters, []
            # The re-read covers every earlier write; later ones are read back anew.
            self.touched, self.sets_touched, self.check_at = {}, set(), None
            return BeginRefresh(source=source)
        if self.refresh_steps:
            return RefreshStep(self.refresh_steps[0])
        if self.check_at is not None and now >= self.check_at:
            return Check({k: frozenset(v) for k, v in self.touched.items()},
                         frozenset(self.sets_touched))
        return None

    def deadline(self) -> float:
        """The latest time the caller may sleep to (monotonic)."""
        times = [self.resync_at]
        if self.retry_at is not None:
            times.append(self.retry_at)
        if self.check_at is not None:
            times.append(self.check_at)
        return min(times)

    # ------------------------------------------------------------ results

    def refresh_planned(self, steps: list[Hashable]) -> None:
        self.refresh_steps = list(steps)

    def step_done(self) -> None:
        assert self.refresh_steps
        self.refresh_steps.pop(0)

    def applied(self, wrote: bool, touched: dict[tuple[int, str], set[str]],
                sets: set[str]) -> list[object]:
        """An apply succeeded; returns the waiters it answers (a refresh's last apply)."""
        self.dirty = False
        self.failures = 0
        self.retry_at = None
        done: list[object] = []
        if self.refresh_steps is not None and not self.refresh_steps:
            self.refresh_steps = None
            done, self.waiters = self.waiters, []
        if wrote:
            for key, chains in touched.items():
                self.touched.setdefault(key, set()).update(chains)
            self.sets_touched |= sets
            if self.touched or self.sets_touched:
                self.check_at = self.now + CHECK_DELAY
        return done

    def checked(self, drift: bool) -> None:
        """A read-back finished; drift makes the next action a repairing apply."""
        self.touched, self.sets_touched, self.check_at = {}, set(), None
        self.dirty = self.dirty or drift

    def failed(self, action: Action) -> list[object]:
        """`action` raised: back off, and keep what it was for pending.

        A failed apply stays dirty and is retried. A failed refresh step or
        read-back leaves the view in doubt, so a full re-read is asked for; a
        running refresh is abandoned and its waiters are answered now, with
        the failure. Returns those waiters.
        """
        self.failures += 1
        self.retry_at = self.now + min(MAX_RETRY_DELAY, 2.0 ** (self.failures - 1))
        if isinstance(action, Apply):
            self.dirty = True
        else:
            self.refresh_wanted = True
        if isinstance(action, Check):
            self.touched, self.sets_touched, self.check_at = {}, set(), None
        done: list[object] = []
        if self.refresh_steps is not None:
            self.refresh_steps = None
            self.refresh_wanted = True
            done, self.waiters = self.waiters, []
        return done
