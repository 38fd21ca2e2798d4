"""Pooled connections on PostgreSQL and MariaDB: surviving a database restart, and bounds.

The database "restarts" behind a TCP proxy (tests/tcp_proxy.py) between our
server and the shared database server, which keeps running for everyone else.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.app import Server
from server.app import create_server
from server.config import Config
from tests.conftest import ALL_APP
from tests.conftest import SEED_NODE
from tests.conftest import STORES
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.parametrize(
    "database_url", [s for s in STORES if s != "sqlite"], indirect=True
)

#: Connections the pool may hold; fewer than the server's worker threads on purpose.
POOL_SIZE = 2


@dataclass
class Proxied:
    """A started server whose database connections all pass through proxy."""

    server: Server
    proxy: TcpProxy
    stub: pb_grpc.TaskNodeServiceStub

    def call_ok(self) -> None:
        assert self.stub.GetTaskNodeDetail(seed_request(), timeout=10).id == SEED_NODE

    def call_error(self) -> tuple[grpc.StatusCode, str]:
        """The code and ErrorInfo reason of a call that must fail."""
        with pytest.raises(grpc.RpcError) as failed:
            self.stub.GetTaskNodeDetail(seed_request(), timeout=10)
        status = rpc_status.from_call(failed.value)
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(info)
        return failed.value.code(), info.reason


def through(url: str, port: int) -> str:
    """url with its host and port replaced by the proxy's, and the pool size set."""
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0]
    query = f"{parts.query}&max_connections={POOL_SIZE}".lstrip("&")
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}", query=query))


@pytest.fixture
def proxied(demo_config: Config) -> Iterator[Proxied]:
    upstream = urlsplit(demo_config.database_url)
    assert upstream.hostname and upstream.port
    with TcpProxy(upstream.hostname, upstream.port) as proxy:
        config = dataclasses.replace(
            demo_config,
            database_url=through(demo_config.database_url, proxy.port),
            grpc_workers=8,
        )
        server = create_server(config)
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.TaskNodeServiceStub(authorized(channel, ALL_APP))
                yield Proxied(server, proxy, stub)
        finally:
            server.stop(None)


def fill_pool(server: Server) -> None:
    """Leave POOL_SIZE idle connections in the server's pool."""
    db = server.store.db
    together = threading.Barrier(POOL_SIZE, timeout=10)

    def hold() -> None:
        db.connect()
        together.wait()
        db.close()

    threads = [threading.Thread(target=hold) for _ in range(POOL_SIZE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


def test_stale_pooled_connections_do_not_fail_calls_after_a_restart(proxied: Proxied) -> None:
    fill_pool(proxied.server)
    assert proxied.proxy.live == POOL_SIZE
    proxied.proxy.cut()  # the database restarts while the pool is idle...
    proxied.proxy.restore()  # ...and is back before the next call
    for _ in range(5):
        proxied.call_ok()
    # The first call threw the dead connections away and opened one that the rest reused.
    assert proxied.proxy.accepted == POOL_SIZE + 1


def test_calls_during_an_outage_are_unavailable_and_later_ones_succeed(
    proxied: Proxied,
) -> None:
    proxied.call_ok()
    proxied.proxy.cut()
    assert proxied.call_error() == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert proxied.call_error() == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    proxied.proxy.restore()
    proxied.call_ok()
    with futures.ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(proxied.call_ok) for _ in range(20)]:
            done.result(timeout=30)


def test_a_call_makes_no_round_trip_beyond_its_statements(proxied: Proxied) -> None:
    """No liveness ping at checkout, no ROLLBACK at check-in: the BEGIN is the probe."""
    statements = []
    proxied.server.store.db.query_hooks.append(lambda event: statements.append(event.sql))
    proxied.call_ok()  # connects, and verifies the app's credentials once
    before = proxied.proxy.requests
    statements.clear()
    for _ in range(5):
        proxied.call_ok()
    assert statements, "the calls ran no statement"
    assert proxied.proxy.requests - before == len(statements), statements


def test_each_call_holds_one_connection_and_gives_it_back(
    proxied: Proxied, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(10):
        proxied.call_ok()
    assert proxied.proxy.accepted == 1, "sequential calls reuse one pooled connection"

    # Eight callers, served by eight server threads, share POOL_SIZE connections: each
    # call holds one at a time and gives it back, or the others would wait out the
    # pool's timeout and fail.
    store = proxied.server.store
    calls = Gauge()
    session = store.session

    @contextmanager
    def counted(deadline: float | None = None) -> Iterator[None]:
        with calls, session(deadline):
            yield

    monkeypatch.setattr(store, "session", counted)
    with futures.ThreadPoolExecutor(8) as pool:
        for done in [pool.submit(proxied.call_ok) for _ in range(80)]:
            done.result(timeout=30)
    assert calls.peak > POOL_SIZE, "the calls did not overlap enough to test the bound"
    assert proxied.proxy.peak <= POOL_SIZE
    assert proxied.proxy.accepted <= POOL_SIZE


class Gauge:
    """Counts the threads inside a with block, and the most at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1
