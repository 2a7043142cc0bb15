"""Enter a named network namespace in the calling thread.

Rules of this room: `[agent] netns` must move the writer thread and the
netlink thread into the managed namespace *before* they touch the kernel,
while the main thread (RPC, admin socket) stays where it is. `setns(2)` on a
network namespace affects only the calling thread, and every subprocess that
thread starts inherits it, so iptables-restore, ipset and conntrack land in
the namespace without `ip netns exec`. A failure here is fatal: writing to the
host's own firewall by mistake is the worst thing this agent could do.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"network namespace name {name!r} is not valid")
    return os.path.join(NETNS_DIR, name)


def enter(name: str) -> None:
    """Move the calling thread into namespace `name`; no-op for the empty name."""
    if not name:
        return
    path = netns_path(name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)
    if current_inode() != os.stat(path).st_ino:
        raise OSError(f"setns({path}) did not move this thread")


def current_inode() -> int:
    """The inode of the calling thread's network namespace (identifies it)."""
    return os.stat("/proc/thread-self/ns/net").st_ino
