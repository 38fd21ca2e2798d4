"""Replies already built, reused while what they were built from is unchanged.

A node's detail is read far more often than it changes (callers poll), and
building it (JSON text to messages) costs most of a call. Each entry is stamped
with the store's stamp of its task (server.db.store.Store.stamp): one indexed read
per call tells whether the entry is still exact. Errors are never cached. The stamp
is read before the snapshot a reply is built from begins, so an entry's stamp is
never newer than its reply: a change in between costs a rebuild, never a stale hit.

A reply about a node or child still running shows its elapsed time up to now, so
such an entry keeps when they started and is given fresh elapsed times on reuse.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass

from bksops.tasknode.v1 import task_node_pb2 as pb

from server import convert
from server import metrics
from server.lru import SizedLRU

#: Replies larger than this are rebuilt each time rather than crowd out the others.
MAX_ENTRY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class _Entry:
    stamp: Hashable
    detail: pb.NodeDetail
    #: started_at of the node itself when it is running, else None.
    running_since: int | None
    #: (child index, started_at) of each running child.
    running_children: tuple[tuple[int, int], ...]


class DetailCache:
    """A bounded LRU of built NodeDetail messages; safe to share between threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: SizedLRU[Hashable, _Entry] = SizedLRU(max_bytes)

    def get(self, key: Hashable, stamp: Hashable) -> pb.NodeDetail | None:
        """The reply for key if it was built from what stamp stands for."""
        entry = self._entries.get(key)
        if entry is None or entry.stamp != stamp:
            metrics.REPLY_CACHE_MISSES.inc()
            return None
        metrics.REPLY_CACHE_HITS.inc()
        if entry.running_since is None and not entry.running_children:
            return entry.detail  # never mutated: safe to hand out to every caller
        now = time.time_ns() // 1000
        fresh = pb.NodeDetail()
        fresh.CopyFrom(entry.detail)
        if entry.running_since is not None:
            fresh.elapsed_seconds = convert.elapsed_seconds(entry.running_since, None, now)
        for index, started in entry.running_children:
            fresh.children[index].elapsed_seconds = convert.elapsed_seconds(started, None, now)
        return fresh

    def put(
        self,
        key: Hashable,
        stamp: Hashable,
        detail: pb.NodeDetail,
        running_since: int | None,
        running_children: tuple[tuple[int, int], ...],
    ) -> None:
        """Keep detail (which the caller must not change afterwards) for key."""
        size = detail.ByteSize()
        if size > MAX_ENTRY_BYTES:
            return
        self._entries.put(key, _Entry(stamp, detail, running_since, running_children), size)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every reply (they are then built again)."""
        self._entries.clear()
