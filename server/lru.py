"""A least-recently-used map bounded by the bytes its values hold, shared between threads.

The reply cache (server.cache) and the bk-sops store's parsed trees (server.db.bksops)
both keep what costs most to build for as long as memory allows, and drop what was
used longest ago first; each says what one of its values weighs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """Values by key, at most max_bytes of them (by the size each was put with)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        #: The sizes of the values kept, summed.
        self.bytes = 0
        self._kept: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: K) -> bool:
        return key in self._kept

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self.bytes = 0

    def get(self, key: K) -> V | None:
        """The value kept for key, now the most recently used; None if none is."""
        with self._lock:
            found = self._kept.get(key)
            if found is None:
                return None
            self._kept.move_to_end(key)
            return found[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Keep value for key, dropping the least recently used beyond the bound. A value
        larger than the whole bound is not kept (it would only empty the map)."""
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._kept[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._kept.popitem(last=False)
                self.bytes -= dropped
