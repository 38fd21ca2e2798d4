"""Which database a call reads from: read replicas in turn, the primary last.

A store given replicas (Config.database_replicas, bksops_database_replicas) reads
from them round robin, so reads scale with the replicas and leave the primary its
writes. A node that fails a connect or a statement is set aside for DOWN_SECONDS:
calls try it only after every other node, the primary included, so one dead node
costs the calls that meet it a failed connect or statement each (a refused connect
takes microseconds; a silent host, its share of the call's time), not the calls
after them. After DOWN_SECONDS it takes its turn again, and the first call that
finds it alive puts it back.

What a caller can observe (README, "Read replicas"): a replica serves what it has
applied, which is what the primary had a replication lag ago: on PostgreSQL's
asynchronous streaming, milliseconds while the standby keeps up, unbounded while it
does not (a replay conflict delayed up to max_standby_streaming_delay, a broken
link); on Galera, what the node has applied, or everything committed anywhere when
the session reads with wsrep_sync_wait. Two calls in a row may go to two replicas,
the second older than the first.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence

from peewee import Database

#: Seconds a node that failed is tried only after every other one.
DOWN_SECONDS = 5.0


class Nodes:
    """The databases one store reads from, and which of them failed lately."""

    def __init__(self, primary: Database, replicas: Sequence[Database] = ()) -> None:
        #: Read last while a replica answers; and the databases' dialect, for building SQL.
        self.primary = primary
        self.replicas = tuple(replicas)
        self.all = (*self.replicas, primary)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        #: id(node) -> time.monotonic() until which it is tried last.
        self._down: dict[int, float] = {}

    def order(self, first: Database | None = None, skip: Sequence[Database] = ()) -> list[Database]:
        """Every node but skip, in the order a call tries them: first, if given; the
        replicas up, beginning with the next in turn; the primary, if up; then the nodes
        set aside, the one that failed earliest first."""
        if not self.replicas:  # the usual case, at no cost: the primary or nothing
            return [] if any(db is self.primary for db in skip) else [self.primary]
        now = time.monotonic()
        with self._lock:
            down = {key: until for key, until in self._down.items() if until > now}
            self._down = down
        start = next(self._turn) % len(self.replicas) if self.replicas else 0
        turn = [*self.replicas[start:], *self.replicas[:start], self.primary]
        up = [db for db in turn if id(db) not in down]
        aside = sorted((db for db in turn if id(db) in down), key=lambda db: down[id(db)])
        skipped = {id(db) for db in skip}
        ordered = [db for db in (*up, *aside) if id(db) not in skipped]
        if first is not None and id(first) not in skipped:
            ordered.remove(first)
            ordered.insert(0, first)
        return ordered

    def failed(self, db: Database) -> None:
        """db failed a connect or a statement: set it aside for DOWN_SECONDS."""
        with self._lock:
            self._down[id(db)] = time.monotonic() + DOWN_SECONDS

    def answered(self, db: Database) -> None:
        """db answered: it takes its turn again."""
        if id(db) in self._down:
            with self._lock:
                self._down.pop(id(db), None)

    def __len__(self) -> int:
        return len(self.all)
