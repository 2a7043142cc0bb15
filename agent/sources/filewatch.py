"""Notice at once that a file was written whole, through inotify (stat polling as a net).

Rules of this room:

1. Leading edge without half-read files: the watch is on the file's
   directory, for `IN_CLOSE_WRITE` (a writer closed the file) and
   `IN_MOVED_TO` (an atomic rename put a complete file in place). Neither
   fires mid-write, so the reload runs the moment the file is whole, with
   no settle time.
2. A slow `os.stat` poll (`poll_interval`) backs inotify up: it catches
   what inotify cannot see (a file on a network filesystem, a bind mount
   replaced) and runs alone where inotify is unavailable. A change seen by
   stat alone is loaded once it held still between two looks.
3. Every reload runs on this one thread, so reloads never overlap and the
   newest read always wins; `request` (SIGHUP, resync) is signal-safe.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
from collections.abc import Callable

LOG = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
EVENT_HEADER = struct.Struct("iIII")   # wd, mask, cookie, len
Identity = tuple[int, int, int, int, int] | None


def identity(path: str) -> Identity:
    """What changes when the file's content or inode changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Inotify:
    """The three inotify calls we need, through libc; raises OSError if unavailable."""

    def __init__(self, directory: str) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory} failed")

    def names(self) -> list[tuple[int, str]]:
        """(mask, name) of every queued event."""
        out = []
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return out
        offset = 0
        while offset + EVENT_HEADER.size <= len(data):
            _, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
            offset += EVENT_HEADER.size
            name = data[offset:offset + length].split(b"\0", 1)[0]
            offset += length
            out.append((mask, os.fsdecode(name)))
        return out

    def close(self) -> None:
        os.close(self.fd)


class FileWatch(threading.Thread):
    """Calls `reload(reason)` on this thread when `path` was rewritten, or on `request`."""

    def __init__(self, path: str, reload: Callable[[str], None],
                 poll_interval: float = 1.0) -> None:
        super().__init__(name="policy-watch", daemon=True)
        self.path = os.path.abspath(path)
        self.poll_interval = poll_interval
        self._reload = reload
        self._seen = identity(self.path)   # taken before the first load: nothing is missed
        self._candidate = self._seen       # a stat-only change waits to hold still
        self._asked: str | None = None
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        try:
            self._inotify: _Inotify | None = _Inotify(os.path.dirname(self.path))
        except OSError as exc:
            LOG.warning("no inotify for %s (%s); polling every %.1f s", self.path, exc,
                        poll_interval)
            self._inotify = None

    def request(self, reason: str) -> None:
        """Reload soon even if the file looks unchanged (signal-handler safe)."""
        self._asked = reason
        os.write(self._wake_w, b"x")

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"x")

    def run(self) -> None:
        fds = [self._wake_r] + ([self._inotify.fd] if self._inotify else [])
        name = os.path.basename(self.path)
        try:
            while not self._stopping.is_set():
                ready, _, _ = select.select(fds, [], [], self.poll_interval)
                if self._stopping.is_set():
                    return
                reason = None
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    reason, self._asked = self._asked, None
                if self._inotify and self._inotify.fd in ready:
                    if any(n == name and mask & (IN_CLOSE_WRITE | IN_MOVED_TO)
                           for mask, n in self._inotify.names()):
                        reason = reason or "file changed"
                now = identity(self.path)
                if reason is None and now != self._seen:
                    # Seen by stat alone: reload once it held still between two looks.
                    if now == self._candidate:
                        reason = "file changed (stat)"
                    self._candidate = now
                if reason is not None:
                    self._seen = self._candidate = now
                    self._reload(reason)
        finally:
            if self._inotify:
                self._inotify.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
