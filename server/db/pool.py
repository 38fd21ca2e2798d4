"""Connection pools that cost no round trip to check out and wait no longer than asked.

playhouse.pool asks the server whether a pooled connection is alive at every
checkout (``SELECT 1`` on PostgreSQL, a ping on MySQL) and, on MySQL, sends a
``ROLLBACK`` at every check-in: one or two round trips on every call. The store
needs neither. Each call's first statement is the liveness probe (Store._read):
when it finds a pooled connection dead (the database restarted under us), the
store throws that connection and the pool's other idle ones away and runs the
statement once more on a new connection, before anything else of the call has run.

So a checkout here only looks at what the driver already knows without asking
the server, and a check-in rolls back only a transaction the server said is
open. ``_is_closed`` and ``_can_reuse`` are the hooks playhouse.pool's own
database classes override for the same purpose.

A checkout also ends by the time its caller gives (BoundedPool.connect_by). peewee
opens a new connection while holding the database's lock and the pool's, so one
connect to a database that does not answer stalled every checkout and check-in of
the process until it timed out; here a connect runs on a thread of its own, under
no lock, and a caller out of time leaves it behind (a connection it opens later
joins the pool). ``interrupt`` shuts a connection's socket from another thread,
so a call blocked reading from a silent database gets an error at once
(server.db.store's watchdog).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import socket
import threading
import time
from typing import Any

import peewee
import pymysql
from playhouse import pool
from playhouse.pool import MaxConnectionsExceeded
from playhouse.pool import PoolConnection
from psycopg2 import extensions
from pymysql import MySQLError
from pymysql.constants import SERVER_STATUS

log = logging.getLogger(__name__)

#: TCP keepalive of server connections: probe one idle this long, then every interval,
#: and give it up after count probes unanswered.
KEEPALIVE_IDLE_SECONDS = 10
KEEPALIVE_INTERVAL_SECONDS = 5
KEEPALIVE_COUNT = 3
#: Seconds sent data may stay unacknowledged before the kernel gives the connection up.
TCP_USER_TIMEOUT_SECONDS = KEEPALIVE_IDLE_SECONDS + KEEPALIVE_INTERVAL_SECONDS * KEEPALIVE_COUNT


#: Connects a pool lets run on after their callers stopped waiting (a database that
#: does not answer holds each for its connect timeout); beyond them a caller waits for
#: one to end, so a partition costs a bounded number of threads.
LEFT_BEHIND_LIMIT = 32


class OutOfTime(MaxConnectionsExceeded):
    """No connection could be had by the time the caller gave."""


class NoAnswer(OutOfTime):
    """The database did not accept a new connection by the time the caller gave (rather
    than every pooled connection staying in use): the server, not the pool, is at fault."""


class BoundedPool(pool.PooledDatabase):
    """A pool whose checkouts end by a given time and whose connects hold no lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opening = 0  # connects under way for a caller still waiting on them
        self._left_behind = 0  # connects under way that nobody waits for any more

    def connect(self, reuse_if_open: bool = False) -> bool:
        """peewee's connect: waiting at most the pool's timeout for a free connection, and
        for a new one as long as the driver's own timeouts allow."""
        return self._connect_by(time.monotonic() + (self._wait_timeout or 0), None, reuse_if_open)

    def connect_by(self, until: float, reuse_if_open: bool = False) -> bool:
        """Give this thread a connection, pooled or new, by time.monotonic() until;
        OutOfTime if none can be had by then."""
        return self._connect_by(until, until, reuse_if_open)

    def _connect_by(self, until: float, open_until: float | None, reuse_if_open: bool) -> bool:
        if self.deferred:
            raise peewee.InterfaceError("the database must be initialised before connecting")
        if not self._state.closed:
            if reuse_if_open:
                return False
            raise peewee.OperationalError("Connection already opened.")
        with peewee.__exception_wrapper__:  # type: ignore[attr-defined]  # driver errors as peewee's
            conn = self._checkout(until, open_until)
            with self._lock:
                self._state.reset()
                self._state.set_connection(conn)
                if self.server_version is None:
                    self._set_server_version(conn)
                self._initialize_connection(conn)
        return True

    def _checkout(self, until: float, open_until: float | None) -> Any:
        """A pooled connection, or a new one; one is waited for until, a connect until
        open_until (None: inline, bounded by the driver alone)."""
        with self._pool_available:
            while True:
                conn = self._take_idle()
                if conn is not None:
                    return conn
                if (
                    self._room(len(self._in_use) + self._opening)
                    and self._left_behind < LEFT_BEHIND_LIMIT
                ):
                    self._opening += 1
                    break
                left = until - time.monotonic()
                if left <= 0:
                    raise OutOfTime("every pooled connection stayed in use")
                self._pool_available.wait(left)
        conn = None
        try:
            conn = self._open() if open_until is None else _Connect(self).result(open_until)
        finally:
            with self._pool_available:
                self._opening -= 1
                if conn is None:
                    self._pool_available.notify()
                else:
                    now = time.time()
                    self._in_use[self.conn_key(conn)] = PoolConnection(now, conn, now)
        return conn

    def _room(self, held: int) -> bool:
        """Whether the pool may hold one connection more than held (0: no limit)."""
        return not self._max_connections or held < self._max_connections

    def _take_idle(self) -> Any:
        """An idle connection, now in use, or None; the pool's lock is held."""
        while self._connections:
            stamp, _, conn = heapq.heappop(self._connections)
            if self._is_closed(conn):
                continue
            if self._stale_timeout and self._is_stale(stamp):
                self._close_raw(conn)
                continue
            self._in_use[self.conn_key(conn)] = PoolConnection(stamp, conn, time.time())
            return conn
        return None

    def _left(self) -> None:
        """A caller stopped waiting for its connect, which runs on."""
        with self._pool_available:
            self._left_behind += 1

    def _back(self, conn: Any) -> None:
        """A connect left behind ended: pool its connection if it opened one and there is
        room, else close it."""
        with self._pool_available:
            self._left_behind -= 1
            self._pool_available.notify()
            if conn is None:
                return
            if self._room(len(self._connections) + len(self._in_use) + self._opening):
                self._heap_counter += 1
                heapq.heappush(self._connections, (time.time(), self._heap_counter, conn))
                return
        self._close_raw(conn)

    def manual_close(self) -> bool:
        """Close this thread's connection for good, and let a waiting caller open another."""
        closed = bool(super().manual_close())
        with self._pool_available:
            self._pool_available.notify()
        return closed

    def _open(self) -> Any:
        """A new driver connection (the database class's own connect)."""
        return super(pool.PooledDatabase, self)._connect()

    def interrupt(self, conn: Any) -> None:
        """Make whatever a thread is doing on conn fail at once; called from another thread."""


class _Connect:
    """One connect on a thread of its own, which its caller may stop waiting for."""

    def __init__(self, db: BoundedPool) -> None:
        self.db = db
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.abandoned = False
        self.conn: Any = None
        self.error: BaseException | None = None
        threading.Thread(target=self._run, name="db-connect", daemon=True).start()

    def result(self, until: float) -> Any:
        """The new connection; its error; or OutOfTime at until."""
        if not self.done.wait(max(0.0, until - time.monotonic())):
            with self.lock:
                self.abandoned = not self.done.is_set()
                if self.abandoned:
                    self.db._left()
            if self.abandoned:
                raise NoAnswer("the database did not accept a connection in time")
        if self.error is not None:
            raise self.error
        return self.conn

    def _run(self) -> None:
        conn = None
        try:
            conn = self.db._open()
        except BaseException as exc:  # handed to the waiting caller, or logged
            self.error = exc
        with self.lock:
            self.conn = conn
            self.done.set()
            abandoned = self.abandoned
        if abandoned:
            if self.error is not None:
                log.info("a connect nobody waited for any more failed: %s", self.error)
            self.db._back(conn)


class WatchedConnection(extensions.connection):
    """A psycopg2 connection with a handle of its own on its socket.

    The handle (a duplicate of libpq's descriptor) is what interrupt shuts: libpq may
    close its own descriptor at any moment from the thread it serves, and the number
    may then name another socket, while the handle names this one until it is closed
    with the connection.
    """

    handle: socket.socket | None = None

    def __del__(self) -> None:
        # A connection dropped without close() (a test's, an abandoned one) takes its
        # handle with it.
        if self.handle is not None:
            self.handle.close()


class PooledPostgresqlDatabase(BoundedPool, pool.PooledPostgresqlDatabase):
    """A PostgreSQL pool whose checkout trusts psycopg2's own view of the connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, connection_factory=WatchedConnection, **kwargs)

    def _open(self) -> Any:
        conn = super()._open()
        conn.handle = socket.socket(fileno=os.dup(conn.fileno()))
        return conn

    def _close_raw(self, conn: Any) -> None:
        super()._close_raw(conn)
        if conn.handle is not None:
            conn.handle.close()

    def _is_closed(self, conn: Any) -> bool:
        # psycopg2 marks a connection closed, or its status unknown, once it saw it fail.
        return bool(conn.closed) or (
            conn.get_transaction_status() == extensions.TRANSACTION_STATUS_UNKNOWN
        )

    def interrupt(self, conn: Any) -> None:
        if conn.handle is not None:
            _shut(conn.handle)


class PooledMySQLDatabase(BoundedPool, pool.PooledMySQLDatabase):
    """A MySQL pool that neither pings at checkout nor rolls back a clean connection,
    and whose new connections give up on a silent server after connect_timeout.

    Given several (host, port) addresses (a Galera cluster, whose every node takes
    writes), a new connection goes to the first that accepts one, starting with the
    last that did: pymysql has no failover of its own, unlike libpq's host lists.
    """

    connect_params: dict[str, Any]

    def __init__(
        self,
        *args: Any,
        statement_timeout: float | None = None,
        addresses: tuple[tuple[str, int], ...] = (),
        wsrep_sync_wait: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        #: Seconds the server may spend on a statement (MariaDB's max_statement_time).
        self.statement_timeout = statement_timeout
        #: Galera's causality checks for each session (1: a read first waits until the node
        #: has applied every write the cluster committed before it); None: the server's.
        self.wsrep_sync_wait = wsrep_sync_wait
        #: Where new connections go, in the order to try them (empty: host and port).
        self.addresses = addresses

    def _open(self) -> Any:
        """A new connection to the first of the addresses that accepts one."""
        addresses = self.addresses
        if len(addresses) < 2:
            return self._open_at(None)
        failure: BaseException | None = None
        for host, port in addresses:
            try:
                conn = self._open_at((host, port))
            except (MySQLError, OSError) as exc:
                failure = exc
                continue
            if addresses[0] != (host, port):  # the next connect tries this one first
                self.addresses = ((host, port), *(a for a in addresses if a != (host, port)))
            return conn
        assert failure is not None
        raise failure

    def _open_at(self, address: tuple[str, int] | None) -> Any:
        # pymysql bounds only the TCP connect by connect_timeout, and reads the server's
        # greeting under read_timeout (none by default): a server that accepts and never
        # answers would hold the connecting thread for good. Bound the handshake too,
        # then give the connection the configured read timeout (pymysql applies it per
        # read). pymysql turns SO_KEEPALIVE on; its timings are the kernel's (hours).
        params = self.connect_params
        if address is not None:
            params = {**params, "host": address[0], "port": address[1]}
        read_timeout = params.get("read_timeout")
        conn = pymysql.connect(
            database=self.database,
            autocommit=True,
            **{**params, "read_timeout": read_timeout or params["connect_timeout"]},
        )
        conn._read_timeout = read_timeout
        if conn._sock is not None:
            _keep_alive(conn._sock)
        self._set_session(conn)
        return conn

    def _set_session(self, conn: Any) -> None:
        """conn's session settings: wsrep_sync_wait, if the URL asks for it, and the
        server's limit on each statement (the store's timeout)."""
        if self.wsrep_sync_wait is not None:
            with conn.cursor() as cursor:
                cursor.execute("SET SESSION wsrep_sync_wait = %s", (self.wsrep_sync_wait,))
        if self.statement_timeout:
            with conn.cursor() as cursor:
                if "MariaDB" in conn.get_server_info():
                    cursor.execute("SET SESSION max_statement_time = %s", (self.statement_timeout,))
                else:  # MySQL's own, in ms, for SELECTs
                    cursor.execute(
                        "SET SESSION max_execution_time = %s", (int(self.statement_timeout * 1000),)
                    )

    def interrupt(self, conn: Any) -> None:
        sock = conn._sock  # pymysql's socket object, closed (not reused) once pymysql drops it
        if sock is not None:
            _shut(sock)

    def _is_closed(self, conn: Any) -> bool:
        # pymysql drops its socket as soon as a read or write on it fails.
        return not conn.open

    def _can_reuse(self, conn: Any) -> bool:
        if not conn.open:
            return False
        if conn.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS:
            try:
                conn.rollback()
            except (MySQLError, OSError):
                return False
        return True


class PooledMySQLClientDatabase(PooledMySQLDatabase):
    """PooledMySQLDatabase on mysqlclient (MySQLdb, libmariadb in C) instead of PyMySQL: a
    statement costs the calling thread about half the CPU (docs/bksops-store.md), and the
    driver releases the GIL while it waits on the server. Chosen by `driver=mysqlclient` in
    the URL (server.db.connection)."""

    def _open_at(self, address: tuple[str, int] | None) -> Any:
        import MySQLdb  # imported by the URLs that ask for it only

        params = dict(self.connect_params)
        if address is not None:
            params.update(host=address[0], port=address[1])
        for seconds in ("connect_timeout", "read_timeout", "write_timeout"):
            if params.get(seconds) is not None:  # libmariadb counts whole seconds
                params[seconds] = max(1, math.ceil(float(params[seconds])))
        # libmariadb keeps the read timeout a connection is opened with: the configured one
        # (a serving store's), or none (loads, which may run long statements).
        conn = MySQLdb.connect(database=self.database, autocommit=True, **params)
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            _keep_alive(sock)  # the duplicate shares the connection's socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        finally:
            sock.close()  # the duplicate only: the connection keeps its own descriptor
        self._set_session(conn)
        return conn

    def interrupt(self, conn: Any) -> None:
        try:
            sock = socket.socket(fileno=os.dup(conn.fileno()))
        except Exception:  # closed already (MySQLdb's own error): nothing to interrupt
            return
        try:
            _shut(sock)  # shuts the connection's socket down: the duplicate shares it
        finally:
            sock.close()

    def _is_closed(self, conn: Any) -> bool:
        return not conn.open

    def _can_reuse(self, conn: Any) -> bool:
        # The store ends every transaction it begins (Store._end) before check-in.
        return bool(conn.open)


def _keep_alive(sock: socket.socket) -> None:
    """TCP keepalive and user timeout of a server connection's socket (module docstring)."""
    if sock.family == socket.AF_UNIX:
        return
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_SECONDS * 1000),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _shut(sock: socket.socket) -> None:
    """Shut sock down both ways: a read blocked on it returns, a later one fails."""
    with contextlib.suppress(OSError):  # closed or not connected any more: as good as shut
        sock.shutdown(socket.SHUT_RDWR)
