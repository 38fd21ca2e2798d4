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

    __slots__ = ("done", "failed", "keys", "rows", "waiting")

    def __init__(self) -> None:
        self.keys: dict[K, None] = {}
        #: A held lock per call waiting on this turn, released to wake it: when the turn
        #: is done, or (the first) when it is to read for the turn. A woken call takes no
        #: shared lock, so a turn's calls do not queue behind each other as they wake.
        self.waiting: list[threading.Lock] = []
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
        #: A statement is in flight, or a woken call is about to begin one.
        self._busy = False

    def read(self, key: K, timeout: float | None) -> V | None:
        """key's value, from a statement begun after this call; TimeoutError when timeout
        seconds (None: no limit) pass before one answers it."""
        with self._lock:
            turn = self._open
            if turn is None:
                turn = self._open = _Turn()
            turn.keys[key] = None
            if self._busy:
                woken = threading.Lock()
                woken.acquire()
                turn.waiting.append(woken)
            else:  # nothing in flight: this call reads for the turn now
                self._busy = True
                self._open = None
                woken = None
        if woken is not None:
            self._wait(turn, woken, timeout)
            if turn.done:
                if turn.failed:  # that statement failed: this call's own
                    return self._read_many((key,)).get(key)
                metrics.shared_read(self._name)
                return turn.rows.get(key)
        try:  # this call reads for its turn (self._busy is set for it)
            turn.rows = self._read_many(tuple(turn.keys))
        except BaseException:
            turn.failed = True
            raise
        finally:
            self._end(turn)
        return turn.rows.get(key)

    def _wait(self, turn: _Turn[K, V], woken: threading.Lock, timeout: float | None) -> None:
        """Until woken is released; TimeoutError (and out of the turn) after timeout."""
        if woken.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            return
        with self._lock:
            try:
                turn.waiting.remove(woken)
            except ValueError:  # released meanwhile: woken after all
                return
        raise TimeoutError(f"no {self._name} read answered in time")

    def _end(self, turn: _Turn[K, V]) -> None:
        """Mark turn done, wake its calls, and the first waiting call of the next turn
        (if any) to read for it; no lock is held while waking them."""
        with self._lock:
            turn.done = True
            following = self._open
            if following is not None and following.waiting:
                self._open = None  # begun: the call woken below reads for it
                reader: threading.Lock | None = following.waiting.pop(0)
            else:  # the next call to come reads for the open turn, if any
                self._busy = False
                reader = None
        for woken in turn.waiting:
            woken.release()
        if reader is not None:
            reader.release()
