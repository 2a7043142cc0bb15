"""SizedLru: a memo bounded by the weight it holds, not by its count of entries."""

from __future__ import annotations

from agent.compiler.memo import SizedLru


def memo(budget: int) -> tuple[SizedLru[frozenset[int]], list[tuple[int, ...]]]:
    built: list[tuple[int, ...]] = []

    def build(*items: int) -> frozenset[int]:
        built.append(items)
        return frozenset(items)

    return SizedLru(build, lambda *args: len(args) - 1, budget), built


def test_equal_arguments_get_the_same_object_back() -> None:
    lru, built = memo(10)
    first = lru(1, 2, 3)
    assert lru(1, 2, 3) is first and built == [(1, 2, 3)]


def test_the_least_recently_used_entries_go_once_over_the_budget() -> None:
    lru, built = memo(6)
    lru(1, 2, 3)
    lru(4, 5)
    lru(1, 2, 3)       # used again: now the most recent
    lru(6, 7)          # 3 + 2 + 2 > 6: (4, 5) goes
    assert lru.held == 5 and len(lru) == 2
    lru(1, 2, 3)
    lru(4, 5)
    assert built == [(1, 2, 3), (4, 5), (6, 7), (4, 5)]


def test_an_entry_heavier_than_the_budget_is_built_but_not_kept() -> None:
    lru, built = memo(2)
    lru(1, 2, 3)
    lru(1, 2, 3)
    assert len(built) == 2 and len(lru) == 0 and lru.held == 0
    lru.cache_clear()
