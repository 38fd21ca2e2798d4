"""The store: the only code that queries the database.

Every method returns plain rows (named tuples of column values, JSON still as
text) and raises domain errors from server.errors, so nothing above this module
imports peewee. Database failures surface as StoreUnavailable.

A call waits on the database until its deadline or the store's timeout, whichever
comes first, and no longer: for a pooled connection, for a new one, and for every
statement. Past that time a thread blocked reading from a database that went
silent (a partition, a failover) is freed by the watchdog, which shuts that
connection's socket; the call then fails DEADLINE_EXCEEDED (its deadline passed) or
STORE_UNAVAILABLE (the store's timeout did), and its connection is thrown away
with the pool's idle ones, which the same outage most likely stranded.

A store given read replicas (server.db.replicas) reads each call from one node, a
replica in turn or the primary last: a node that refuses the call's connect or
fails its first statement is left for the next within the call's time; one that
fails after the call read from it ends the call with NodeLost, which the service
interceptor serves anew on another node while the deadline allows.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any
from typing import NamedTuple
from typing import TypeVar

import peewee
from peewee import JOIN
from peewee import Database
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase
from peewee import fn
from playhouse.pool import MaxConnectionsExceeded
from playhouse.pool import PooledDatabase

from server import errors
from server import metrics
from server import traces
from server import values
from server.config import Config
from server.db.models import Attempt
from server.db.models import CatalogStamp
from server.db.models import ComponentSchema
from server.db.models import Node
from server.db.models import Project
from server.db.models import Task
from server.db.pool import BoundedPool
from server.db.pool import NoAnswer
from server.db.pool import OutOfTime
from server.db.prepared import Prepared
from server.db.prepared import Slot
from server.db.replicas import Nodes
from server.filters import Term

log = logging.getLogger(__name__)
T = TypeVar("T")


class NodeRow(NamedTuple):
    """A node's own row, found by business, task and node id."""

    task_id: int
    node_id: str
    path: tuple[str, ...]
    name: str
    kind: str
    component_code: str
    component_version: str
    error_ignorable: bool
    state: str | None
    loop: int
    retry: int
    skip: bool
    error_ignored: bool
    version: str
    started_at: int | None
    finished_at: int | None
    inputs: str
    outputs: str
    ex_data: str | None
    #: (output key, key shown): outputs a root-level `component_outputs` constant takes
    #: from this node are shown under the constant's key (bk-sops's _format_outputs).
    renamed: tuple[tuple[str, str], ...] = ()
    #: The tree gives the node no name (JSON null); name is then "".
    name_null: bool = False
    #: The engine's id of the task's root pipeline (bk-sops's `root_id:`); "" if not known.
    root_id: str = ""


class AttemptRow(NamedTuple):
    """One earlier attempt of a node."""

    #: The engine's id of the history when recorded (bk-sops's `history_id`), else ours.
    id: int
    loop: int
    retry: int
    skip: bool
    version: str
    state: str | None
    started_at: int | None
    finished_at: int | None
    inputs: str
    outputs: str
    ex_data: str | None


class ChildRow(NamedTuple):
    """The state of one direct child of a sub-process node that has run."""

    node_id: str
    name: str
    state: str
    loop: int
    retry: int
    skip: bool
    error_ignored: bool
    version: str
    started_at: int | None
    finished_at: int | None


class ListedRow(NamedTuple):
    """One node as ListTaskNodes lists it, with its place in the listing's order."""

    row_id: int
    position: int
    node_id: str
    path: tuple[str, ...]
    name: str
    component_code: str
    state: str | None
    loop: int
    retry: int
    started_at: int | None
    finished_at: int | None


#: Where a page of a listing starts: after this (sort key, node id); see Store.list_nodes.
After = tuple[int, str]


class TaskState(NamedTuple):
    """A watched task as the store holds it now (see Store.task_changes)."""

    #: What changes whenever anything about the task's nodes does; None: no such task.
    stamp: Hashable | None
    #: Every node of the task, in stored order (none for a task that is not there).
    nodes: tuple[ListedRow, ...]


#: Tasks one change-detection statement asks about (an IN list of ids).
WATCH_BATCH = 500

_NODE_COLUMNS = (
    Node.node_id,
    Node.path,
    Node.name,
    Node.kind,
    Node.component_code,
    Node.component_version,
    Node.error_ignorable,
    Node.state,
    Node.loop,
    Node.retry,
    Node.skip,
    Node.error_ignored,
    Node.version,
    Node.started_at,
    Node.finished_at,
    Node.name_null,
    Node.renamed,
    Task.pipeline_id,
    Node.inputs,
    Node.outputs,
    Node.ex_data,
)
#: The columns of a ListedRow, in its order.
_LISTED_COLUMNS = (
    Node.id,
    Node.position,
    Node.node_id,
    Node.path,
    Node.name,
    Node.component_code,
    Node.state,
    Node.loop,
    Node.retry,
    Node.started_at,
    Node.finished_at,
)
#: The heavy columns' values in a row read without them (find_node(heavy=False)).
_NO_HEAVY_COLUMNS = ("{}", "{}", None)


#: Listing query shapes (Store.list_nodes, count_nodes) kept prepared.
MAX_LISTING_SHAPES = 256

#: How often the watchdog looks for calls past their time, in seconds: the most a
#: thread blocked on a silent database outstays its call's time.
WATCH_INTERVAL = 0.05


class _Call:
    """Where one thread's call stands with the store (Store.session); the watchdog
    reads it from its own thread."""

    __slots__ = (
        "ahead",
        "by_deadline",
        "conn",
        "db",
        "expiry",
        "failed",
        "interrupt",
        "killed",
        "pending",
        "proven",
        "retried",
        "snapshot",
        "stamps",
    )

    def __init__(self) -> None:
        #: Shuts conn down from another thread (BoundedPool.interrupt).
        self.interrupt: Callable[[Any], None] = _cannot_interrupt
        #: The node the call's connection is on; None while it holds none.
        self.db: Database | None = None
        #: Nodes that failed the call, not to be tried again by it.
        self.failed: list[Database] = []
        #: The node on which the call already retried its first statement on a new
        #: connection (see Store.read).
        self.retried: Database | None = None
        #: The connection the watchdog may shut; None while the call holds none.
        self.conn: Any = None
        #: time.monotonic() by which the call is done with the store, and whether that
        #: is the call's deadline (rather than the store's timeout).
        self.expiry = 0.0
        self.by_deadline = False
        #: The watchdog shut conn down: the call's time ran out while it held it.
        self.killed = False
        #: The call's read snapshot has begun (and needs its ROLLBACK).
        self.snapshot = False
        #: A statement of the call has succeeded, so its connection is known alive.
        self.proven = False
        #: A lazy session (Store.session) holding no connection yet: its first read takes
        #: one, from pending[0] first (None: in Nodes.order).
        self.pending: tuple[Database | None] | None = None
        #: The stamps the session read, by task (Store.stamp); None outside a session.
        self.stamps: dict[int, tuple[str, int] | None] | None = None
        #: Stamps read ahead for the session's later stamp() calls, by (task id, node id)
        #: (a store's stamp_ahead); None outside a session.
        self.ahead: dict[tuple[int, str], Any] | None = None


class _ThisCall(threading.local):
    """Each thread's own _Call."""

    def __init__(self) -> None:
        self.call = _Call()


class _Watchdog:
    """One thread per process that shuts the connection of every call past its time.

    A call is watched only while it holds a connection; watching and releasing one
    costs a lock each, and the thread wakes every WATCH_INTERVAL whatever the load,
    so a call pays no thread, timer or wake-up of its own. The lock makes a release
    final: once a call has let go of its connection (to the pool, where another call
    may take it), the watchdog can no longer shut it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="store-watchdog")
                self._thread.daemon = True
                self._thread.start()

    def watch(self, call: _Call, conn: Any) -> None:
        with self._lock:
            call.conn = conn
            self._calls.add(call)

    def release(self, call: _Call) -> bool:
        """Stop watching call; True if its connection was shut meanwhile."""
        with self._lock:
            self._calls.discard(call)
            call.conn = None
            return call.killed

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            with self._lock:
                for call in self._calls:
                    if call.expiry <= now and not call.killed:
                        call.killed = True
                        try:
                            call.interrupt(call.conn)
                        except Exception:  # the watchdog must outlive any one connection
                            log.exception("shutting a connection down failed")


_watchdog = _Watchdog()


class NodeLost(Exception):
    """A database node failed after the call had read from it, while other nodes remain:
    the whole call may be served again on one of them (server.interceptors). Not a
    ServiceError: a caller who sees it gets error, STORE_UNAVAILABLE."""

    def __init__(self, error: errors.StoreUnavailable) -> None:
        super().__init__(error.message)
        self.error = error


class Store:
    """Reads node records from one database, or its read replicas; a call waits at most
    timeout seconds on them."""

    def __init__(
        self,
        db: Database,
        timeout: float = Config.store_timeout_seconds,
        replicas: Sequence[Database] = (),
    ) -> None:
        """db: the primary (read only when no replica answers); replicas: databases of
        db's engine holding copies of it (server.db.connection.open_replicas)."""
        self.nodes = Nodes(db, replicas)
        self.timeout = timeout
        #: The database's kind, as the spans of its queries name it.
        self.system = _system(db)
        self._this = _ThisCall()
        self._prepare()
        _watchdog.start()

    @property
    def db(self) -> Database:
        """The database of this thread's call, or the primary outside a call."""
        db = self._this.call.db
        return self.nodes.primary if db is None else db

    def time_left(self) -> float | None:
        """Seconds left to this thread's call on the store; None outside a call."""
        call = self._this.call
        if call.db is None and call.pending is None:
            return None
        return call.expiry - time.monotonic()

    @contextmanager
    def session(
        self, deadline: float | None = None, primary: bool = False, lazy: bool = False
    ) -> Iterator[None]:
        """One connection for a call, given back afterwards; see _read for its snapshot.

        deadline: the seconds the call has left, if it has a deadline. The call waits
        on the store until then or for the store's timeout, whichever is sooner.
        primary: read the primary first, replicas only if it fails. The watch streams'
        polls do (server.watch.hub): two polls on two replicas could see a task go
        back in time and send the older state as a change.
        lazy: take the connection at the call's first read, not now; a call that reads
        nothing here takes none (server.db.bksops: a cached reply reads only the
        engine's database).
        """
        call = self._this.call
        budget = self.timeout if deadline is None else min(deadline, self.timeout)
        call.by_deadline = budget < self.timeout
        call.expiry = time.monotonic() + budget
        call.snapshot = call.proven = call.killed = False
        call.failed, call.retried = [], None
        call.stamps, call.ahead = {}, {}
        first = self.nodes.primary if primary else None
        if lazy:
            call.pending = (first,)
        else:
            call.pending = None
            with unavailable_on_db_error():
                self._connect(call, first)
            metrics.STORE_CONNECTIONS.inc()
        try:
            yield
        finally:
            call.stamps = call.ahead = None
            if call.pending is not None:  # lazy, and nothing was read: nothing to give back
                call.pending = None
            else:
                metrics.STORE_CONNECTIONS.dec()
                self._end(call)

    def _connect(self, call: _Call, first: Database | None = None) -> None:
        """Give the call a connection to the first node (first, if given, then in
        Nodes.order) that accepts one. Each node tried gets an equal share of the call's
        time left, the last all of it; a node that refuses is set aside (Nodes.failed)."""
        candidates = self.nodes.order(first, call.failed)
        if not candidates:
            raise peewee.OperationalError("every database node failed this call")
        for left, db in zip(range(len(candidates), 0, -1), candidates, strict=True):
            now = time.monotonic()
            until = call.expiry if left == 1 else now + (call.expiry - now) / left
            try:
                if isinstance(db, BoundedPool):
                    db.connect_by(until, reuse_if_open=True)
                else:
                    db.connect(reuse_if_open=True)
            except OutOfTime as exc:
                if left == 1 or time.monotonic() >= call.expiry:
                    raise self._late(call) from exc
                if isinstance(exc, NoAnswer):
                    self.nodes.failed(db)
                continue
            except MaxConnectionsExceeded as exc:
                if left == 1:
                    raise peewee.OperationalError(str(exc)) from exc
                continue
            except (peewee.OperationalError, peewee.InterfaceError) as exc:
                self.nodes.failed(db)
                call.failed.append(db)
                if left == 1:
                    raise
                log.info("a database node refused a connection (%s); trying the next", exc)
                continue
            call.db = db
            call.interrupt = getattr(db, "interrupt", _cannot_interrupt)
            _watchdog.watch(call, db.connection())
            return

    def _late(self, call: _Call) -> errors.ServiceError:
        """The error of a call whose time on the store ran out."""
        if call.by_deadline:
            late: errors.ServiceError = errors.DeadlineExceeded(
                "the call's deadline passed while it waited on the node store"
            )
        else:
            late = errors.StoreUnavailable(
                f"the node store did not answer within {self.timeout:g} s; retry later"
            )
        log.warning("%s", late.message)
        return late

    def _read(
        self, name: str, query: Prepared, snapshot: bool, **values: object
    ) -> list[tuple[Any, ...]]:
        return self.read(lambda: query.rows(self.db, **values), snapshot, name)

    def read(self, work: Callable[[], T], snapshot: bool = False, name: str = "other") -> T:
        """work's result, run on the call's connection; inside the call's read snapshot
        if snapshot, which begins at its first use. Its time is recorded as a query
        named name (server.metrics), failed or not, and, when the call's span is
        recorded, as a child span of its own (server.traces).

        The queries that build a reply (node, attempts, children, schema) all read one
        snapshot, so a call never mixes a node from before an import with its attempts
        from after it. The stamp and the credential and authorization lookups stand
        alone: a call whose cached reply is still good runs one statement and no
        transaction at all.

        A pooled connection the database dropped while it was idle (a restart, an
        idle timeout) fails the call's first statement. Nothing of the call has run
        yet, so that connection is thrown away, with the pool's other idle ones
        (likely dropped too), and work runs once more on a new connection; if that
        fails too, the node is set aside and work runs on the next node, if any, until
        none is left or the call's time is. work must therefore only read.
        """
        started = time.perf_counter()
        span = traces.query_span(name, self.system)
        try:
            return self._read_retrying(work, snapshot)
        except (errors.StoreUnavailable, errors.DeadlineExceeded) as exc:
            metrics.store_failed(name)
            if span is not None:
                traces.failed(span, exc.reason)
            raise
        finally:
            metrics.store_read(name, time.perf_counter() - started)
            if span is not None:
                span.end()

    def _read_retrying(self, work: Callable[[], T], snapshot: bool) -> T:
        call = self._this.call
        with unavailable_on_db_error():
            if call.pending is not None:  # a lazy session's first read: its connection now
                (node,) = call.pending
                self._connect(call, node)
                call.pending = None
                metrics.STORE_CONNECTIONS.inc()
            while True:
                db = self.db
                try:
                    if snapshot and not call.snapshot:
                        db.execute_sql(_snapshot_statement(db))
                        call.snapshot = True
                    result = work()
                except (peewee.OperationalError, peewee.InterfaceError) as exc:
                    if call.killed or time.monotonic() >= call.expiry:
                        raise self._late(call) from exc
                    if call.proven:
                        if len(self.nodes) > 1:
                            self.nodes.failed(db)
                            lost = errors.StoreUnavailable(
                                "a database node failed during the call; retry later"
                            )
                            log.warning("%s: %s", lost.message, exc)
                            raise NodeLost(lost) from exc
                        raise
                    first: Database | None = db
                    if call.retried is db:  # a new connection failed too: the node did
                        self.nodes.failed(db)
                        call.failed.append(db)
                        if len(call.failed) >= len(self.nodes):
                            raise
                        first = None
                        log.info("a database node failed (%s); trying the next", exc)
                    else:
                        log.info("a pooled connection was dead (%s); retrying on a new one", exc)
                    call.retried = first
                    self._discard_connection()
                    call.snapshot = False
                    self._connect(call, first)
                    continue
                if not call.proven:
                    call.proven = True
                    self.nodes.answered(db)
                return result

    def end_snapshot(self) -> None:
        """End the call's read snapshot, if one began, keeping the connection: the next
        read begins a fresh one. A batch ends it after each item, so each is read (its
        stamp before its snapshot, see server.cache) exactly as a call of its own."""
        call = self._this.call
        if call.snapshot:
            call.snapshot = False
            with unavailable_on_db_error():
                self.db.execute_sql("ROLLBACK")  # it read only: nothing to commit

    def _end(self, call: _Call) -> None:
        """End the snapshot if one began, and give the connection back; or close it,
        if it failed or the watchdog shut it."""
        clean = True
        if call.snapshot:
            call.snapshot = False
            try:
                self.db.execute_sql("ROLLBACK")  # it read only: nothing to commit
            except (peewee.DatabaseError, peewee.InterfaceError) as exc:
                # The connection died during the call, whose answer is already decided.
                log.info("ending a read snapshot failed (%s); dropping its connection", exc)
                clean = False
        if _watchdog.release(call) or not clean:
            self._discard_connection()
        else:
            self.db.close()
        call.db = None

    def _discard_connection(self) -> None:
        """Close this thread's connection for good, and a pool's idle connections."""
        _watchdog.release(self._this.call)
        if isinstance(self.db, PooledDatabase):
            self.db.manual_close()
            self.db.close_idle()
        elif not self.db.is_closed():
            self.db.close()

    def close(self) -> None:
        """Close every connection of every node, pooled ones included (at shutdown)."""
        for db in self.nodes.all:
            close_all = getattr(db, "close_all", None)
            if close_all is not None:
                close_all()
            elif not db.is_closed():
                db.close()

    def find_node(
        self, biz_id: int, by_project_id: bool, task_id: int, node_id: str, heavy: bool = True
    ) -> NodeRow:
        """The node's row; NotFound naming the first of business, task or node missing.

        One query: the business row, LEFT JOINed to the task and the node, tells
        which of the three is missing. Unless heavy, the JSON columns (inputs, outputs,
        ex_data: any size) are not read, and the row holds "{}", "{}" and None for them.
        """
        query = self._node_queries[by_project_id, heavy]
        rows = self._read("node", query, True, biz_id=biz_id, task_id=task_id, node_id=node_id)
        if not rows:
            scope = "project" if by_project_id else "cmdb_biz"
            raise errors.BusinessNotFound(
                f"project({biz_id}) with scope({scope}) does not exist.",
                {"bkBizId": str(biz_id), "scope": scope},
            )
        row = rows[0] if heavy else rows[0] + _NO_HEAVY_COLUMNS
        if row[1] is None:
            raise errors.TaskNotFound(
                f"task {task_id} of business {biz_id} does not exist",
                {"bkBizId": str(biz_id), "taskId": str(task_id)},
            )
        if row[2] is None:
            raise errors.NodeNotFound(
                f"node {node_id} not found in task {task_id}",
                {"taskId": str(task_id), "nodeId": node_id},
            )
        (
            _,
            _,
            found_id,
            path,
            name,
            kind,
            code,
            version,
            ignorable,
            state,
            loop,
            retry,
            skip,
            ignored,
            state_version,
            started,
            finished,
            name_null,
            renamed,
            pipeline_id,
            inputs,
            outputs,
            ex_data,
        ) = row
        return NodeRow(
            task_id=task_id,
            node_id=found_id,
            path=tuple(values.loads(path)),
            name=name,
            kind=kind,
            component_code=code,
            component_version=version,
            error_ignorable=bool(ignorable),
            state=state,
            loop=loop,
            retry=retry,
            skip=bool(skip),
            error_ignored=bool(ignored),
            version=state_version,
            started_at=started,
            finished_at=finished,
            inputs=inputs,
            outputs=outputs,
            ex_data=ex_data,
            renamed=tuple((key, shown) for key, shown in values.loads(renamed or "[]")),
            name_null=bool(name_null),
            root_id=pipeline_id,
        )

    def find_task(self, biz_id: int, by_project_id: bool, task_id: int) -> None:
        """Nothing if the task is there; NotFound naming the business or the task if not."""
        query = self._task_queries[by_project_id]
        rows = self._read("task", query, True, biz_id=biz_id, task_id=task_id)
        if not rows:
            scope = "project" if by_project_id else "cmdb_biz"
            raise errors.BusinessNotFound(
                f"project({biz_id}) with scope({scope}) does not exist.",
                {"bkBizId": str(biz_id), "scope": scope},
            )
        if rows[0][1] is None:
            raise errors.TaskNotFound(
                f"task {task_id} of business {biz_id} does not exist",
                {"taskId": str(task_id), "bkBizId": str(biz_id)},
            )

    def list_nodes(
        self,
        task_id: int,
        parent: str | None,
        terms: tuple[Term, ...],
        after: After | None,
        limit: int,
    ) -> list[ListedRow]:
        """Up to limit nodes of the task matching terms, in stored order, after after.

        parent None: every node, ordered by row id (the order they were stored in), and
        after is (row id, node id): the page goes on after that node's row as it is now
        (a changed task is stored anew, its rows with new ids), or after the row id if
        the node is gone. Otherwise the parent's direct children, ordered by their
        position among them, after is (position, node id). Either way one range scan
        of an index from the page's start: the last page costs what the first does.
        """
        key = ("list", parent is not None, after is not None, _shape(terms))
        bound: dict[str, object] = {"task_id": task_id, "limit": limit}
        if parent is not None:
            bound["parent"] = parent
        if after is not None:
            bound["after"] = after[0]
            if parent is None:
                bound["task_again"], bound["after_node"] = task_id, after[1]
        bound.update(_term_values(terms))
        rows = self._read("list", self._listing(key, terms), True, **bound)
        return [
            ListedRow(
                row_id,
                position,
                node_id,
                tuple(values.loads(path)),
                name,
                code,
                state,
                loop,
                retry,
                started,
                finished,
            )
            for (
                row_id,
                position,
                node_id,
                path,
                name,
                code,
                state,
                loop,
                retry,
                started,
                finished,
            ) in rows
        ]

    def count_nodes(self, task_id: int, parent: str | None, terms: tuple[Term, ...]) -> int:
        """How many nodes list_nodes would list from the start, with no limit."""
        key = ("count", parent is not None, False, _shape(terms))
        bound: dict[str, object] = {"task_id": task_id, **_term_values(terms)}
        if parent is not None:
            bound["parent"] = parent
        rows = self._read("count", self._listing(key, terms), True, **bound)
        return int(rows[0][0])

    def _listing(self, key: tuple[Any, ...], terms: tuple[Term, ...]) -> Prepared:
        """The prepared query of a listing's shape, built on its first use and kept (two
        threads building one at once build the same SQL). The shapes callers use are
        few, but filters can make very many: past MAX_LISTING_SHAPES, a new shape is
        built for its call alone, so no caller can make the store grow without bound."""
        prepared = self._listings.get(key)
        if prepared is None:
            kind, has_parent, has_after, _ = key
            slots: dict[str, str | int] = {"task_id": Slot.number(20)}
            if has_parent:
                slots["parent"] = Slot.text("parent")
            if has_after:
                slots["after"] = Slot.number(21)
                if not has_parent:
                    slots["task_again"] = Slot.number(22)
                    slots["after_node"] = Slot.text("after_node")
            if kind == "list":
                slots["limit"] = Slot.number(23)
            slots.update(_term_slots(terms))
            build = partial(_listing_query, kind == "count", has_parent, has_after, terms)
            prepared = Prepared(self.db, build, **slots)
            if len(self._listings) < MAX_LISTING_SHAPES:
                self._listings[key] = prepared
        return prepared

    def stamp(self, task_id: int, node_id: str) -> tuple[str, int] | None:
        """What a reply about the task is built from, stamped: the task's digest and the
        catalog stamp (server.db.models). None for no such task. One stamp covers every
        node of a task: an import replaces a task whole.

        A session reads each task's stamp once: a batch of a task's nodes (or the watch
        hub's re-reads of a task's renderings) costs one stamp statement, not one a node.
        Each node's reply is still as new as the stamp: read after it (its snapshot
        begins later), and a reply newer than its stamp is only ever missed later, when
        the stamp moves, never served stale (server.cache)."""
        call = self._this.call
        kept = call.stamps
        if kept is not None and task_id in kept:
            return kept[task_id]
        rows = self._read("stamp", self._stamp, False, task_id=task_id)
        stamp = (rows[0][0], rows[0][1]) if rows else None
        if kept is not None:
            kept[task_id] = stamp
        return stamp

    def stamp_ahead(self, keys: Sequence[tuple[int, str]]) -> None:
        """Nothing: this store's stamp is its task's, read once a session (stamp), so a
        batch already reads one stamp a task."""

    def _model_rows(self, query: Any) -> list[tuple[Any, ...]]:
        """The rows of a peewee model query, run on the call's node: the models are
        bound to the primary, and with replicas the call may be reading another."""
        return list(query.bind(self.db).tuples())

    def task_changes(self, known: Mapping[int, Hashable | None]) -> dict[int, TaskState]:
        """The tasks of known whose stamp is no longer the one given, each with its new
        stamp and every node's summary: the change detection of watch streams
        (server.watch), one poll for every task a process watches.

        Here the stamp is the task's digest with the catalog stamp (what Store.stamp
        reads: every write to the task's rows changes the digest), read for all the
        tasks at once; the nodes are then read only for the tasks whose stamp moved.
        So an idle poll costs one indexed statement per WATCH_BATCH tasks, whatever
        the number of streams.
        """
        stamps: dict[int, Hashable | None] = dict.fromkeys(known)
        ids = list(known)
        for start in range(0, len(ids), WATCH_BATCH):
            batch = ids[start : start + WATCH_BATCH]
            for task_id, digest, catalog in self.read(
                partial(self._model_rows, _stamps_query(batch)), True, "watch_stamps"
            ):
                stamps[task_id] = (digest, catalog)
        changed = [task_id for task_id in ids if stamps[task_id] != known[task_id]]
        nodes: dict[int, list[ListedRow]] = {task_id: [] for task_id in changed}
        present = [task_id for task_id in changed if stamps[task_id] is not None]
        for start in range(0, len(present), WATCH_BATCH):
            batch = present[start : start + WATCH_BATCH]
            for task_id, *row in self.read(
                partial(self._model_rows, _summaries_query(batch)), True, "watch_nodes"
            ):
                row[3] = tuple(values.loads(row[3]))
                nodes[task_id].append(ListedRow(*row))
        self.end_snapshot()
        return {task_id: TaskState(stamps[task_id], tuple(nodes[task_id])) for task_id in changed}

    def catalog_stamp(self) -> int:
        """The catalog stamp alone (projects and schemas; server.db.models), for a store
        that reads tasks elsewhere and schemas here (server.db.bksops)."""
        rows = self._read("catalog_stamp", self._catalog_stamp, False)
        return int(rows[0][0]) if rows else 0

    def business_of_project(self, project_id: int) -> int | None:
        """The business a project belongs to; None for no such project or none."""
        rows = self._read(
            "business_of_project", self._business_of_project, False, project_id=project_id
        )
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def attempts(self, task_id: int, node_id: str, loop: int) -> list[AttemptRow]:
        """The node's earlier attempts in one loop, oldest first."""
        rows = self._read(
            "attempts", self._attempts, True, task_id=task_id, node_id=node_id, loop=loop
        )
        return [
            AttemptRow(
                id_,
                loop_,
                retry,
                bool(skip),
                version,
                state,
                started,
                finished,
                inputs,
                outputs,
                ex_data,
            )
            for (
                id_,
                loop_,
                retry,
                skip,
                version,
                state,
                started,
                finished,
                inputs,
                outputs,
                ex_data,
            ) in rows
        ]

    def children(self, task_id: int, node_id: str) -> list[ChildRow]:
        """The direct children of a sub-process node that have run, in stored order."""
        rows = self._read("children", self._children, True, task_id=task_id, node_id=node_id)
        return [
            ChildRow(
                child,
                name,
                state,
                loop,
                retry,
                bool(skip),
                bool(ignored),
                version,
                started,
                finished,
            )
            for (child, name, state, loop, retry, skip, ignored, version, started, finished) in rows
        ]

    def output_schema(self, code: str, version: str) -> list[tuple[str, str]]:
        """The declared outputs of a plugin at a version as (key, name), in order."""
        rows = self._read("output_schema", self._output_schema, True, code=code, version=version)
        if not rows:
            raise errors.ComponentNotFound(
                f"component {code} has no output schema at version {version}",
                {"componentCode": code, "componentVersion": version},
            )
        return [(key, name) for key, name in values.loads(rows[0][0])]

    def _prepare(self) -> None:
        """Build the SQL of every query shape once (see server.db.prepared)."""
        text, number = Slot.text, Slot.number
        ids: dict[str, str | int] = {
            "biz_id": number(1),
            "task_id": number(2),
            "node_id": text("node_id"),
        }
        self._node_queries = {
            (by_project_id, heavy): Prepared(
                self.db, partial(_node_query, by_project_id, heavy), **ids
            )
            for by_project_id in (False, True)
            for heavy in (False, True)
        }
        self._task_queries = {
            by_project_id: Prepared(
                self.db, partial(_task_query, by_project_id), biz_id=number(1), task_id=number(2)
            )
            for by_project_id in (False, True)
        }
        self._listings: dict[tuple[Any, ...], Prepared] = {}
        self._stamp = Prepared(
            self.db,
            lambda task_id: Task.select(
                Task.digest,
                CatalogStamp.select(CatalogStamp.stamp).where(CatalogStamp.id == 1),
            ).where(Task.id == task_id),
            task_id=number(7),
        )
        self._catalog_stamp = Prepared(
            self.db,
            lambda: CatalogStamp.select(CatalogStamp.stamp).where(CatalogStamp.id == 1),
        )
        self._business_of_project = Prepared(
            self.db,
            lambda project_id: Project.select(Project.bk_biz_id).where(Project.id == project_id),
            project_id=number(3),
        )
        self._attempts = Prepared(
            self.db, _attempts_query, task_id=number(4), node_id=text("node_id"), loop=number(5)
        )
        self._children = Prepared(
            self.db, _children_query, task_id=number(6), node_id=text("node_id")
        )
        self._output_schema = Prepared(
            self.db,
            lambda code, version: ComponentSchema.select(ComponentSchema.outputs).where(
                (ComponentSchema.code == code) & (ComponentSchema.version == version)
            ),
            code=text("code"),
            version=text("version"),
        )


def _node_query(by_project_id: bool, heavy: bool, biz_id: int, task_id: int, node_id: str) -> Any:
    owner = Project.id == biz_id if by_project_id else Project.bk_biz_id == biz_id
    columns = _NODE_COLUMNS if heavy else _NODE_COLUMNS[: -len(_NO_HEAVY_COLUMNS)]
    return (
        Project.select(Project.id, Task.id, *columns)
        .join(
            Task,
            JOIN.LEFT_OUTER,
            on=(Task.project == Project.id) & (Task.id == task_id) & (Task.deleted == False),  # noqa: E712
        )
        .join(Node, JOIN.LEFT_OUTER, on=(Node.task == Task.id) & (Node.node_id == node_id))
        .where(owner)
        .limit(1)
    )


def _task_query(by_project_id: bool, biz_id: int, task_id: int) -> Any:
    owner = Project.id == biz_id if by_project_id else Project.bk_biz_id == biz_id
    return (
        Project.select(Project.id, Task.id)
        .join(
            Task,
            JOIN.LEFT_OUTER,
            on=(Task.project == Project.id) & (Task.id == task_id) & (Task.deleted == False),  # noqa: E712
        )
        .where(owner)
        .limit(1)
    )


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_TERM_COLUMNS: dict[str, Any] = {
    "state": Node.state,
    "component_code": Node.component_code,
    "loop": Node.loop,
    "retry": Node.retry,
    "started_at": Node.started_at,
    "finished_at": Node.finished_at,
}
#: A node that has not run has no state stored, and is READY.
_READY = "READY"


def _shape(terms: tuple[Term, ...]) -> tuple[tuple[str, str, bool], ...]:
    """What of a filter shapes its SQL: each term's column and operator, and whether it
    compares the state with READY (which a NULL state is)."""
    return tuple((t.column, t.op, t.column == "state" and t.value == _READY) for t in terms)


def _term_slots(terms: tuple[Term, ...]) -> dict[str, str | int]:
    return {
        f"term{i}": Slot.text(f"term{i}") if isinstance(t.value, str) else Slot.number(30 + i)
        for i, t in enumerate(terms)
        if not (t.column == "state" and t.value == _READY)
    }


def _term_values(terms: tuple[Term, ...]) -> dict[str, object]:
    return {
        f"term{i}": t.value
        for i, t in enumerate(terms)
        if not (t.column == "state" and t.value == _READY)
    }


def _term_condition(term: Term, value: object) -> Any:
    column = _TERM_COLUMNS[term.column]
    if term.column != "state":
        return _COMPARE[term.op](column, value)
    if term.value == _READY:
        ready = column.is_null() | (column == _READY)
        return ready if term.op == "=" else (column.is_null(False) & (column != _READY))
    if term.op == "=":
        return column == value
    return column.is_null() | (column != value)


def _listing_query(
    count: bool,
    has_parent: bool,
    has_after: bool,
    terms: tuple[Term, ...],
    task_id: int,
    parent: str = "",
    after: int = 0,
    task_again: int = 0,
    after_node: str = "",
    limit: int = 0,
    **term_values: object,
) -> Any:
    condition = Node.task == task_id
    if has_parent:
        condition &= Node.parent_node_id == parent
    for i, term in enumerate(terms):
        condition &= _term_condition(term, term_values.get(f"term{i}"))
    if count:
        return Node.select(fn.COUNT(Node.id)).where(condition)
    if has_after and has_parent:
        condition &= Node.position > after
    elif has_after:
        anchor = Node.alias("anchor")
        anchored = anchor.select(anchor.id).where(
            (anchor.task == task_again) & (anchor.node_id == after_node)
        )
        condition &= Node.id > fn.COALESCE(anchored, after)
    order = (Node.position, Node.id) if has_parent else (Node.id,)
    return Node.select(*_LISTED_COLUMNS).where(condition).order_by(*order).limit(limit)


def _stamps_query(task_ids: list[int]) -> Any:
    """The stamp (digest, catalog stamp) of each of the tasks that is not deleted."""
    return Task.select(
        Task.id,
        Task.digest,
        CatalogStamp.select(CatalogStamp.stamp).where(CatalogStamp.id == 1),
    ).where(Task.id.in_(task_ids) & (Task.deleted == False))  # noqa: E712


def _summaries_query(task_ids: list[int]) -> Any:
    """Every node of the tasks as ListedRow holds it, after its task id, in stored order."""
    return (
        Node.select(Node.task, *_LISTED_COLUMNS)
        .where(Node.task.in_(task_ids))
        .order_by(Node.task, Node.id)
    )


def _attempts_query(task_id: int, node_id: str, loop: int) -> Any:
    return (
        Attempt.select(
            fn.COALESCE(Attempt.history_id, Attempt.id),
            Attempt.loop,
            Attempt.retry,
            Attempt.skip,
            Attempt.version,
            Attempt.state,
            Attempt.started_at,
            Attempt.finished_at,
            Attempt.inputs,
            Attempt.outputs,
            Attempt.ex_data,
        )
        .where((Attempt.task == task_id) & (Attempt.node_id == node_id) & (Attempt.loop == loop))
        .order_by(Attempt.id)
    )


def _children_query(task_id: int, node_id: str) -> Any:
    return (
        Node.select(
            Node.node_id,
            Node.name,
            Node.state,
            Node.loop,
            Node.retry,
            Node.skip,
            Node.error_ignored,
            Node.version,
            Node.started_at,
            Node.finished_at,
        )
        .where(
            (Node.task == task_id) & (Node.parent_node_id == node_id) & Node.state.is_null(False)
        )
        .order_by(Node.position)
    )


def _system(db: Database) -> str:
    """OpenTelemetry's name (db.system.name) for db's kind of database."""
    if isinstance(db, PostgresqlDatabase):
        return "postgresql"
    if isinstance(db, MySQLDatabase):
        return "mysql"
    return "sqlite"


def _snapshot_statement(db: Database) -> str:
    """The BEGIN of a read-only transaction whose queries all read one snapshot.

    PostgreSQL's default READ COMMITTED takes a snapshot per statement, hence
    REPEATABLE READ. MySQL's session is set to REPEATABLE READ when it connects
    (connection._server). SQLite's deferred BEGIN reads one snapshot of the WAL
    from its first SELECT on.
    """
    if isinstance(db, PostgresqlDatabase):
        return "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
    if isinstance(db, MySQLDatabase):
        return "START TRANSACTION READ ONLY"
    return "BEGIN"


def _cannot_interrupt(conn: Any) -> None:
    """A database with no way to interrupt a connection: its own timeouts bound it."""


@contextmanager
def unavailable_on_db_error() -> Iterator[None]:
    """Turn the database's own errors into StoreUnavailable, logging the cause."""
    try:
        yield
    except (peewee.DatabaseError, peewee.InterfaceError) as exc:
        log.warning("database error: %s: %s", type(exc).__name__, exc)
        raise errors.StoreUnavailable("the node store is unavailable; retry later") from exc
