"""Notice that the policy file changed, or that SIGHUP asked for a reload.

Rules of this room:

1. Leading edge: a change is loaded as soon as it is noticed and the file
   is known to be complete, not after a fixed delay. Changes that arrive
   while a reload runs are gathered into the next one (one more reload,
   however many writes there were).
2. Never load a file caught mid-write: the loader could see valid YAML with
   half the ports (a real outage). The file counts as complete when
   - inotify's last word on it is "closed after writing" or "renamed into
     place" (an atomic replace), or
   - nothing has touched it for `SETTLE` seconds: its identity held still
     that long while we watched, or its ctime is that old (every write
     moves ctime, and utimes cannot set it back).
   Until then the watcher waits, waking at once on the next event.
3. The file's identity (device, inode, size, mtime, ctime) is also polled
   every `[controller] watch_interval`: `os.stat` is cheap and covers what
   inotify misses (no inotify, a symlink swapped elsewhere, lost events).
4. The identity is taken before the file is read, so a write that lands
   during a reload is seen as a change and loaded next.
5. Every reload runs on this thread, so reloads never overlap; `request`
   (SIGHUP) only bumps a counter and writes a byte to a pipe (signal safe).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

from agent.sources.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_MODIFY,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    EntryWatch,
)

SETTLE = 0.05   # seconds a changed file must hold still when no event says it is complete
Identity = tuple[int, int, int, int, int] | None
DONE, BUSY = "done", "busy"   # what the last inotify event says of the file


def identity(path: str) -> Identity:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def event_state(state: str | None, masks: list[int]) -> str | None:
    """The file's state after these events: DONE, BUSY or None (not known)."""
    for mask in masks:
        if mask & IN_Q_OVERFLOW:
            state = None
        elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
            state = DONE
        elif mask & (IN_MODIFY | IN_CREATE):
            state = BUSY
        elif not mask & IN_ATTRIB:   # deleted or moved away; a chmod changes nothing
            state = None
    return state


class FileWatcher(threading.Thread):
    """Calls `reload(reason)` on this thread after a change or a `request`."""

    def __init__(self, path: str, interval: float, reload: Callable[[str], None]) -> None:
        super().__init__(name="watch", daemon=True)
        self.path = path
        self.interval = interval
        self._reload = reload
        self._notify = EntryWatch.open(path)   # before the first load, so no change is missed
        self._seen = identity(path)
        self._state: str | None = None
        self._reason = "SIGHUP"
        self._requests = 0   # bumped by request(); only this thread reads it
        self._answered = 0
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def uses_inotify(self) -> bool:
        return self._notify is not None

    def request(self, reason: str = "SIGHUP") -> None:
        """Reload soon even if the file looks unchanged (signal-handler safe)."""
        self._reason = reason
        self._requests += 1   # a counter, not a flag: a request can never be cleared unseen
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass   # already woken (pipe full), or the thread has ended

    def run(self) -> None:
        try:
            self._loop()
        finally:   # the write end stays open: a late request() must not hit a reused fd
            if self._notify is not None:
                self._notify.close()
            os.close(self._wake_r)

    def _loop(self) -> None:
        while not self._wait(self.interval):
            requests = self._requests
            asked, self._answered = requests != self._answered, requests
            now = identity(self.path)
            if not asked and now == self._seen:
                self._state = None   # events about what is loaded already say nothing new
                continue
            if now != self._seen:
                complete = self._complete(now)
                if complete is False:
                    return
                now = complete
            self._seen = now
            self._state = None   # the next change needs its own "complete" event
            self._reload(self._reason if asked else "file changed")

    def _complete(self, now: Identity) -> Identity | bool:
        """Wait until the file is complete (rule 2); its identity then, False when stopping."""
        still_since = time.monotonic()
        while True:
            self._absorb()
            if self._state == DONE or now is None:
                return now
            quiet = time.monotonic() - still_since
            if self._state != BUSY:   # a writer that has not closed the file may write more
                quiet = max(quiet, (time.time_ns() - now[4]) / 1e9)
            if quiet >= SETTLE:
                return now
            if self._wait(SETTLE - quiet):
                return False
            later = identity(self.path)
            if later != now:
                now, still_since = later, time.monotonic()

    def _wait(self, timeout: float) -> bool:
        """Sleep until an event, a request or `timeout`; True when stopping."""
        fds = [self._wake_r] + ([self._notify.fileno()] if self._notify else [])
        if not self._stopping:
            readable, _, _ = select.select(fds, [], [], max(timeout, 0.0))
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if len(readable) > (self._wake_r in readable):
                self._absorb()
        return self._stopping

    def _absorb(self) -> None:
        """Read the queued inotify events into `_state`."""
        if self._notify is not None:
            self._state = event_state(self._state, self._notify.read())
