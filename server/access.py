"""Access logs: one line per call or request, written in batches.

Handing each line to logging costs ~50 µs of a call (a record, its formatting, a
write and a flush), as much as serving a cached reply. Calls therefore only append
their facts to a buffer; a background thread turns the buffer into text every
FLUSH_SECONDS and writes it as one logging record per batch, to the
``tasknode.access`` logger. A line reaches the log at most FLUSH_SECONDS late, and
stop() writes what is left.

The record's message is the batch itself: its text only when a text formatter asks, and
for server.logs' JSON formatter one object per line, each field under its key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from server.logs import trace_id

log = logging.getLogger("tasknode.access")

FLUSH_SECONDS = 0.2

#: The gRPC server's line: peer, method, app, user, outcome, milliseconds (the request
#: and trace ids are fields of JSON lines only: the text line stays as it was).
GRPC_LINE = "access {stamp} {0} {1} app={2} user={3} {4} {5:.1f}ms"
#: The keys of GRPC_LINE's fields in a JSON line, in the order record() takes them.
GRPC_KEYS = ("peer", "method", "app", "user", "outcome", "duration_ms", "request_id", "trace_id")

_Line = tuple[float, tuple[object, ...]]


class AccessLog:
    """Buffers access lines and writes them in batches from its own thread."""

    def __init__(
        self,
        template: str = GRPC_LINE,
        keys: tuple[str, ...] = GRPC_KEYS,
        logger: logging.Logger = log,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self.template = template
        self.keys = keys
        self.logger = logger
        self.flush_seconds = flush_seconds
        self._lines: deque[_Line] = deque()
        #: The last second formatted, and its text: most lines of a batch share it.
        self._second: tuple[int, str] = (-1, "")
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def record(self, *fields: object) -> None:
        """Note one finished call, its fields as the template numbers them (cheap: an append)."""
        self._lines.append((time.time(), fields))

    def flush(self) -> None:
        """Write every line noted so far."""
        batch = self._take()
        if batch.lines and self.logger.isEnabledFor(logging.INFO):
            self.logger.info(batch)

    def _take(self) -> _Batch:
        """The lines noted so far, as one record's message; they are no longer noted."""
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        return _Batch(self, lines)

    def stop(self) -> None:
        """Stop the writer thread after writing what is left."""
        self._stopped.set()
        self._thread.join(5)
        self.flush()

    def _format(self, line: _Line) -> str:
        moment, fields = line
        second = int(moment)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second)))
        stamp = self._second[1]
        words = [_word(f) if isinstance(f, str) else f for f in fields]
        return self.template.format(*words, stamp=f"{stamp}.{int(moment % 1 * 1000):03d}")

    def _run(self) -> None:
        while not self._stopped.wait(self.flush_seconds):
            self.flush()


class _Batch:
    """A batch of lines as a record's message: text on demand, or entries (server.logs)."""

    def __init__(self, log: AccessLog, lines: list[_Line]) -> None:
        self.log = log
        self.lines = lines

    def __str__(self) -> str:
        return "\n".join(self.log._format(line) for line in self.lines)

    def entries(self) -> Iterator[tuple[float, str, dict[str, Any]]]:
        """Each line's time, text and fields by key; "-" (none) is null."""
        for line in self.lines:
            moment, values = line
            fields: dict[str, Any] = {
                key: None if value == "-" else value
                for key, value in zip(self.log.keys, values, strict=False)
            }
            if "duration_ms" in fields:
                fields["duration_ms"] = round(fields["duration_ms"], 3)
            fields["trace_id"] = trace_id(fields.get("trace_id"))
            yield moment, self.log._format(line), fields


def _word(text: str) -> str:
    """A field as one word of one line: callers choose paths and app codes, and must not
    be able to split a line or forge another with spaces, newlines or control characters."""
    if text.isprintable() and " " not in text:
        return text
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
