"""Legacy JSON already rendered, reused for the same reply.

Rendering a NodeDetail as the legacy ``data`` (JsonValues to Python values, times in
the configured zone, then JSON text) is most of the shim's own work per request. A
reply's serialized bytes determine its rendering entirely, so they are the key: a
poller asking again for an unchanged node gets the same bytes from the server (whose
own cache checks they are current) and the same text from here, with no staleness
to reason about. Used by one event loop only: no lock.
"""

from __future__ import annotations

from collections import OrderedDict

#: Rendered JSON text, and the reply's etag (sent as ETag on every route).
Rendered = tuple[bytes, str]


class RenderedCache:
    """An LRU of rendered JSON text keyed by (reply bytes, variant), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[bytes, bool], Rendered] = OrderedDict()
        self._bytes = 0

    def get(self, reply: bytes, variant: bool) -> Rendered | None:
        key = (reply, variant)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, reply: bytes, variant: bool, rendered: Rendered) -> None:
        size = len(reply) + len(rendered[0])
        if size > self.max_bytes // 8:
            return
        key = (reply, variant)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(reply) + len(old[0])
        self._entries[key] = rendered
        self._bytes += size
        while self._bytes > self.max_bytes:
            (old_reply, _), (old_text, _) = self._entries.popitem(last=False)
            self._bytes -= len(old_reply) + len(old_text)

    def __len__(self) -> int:
        return len(self._entries)
