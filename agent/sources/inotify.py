"""Linux inotify on one directory entry, through libc (ctypes, no dependency).

Rules of this room: the file watcher's fast path and nothing else. It
watches the *directory* and keeps the events that name the file, because an
atomic replace (write a temporary file, rename it over the old one) never
touches the old inode. Where inotify cannot be had (not Linux, the
per-user watch limit reached, a filesystem without events) `EntryWatch.open`
returns None and the watcher keeps polling, which it does anyway as a
safety net.
"""

from __future__ import annotations

import ctypes
import os
import struct

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
           | IN_DELETE)
HEADER = struct.Struct("iIII")   # wd, mask, cookie, len; then the name, NUL padded


class EntryWatch:
    """inotify events for one name in one directory; `read` never blocks."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = os.fsencode(name)

    @classmethod
    def open(cls, path: str) -> EntryWatch | None:
        """Watch `path`'s directory entry; None when inotify is not available."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        directory = os.path.dirname(os.path.abspath(path))
        if libc.inotify_add_watch(fd, os.fsencode(directory), WATCHED) < 0:
            os.close(fd)
            return None
        return cls(fd, os.path.basename(path))

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[int]:
        """Masks of the queued events that name the file, oldest first.

        A queue overflow is reported as IN_Q_OVERFLOW: events were lost, so
        the caller must not trust what the others say.
        """
        masks = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return masks
            offset = 0
            while offset + HEADER.size <= len(data):
                _, mask, _, length = HEADER.unpack_from(data, offset)
                name = data[offset + HEADER.size:offset + HEADER.size + length].rstrip(b"\0")
                offset += HEADER.size + length
                if mask & IN_Q_OVERFLOW or name == self.name:
                    masks.append(mask)

    def close(self) -> None:
        os.close(self.fd)
