"""Notice that the policy file changed, or that SIGHUP asked for a reload.

Rules of this room: one thread polls the file's identity (device, inode,
size, mtime, ctime) every `[controller] watch_interval`; `os.stat` is cheap,
needs no inotify, and sees both in-place writes and the rename of an
atomically written file. After a change it waits until the identity holds
still for `SETTLE` seconds, so a file caught mid-write is not loaded half
(the loader could see valid YAML with half the ports: a real outage). Every
reload runs on this thread, so reloads never overlap and SIGHUP's handler
only sets a flag.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

SETTLE = 0.05   # seconds a changed file must hold still before it is read
Identity = tuple[int, int, int, int, int] | None


def identity(path: str) -> Identity:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileWatcher(threading.Thread):
    """Calls `reload(reason)` on this thread after a change or a `request`."""

    def __init__(self, path: str, interval: float, reload: Callable[[str], None]) -> None:
        super().__init__(name="watch", daemon=True)
        self.path = path
        self.interval = interval
        self._reload = reload
        self._seen = identity(path)   # taken before the first load, so no change is missed
        self._reason = "SIGHUP"
        self._asked = threading.Event()
        self._stopping = threading.Event()

    def request(self, reason: str = "SIGHUP") -> None:
        """Reload soon even if the file looks unchanged (signal-handler safe)."""
        self._reason = reason
        self._asked.set()

    def stop(self) -> None:
        self._stopping.set()
        self._asked.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            asked = self._asked.wait(self.interval)
            if self._stopping.is_set():
                return
            self._asked.clear()
            now = identity(self.path)
            if not asked and now == self._seen:
                continue
            while now != self._seen:   # let a writer finish
                self._seen = now
                if self._stopping.wait(SETTLE):
                    return
                now = identity(self.path)
            self._reload(self._reason if asked else "file changed")
