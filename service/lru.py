"""One thread-safe least-recently-used map, bounded by item count and/or total size, for every cache of the service.

The slide layer caches decoded source tiles (by bytes), the analysis core recent chunk files (by count), the
worker its plans and open tile readers (by count, closing what falls out), and the tile routes open slides and
encoded tiles. Each used to keep its own `OrderedDict`; they differ only in their bounds and in what happens to an
evicted value, which are the parameters here. `on_evict` runs after the cache's lock is released, so it may take
other locks or close files.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LRUCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Least recently used entries are dropped beyond `max_items` entries or `max_size` total size.

    A value's size is the `size` given to `put`, else `size_of(value)` (e.g. `lambda a: a.nbytes`), else 0; a
    value larger than `max_size` on its own is not kept. `on_evict(key, value)` is called for every value that leaves the cache
    other than by `pop`.
    """

    def __init__(self, max_items: int | None = None, max_size: int | None = None,
                 size_of: Callable[[V], int] | None = None,
                 on_evict: Callable[[K, V], None] | None = None) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0 or None, got {max_size}")
        self.max_items = max_items
        self.max_size = max_size
        self._size_of = size_of
        self._on_evict = on_evict
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def size(self) -> int:
        """Total size of the values held (0 when sizes are not counted)."""
        return self._size

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key: K) -> V | None:
        """The value without touching its recency or the hit counts, or None."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V, *, size: int | None = None, max_items: int | None = None) -> None:
        """Store (or replace) a value, then drop the least recently used beyond the bounds.

        `max_items` tightens the count bound for this trim only (e.g. fewer readers when each holds processes).
        """
        if size is None:
            size = self._size_of(value) if self._size_of is not None else 0
        self._evict(self._put(key, value, size, max_items))

    def setdefault(self, key: K, value: V) -> V:
        """The value already held for `key`, else `value`, stored (two threads loading one key keep one)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item[0]
        self.put(key, value)
        return value

    def pop(self, key: K) -> V | None:
        """Remove and return the value (no `on_evict`: the caller owns it now), or None."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._size -= item[1]
            return item[0]

    def values(self) -> list[V]:
        """A snapshot of the values, least recently used first."""
        with self._lock:
            return [v for v, _ in self._items.values()]

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the (key, value) pairs, least recently used first."""
        with self._lock:
            return [(k, v) for k, (v, _) in self._items.items()]

    def clear(self) -> None:
        """Drop every value through `on_evict`."""
        with self._lock:
            dropped = [(k, v) for k, (v, _) in self._items.items()]
            self._items.clear()
            self._size = 0
        self._evict(dropped)

    def _put(self, key: K, value: V, size: int, max_items: int | None) -> list[tuple[K, V]]:
        dropped: list[tuple[K, V]] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
                if old[0] is not value:
                    dropped.append((key, old[0]))
            if self.max_size is not None and size > self.max_size:
                dropped.append((key, value))
                return dropped
            self._items[key] = (value, size)
            self._size += size
            limit = min(n for n in (self.max_items, max_items) if n is not None) \
                if self.max_items is not None or max_items is not None else None
            while self._items and ((limit is not None and len(self._items) > limit)
                                   or (self.max_size is not None and self._size > self.max_size)):
                old_key, (old_value, old_size) = self._items.popitem(last=False)
                self._size -= old_size
                dropped.append((old_key, old_value))
        return dropped

    def _evict(self, dropped: list[tuple[K, V]]) -> None:
        if self._on_evict is not None:
            for key, value in dropped:
                self._on_evict(key, value)
