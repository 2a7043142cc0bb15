"""Return freed heap memory to the OS after large kernel reads and writes.

An apply at 1,000 ports builds and drops tens of MB of short-lived objects
(iptables-save text and its parse, restore scripts, libiptc's table copy).
glibc keeps the freed pages in its arenas, so without a trim the agent's
RSS stays at the peak of its largest apply for the rest of its life.
"""

from __future__ import annotations

import ctypes

_LIBC = ctypes.CDLL(None)


def release_heap() -> None:
    """malloc_trim(0): cheap (a walk of the free lists), and harmless if nothing is free."""
    _LIBC.malloc_trim(0)
