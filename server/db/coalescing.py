"""Concurrent calls' reads of small keyed rows, shared: one statement for all that wait.

Polling callers ask the same nodes again and again, many at once (a dashboard's tabs,
a fleet of deploy tools), and a cached reply costs one statement on the database: its
stamp (server.db.bksops.BksopsStore.stamp). On a database across the network, each
statement's round trip, parse and plan cost more than the rows it reads. So calls take
turns: while one statement is in flight, the calls that arrive queue their keys; when it
ends, one of them reads every queued key in one statement, and each takes its row.

Nothing read this way is older than the call that uses it: a call only takes a row from
a statement that began after the call queued its key (a call never joins a statement
already in flight). So sharing changes what a call costs, never what it answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Generic
from typing import TypeVar

from server import metrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Turn(Generic[K, V]):
    """One statement's keys, queued before it begins, and then what it read."""

    __slots__ = ("done", "failed", "keys", "rows", "woken")

    def __init__(self, lock: threading.Lock) -> None:
        self.keys: dict[K, None] = {}
        #: Wakes this turn's calls only: when it is done, or when one of them may read.
        self.woken = threading.Condition(lock)
        self.done = False
        self.rows: dict[K, V] = {}
        #: The statement failed; each of its calls then reads on its own.
        self.failed = False


class Coalescer(Generic[K, V]):
    """Reads keys with read_many, one statement at a time, each for every key queued.

    read_many(keys) returns the value of each key it found (a missing key reads as
    None) and runs on the calling thread: on that call's session (server.db.store), with
    its deadline. A call whose turn's statement fails reads its key alone, so another
    call's short deadline or lost connection is never its error.
    """

    def __init__(self, read_many: Callable[[Sequence[K]], dict[K, V]], name: str) -> None:
        self._read_many = read_many
        self._name = name
        self._lock = threading.Lock()
        #: The turn that queues keys, not yet begun; None when no key waits.
        self._open: _Turn[K, V] | None = None
        #: A statement is in flight.
        self._busy = False

    def read(self, key: K, timeout: float | None) -> V | None:
        """key's value, from a statement begun after this call; TimeoutError when timeout
        seconds (None: no limit) pass before one answers it."""
        until = None if timeout is None else time.monotonic() + timeout
        leading = False
        with self._lock:
            turn = self._open
            if turn is None:
                turn = self._open = _Turn(self._lock)
            turn.keys[key] = None
            while not turn.done:
                if not self._busy and self._open is turn:  # this call reads for the turn
                    self._busy = leading = True
                    self._open = None
                    break
                left = None if until is None else until - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no {self._name} read answered in time")
                turn.woken.wait(left)
            if not leading and not turn.failed:
                metrics.shared_read(self._name)
                return turn.rows.get(key)
        if not leading:  # the turn's statement failed: this call's own
            return self._read_many((key,)).get(key)
        try:
            turn.rows = self._read_many(tuple(turn.keys))
        except BaseException:
            turn.failed = True
            raise
        finally:
            with self._lock:
                turn.done = True
                self._busy = False
                turn.woken.notify_all()
                if self._open is not None:  # one of the next turn's calls reads for it
                    self._open.woken.notify()
        return turn.rows.get(key)
