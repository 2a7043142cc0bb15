"""Memos for compiler stages: one slot (`LastCall`) or an LRU bounded by size (`SizedLru`).

Rules of this room: pure. A call whose inputs are equal gets the very same
result object back, which is what lets the engine skip comparing unchanged
tables and sets. Tuple and dict equality check identity first, so unchanged
inputs compare in microseconds.

`LastCall` holds the last inputs and result; the slot is replaced whole, so
concurrent callers see the old or the new pair.

`SizedLru` is for results whose size follows the data, such as a group's
members: an LRU bounded by a count of entries keeps that many *versions*, and
a 10,000-member group churning kept 4,096 of them (1.6 MiB each). It is
bounded by the total `weight` of what it holds (members, say), so memory
stays flat however often a group changes; the entries a compile uses are the
most recent, so an unchanged set keeps its identity as long as the sets in
use fit in the budget. An entry heavier than the whole budget is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

R = TypeVar("R")


class LastCall(Generic[R]):
    """Calls `build` unless `key` equals the last call's key."""

    def __init__(self, build: Callable[..., R]) -> None:
        self.build = build
        self._slot: tuple[tuple[object, ...], R] | None = None

    def __call__(self, key: tuple[object, ...], *args: object) -> R:
        slot = self._slot
        if slot is not None and slot[0] == key:
            return slot[1]
        result = self.build(*args)
        self._slot = (key, result)
        return result

    def cache_clear(self) -> None:
        """Forget the slot (benchmarks that want a cold compile)."""
        self._slot = None


class SizedLru(Generic[R]):
    """`build(*args)`, memoised on `args`; evicts the least recently used entries
    once the weights (`weight(*args, result)`) add up to more than `budget`."""

    def __init__(self, build: Callable[..., R], weight: Callable[..., int],
                 budget: int) -> None:
        self.build = build
        self.weight = weight
        self.budget = budget
        self.held = 0  # total weight of the entries
        self._entries: OrderedDict[tuple[Hashable, ...], tuple[R, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, *args: Hashable) -> R:
        with self._lock:
            hit = self._entries.get(args)
            if hit is not None:
                self._entries.move_to_end(args)
                return hit[0]
        result = self.build(*args)
        weight = self.weight(*args, result)
        with self._lock:
            raced = self._entries.get(args)  # another thread built it meanwhile
            if raced is not None:
                return raced[0]
            if weight > self.budget:
                return result
            self._entries[args] = (result, weight)
            self.held += weight
            while self.held > self.budget:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.held -= dropped
        return result

    def __len__(self) -> int:
        return len(self._entries)

    def cache_clear(self) -> None:
        """Empty it (named like functools.lru_cache's, which bench/ clears the same way)."""
        with self._lock:
            self._entries.clear()
            self.held = 0
