"""Connection pools for PostgreSQL and MySQL that cost no round trip to check out.

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
"""

from __future__ import annotations

from typing import Any

from playhouse import pool
from psycopg2 import extensions
from pymysql import MySQLError
from pymysql.constants import SERVER_STATUS


class PooledPostgresqlDatabase(pool.PooledPostgresqlDatabase):
    """A PostgreSQL pool whose checkout trusts psycopg2's own view of the connection."""

    def _is_closed(self, conn: Any) -> bool:
        # psycopg2 marks a connection closed, or its status unknown, once it saw it fail.
        return bool(conn.closed) or (
            conn.get_transaction_status() == extensions.TRANSACTION_STATUS_UNKNOWN
        )


class PooledMySQLDatabase(pool.PooledMySQLDatabase):
    """A MySQL pool that neither pings at checkout nor rolls back a clean connection,
    and whose new connections give up on a silent server after connect_timeout."""

    connect_params: dict[str, Any]

    def _connect(self) -> Any:
        # pymysql bounds only the TCP connect by connect_timeout, and reads the server's
        # greeting under read_timeout (none by default): a server that accepts and never
        # answers would hold the calling thread for good. Bound the handshake too, then
        # give the connection the configured read timeout (pymysql applies it per read).
        params = self.connect_params
        read_timeout = params.get("read_timeout")
        self.connect_params = {**params, "read_timeout": read_timeout or params["connect_timeout"]}
        try:
            conn = super()._connect()
        finally:
            self.connect_params = params
        conn._read_timeout = read_timeout
        return conn

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
