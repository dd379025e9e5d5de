"""The one LRU cache every service cache uses: count and size bounds, recency, eviction callbacks, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.lru import LRUCache


def test_count_bound_drops_the_least_recently_used() -> None:
    evicted: list[tuple[str, int]] = []
    cache: LRUCache[str, int] = LRUCache(max_items=2, on_evict=lambda k, v: evicted.append((k, v)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.peek("a") == 1 and cache.peek("c") == 3
    assert evicted == [("b", 2)]
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get("b") is None and cache.misses == 1


def test_size_bound_counts_bytes_and_refuses_oversized_values() -> None:
    cache: LRUCache[int, np.ndarray] = LRUCache(max_size=100, size_of=lambda a: int(a.nbytes))
    cache.put(1, np.zeros(40, np.uint8))
    cache.put(2, np.zeros(40, np.uint8))
    assert cache.size == 80
    cache.put(3, np.zeros(40, np.uint8))  # 120 > 100: the oldest goes
    assert 1 not in cache and cache.size == 80
    cache.put(4, np.zeros(101, np.uint8))  # larger than the whole budget: not kept, nothing else lost
    assert 4 not in cache and len(cache) == 2
    cache.put(5, b"x", size=30)  # an explicit size wins over size_of
    assert cache.size == 70 and 2 not in cache


def test_replacing_a_value_evicts_the_old_one_and_recounts_its_size() -> None:
    evicted: list[str] = []
    cache: LRUCache[str, str] = LRUCache(max_size=10, on_evict=lambda k, v: evicted.append(v))
    cache.put("k", "old", size=6)
    cache.put("k", "new", size=3)
    assert cache.peek("k") == "new" and cache.size == 3 and evicted == ["old"]


def test_pop_hands_the_value_over_and_clear_evicts_everything() -> None:
    evicted: list[int] = []
    cache: LRUCache[str, int] = LRUCache(max_items=5, on_evict=lambda k, v: evicted.append(v))
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.pop("b") == 1 and evicted == []  # popped: the caller owns it, no callback
    assert cache.pop("b") is None
    cache.clear()
    assert sorted(evicted) == [0, 2] and len(cache) == 0 and cache.size == 0


def test_put_can_tighten_the_count_for_one_trim() -> None:
    cache: LRUCache[int, int] = LRUCache(max_items=4)
    for i in range(4):
        cache.put(i, i)
    cache.put(4, 4, max_items=2)
    assert cache.values() == [3, 4]


def test_setdefault_keeps_the_first_value_stored() -> None:
    cache: LRUCache[str, object] = LRUCache(max_items=3)
    first, second = object(), object()
    assert cache.setdefault("k", first) is first
    assert cache.setdefault("k", second) is first


def test_on_evict_may_use_the_cache_again_without_deadlock() -> None:
    seen: list[int | None] = []

    def evict(key: int, value: int) -> None:
        seen.append(cache.get(2))  # runs after the cache's lock is released: taking it again must not hang

    cache: LRUCache[int, int] = LRUCache(max_items=1, on_evict=evict)
    cache.put(1, 1)
    cache.put(2, 2)
    assert seen == [2]


def test_bounds_hold_under_concurrent_use() -> None:
    cache: LRUCache[int, bytes] = LRUCache(max_items=50, max_size=4000)

    def work(offset: int) -> None:
        for i in range(2000):
            cache.put((offset * 7919 + i) % 300, b"x" * 64, size=64)
            cache.get(i % 300)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) <= 50 and cache.size <= 4000 and cache.size == 64 * len(cache)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_items"):
        LRUCache(max_items=0)
    with pytest.raises(ValueError, match="max_size"):
        LRUCache(max_size=-1)
