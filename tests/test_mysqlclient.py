"""MySQL through mysqlclient (`driver=mysqlclient` in the URL): it serves, and a partition
between it and the database ends calls by their deadline and heals, as with PyMySQL.

The partition scenario is test_partition's own, on a server whose URL names the C driver: its
watchdog shuts libmariadb's socket (PooledMySQLClientDatabase.interrupt) instead of PyMySQL's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from urllib.parse import urlsplit

import grpc
import MySQLdb
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.app import create_server
from server.config import Config
from server.db.connection import DatabaseURLError
from server.db.connection import open_database
from server.db.pool import PooledMySQLClientDatabase
from server.gateway.local import LocalBackend
from tests.conftest import ALL_APP
from tests.conftest import SEED_NODE
from tests.conftest import STORES
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.gateway.conftest import running_shim
from tests.tcp_proxy import TcpProxy
from tests.test_partition import GUARD
from tests.test_partition import RECOVERY
from tests.test_partition import STORE_TIMEOUT
from tests.test_partition import WORKERS
from tests.test_partition import Partitioned
from tests.test_partition import Sessions
from tests.test_partition import partition_and_heal
from tests.test_partition import within
from tests.test_pool import Proxied
from tests.test_pool import through

pytestmark = pytest.mark.parametrize(
    "database_url", [s for s in STORES if s == "mysql"], indirect=True
)


def with_driver(url: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}driver=mysqlclient"


def test_the_c_driver_serves(demo_config: Config) -> None:
    config = dataclasses.replace(demo_config, database_url=with_driver(demo_config.database_url))
    server = create_server(config)
    server.start()
    try:
        assert isinstance(server.store.db, PooledMySQLClientDatabase)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TaskNodeServiceStub(authorized(channel, ALL_APP))
            assert stub.GetTaskNodeDetail(seed_request(), timeout=10).id == SEED_NODE
        with server.store.db.connection_context():
            assert isinstance(server.store.db.connection(), MySQLdb.connections.Connection)
    finally:
        server.stop(None)


def test_only_known_drivers_for_mysql(database_url: str) -> None:
    with pytest.raises(DatabaseURLError):
        open_database(f"{database_url}?driver=odbc")
    pg = "postgresql://postgres@127.0.0.1:5432/test?driver=mysqlclient"
    with pytest.raises(DatabaseURLError):
        open_database(pg)


@pytest.fixture
def partitioned(demo_config: Config) -> Iterator[Partitioned]:
    upstream = urlsplit(demo_config.database_url)
    assert upstream.hostname and upstream.port
    with TcpProxy(upstream.hostname, upstream.port) as proxy:
        config = dataclasses.replace(
            demo_config,
            database_url=with_driver(through(demo_config.database_url, proxy.port)),
            grpc_workers=WORKERS,
            store_timeout_seconds=STORE_TIMEOUT,
        )
        server = create_server(config)
        assert isinstance(server.store.db, PooledMySQLClientDatabase)
        server.start()
        backend = LocalBackend(server.handlers, server.workers)
        try:
            with (
                grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
                running_shim(config, backend) as shim,
            ):
                stub = pb_grpc.TaskNodeServiceStub(authorized(channel, ALL_APP))
                yield Partitioned(Proxied(server, proxy, stub), channel, shim.url)
        finally:
            proxy.cut()
            server.stop(None)


def test_a_partition_ends_calls_by_their_deadline_and_heals(
    partitioned: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = partitioned.proxied.server.store
    sessions = Sessions()
    monkeypatch.setattr(store, "session", sessions.around(store))
    report = within(GUARD, lambda: partition_and_heal(partitioned, sessions))
    assert report["recovery"] < RECOVERY, report
