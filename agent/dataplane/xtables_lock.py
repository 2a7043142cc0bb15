"""The xtables lock: the one lock every legacy iptables writer on the host honours.

Rules of this room: the iptables binaries (and iptables-restore, kube-proxy,
docker in legacy mode) serialise their read-modify-write of a table with
`flock(LOCK_EX)` on `/run/xtables.lock` (`XTABLES_LOCKFILE` overrides the
path, as it does for them). libiptc (python-iptables) never takes it, and a
libiptc commit replaces the whole table, so without this lock a concurrent
`iptables -A` between our read and our commit is silently reverted. It is a
file, shared by every network namespace on the host: hold it for the
read-modify-commit only, never while building rules, and give up after a
bounded wait rather than block the writer thread forever.

Every acquisition that finds the lock held by someone else counts one wait
(`waits()`, the `hostfw_xtables_lock_waits_total` metric), whether it then
gets the lock or gives up: a climbing count means another writer on the host
(kube-proxy, docker, an operator's iptables loop) is contending with ours. The
count is per process, like the lock is per host: every namespace the agent
manages shares both.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import threading
import time
from collections.abc import Iterator

from agent.dataplane.command import KernelWriteError

DEFAULT_PATH = "/run/xtables.lock"
POLL_INTERVAL = 0.01  # seconds between LOCK_NB attempts

_waits = 0
_waits_guard = threading.Lock()  # writers of several namespaces may wait at once


def waits() -> int:
    """Acquisitions in this process that found the lock busy and had to wait."""
    with _waits_guard:
        return _waits


def _count_wait() -> None:
    global _waits
    with _waits_guard:
        _waits += 1


def lock_path() -> str:
    """The path the iptables binaries of this host lock (same environment override)."""
    return os.environ.get("XTABLES_LOCKFILE") or DEFAULT_PATH


@contextlib.contextmanager
def xtables_lock(timeout: float = 5.0, path: str | None = None) -> Iterator[None]:
    """Hold the xtables lock for the body; raise KernelWriteError if it stays busy.

    Polls with LOCK_NB instead of blocking so the wait is bounded without
    signals (a blocking flock can only be interrupted by one, and the writer
    is not the main thread).
    """
    path = path or lock_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KernelWriteError(f"cannot open the xtables lock {path}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise KernelWriteError(f"cannot lock {path}: {exc}") from exc
            if attempt == 0:
                _count_wait()
            if time.monotonic() >= deadline:
                raise KernelWriteError(f"the xtables lock {path} stayed busy for {timeout:g} s "
                                       f"(another iptables writer holds it)")
            time.sleep(POLL_INTERVAL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
