"""A network partition between the server and its database: calls end by their deadline,
health and reflection keep answering, and the service answers again soon after it heals.

The partition is a blackhole in a TCP proxy of our own (tests/tcp_proxy.py): no byte
passes, nothing is refused or reset, and the connections open during it stay dead
after it heals, as after a database failover or a lost conntrack entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent import futures
from contextlib import AbstractContextManager
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc
from playhouse.pool import PooledDatabase

from server.app import create_server
from server.config import Config
from server.db.connection import open_database
from server.db.store import Store
from server.gateway.local import LocalBackend
from tests.conftest import ALL_APP
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.conftest import STORES
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.gateway.conftest import running_shim
from tests.tcp_proxy import TcpProxy
from tests.test_pool import Proxied
from tests.test_pool import through

pytestmark = pytest.mark.parametrize(
    "database_url", [s for s in STORES if s != "sqlite"], indirect=True
)

#: How long the database is unreachable, as in the issue.
PARTITION_SECONDS = 5.0
#: The deadline of the calls made during the partition.
DEADLINE = 1.0
#: How late past its deadline (or the store timeout) the server may end a call on a busy
#: machine; the client, which ends a call at its deadline by itself, gets longer.
SLACK = 1.0
CLIENT_SLACK = 2.0
#: The store timeout of the server under test; a call with no deadline ends by it.
STORE_TIMEOUT = 3.0
#: From the heal to the first call answered, at most ("a second or two").
RECOVERY = 2.0
#: Threads serving calls.
WORKERS = 8
#: The whole scenario, at most; beyond it the server hangs and the test fails.
GUARD = 40.0

FAILED = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}


@dataclass
class Partitioned:
    """A started server whose database connections pass through proxied.proxy."""

    proxied: Proxied
    #: A channel to it, with no credentials (health, reflection).
    channel: grpc.Channel
    #: The base URL of the HTTP shim in front of it, calling it in-process.
    http: str

    def http_get(self) -> tuple[int, float]:
        """The HTTP status of the seed request on the canonical route, and its seconds."""
        started = time.monotonic()
        status = httpx.get(
            f"{self.http}/v1/businesses/2/tasks/10/nodes/{SEED_NODE}",
            params={"subprocessStack": SEED_PARENT, "componentCode": "job_fast_execute_script"},
            headers={"X-Bkapi-Authorization": json.dumps(ALL_APP)},
            timeout=GUARD,
        ).status_code
        return status, time.monotonic() - started


@pytest.fixture
def partitioned(demo_config: Config) -> Iterator[Partitioned]:
    with partition_of(demo_config) as found:
        yield found


@contextmanager
def partition_of(
    demo_config: Config, url: Callable[[str], str] = lambda u: u
) -> Iterator[Partitioned]:
    """A started server whose connections pass through a proxy (its URL made by url)."""
    upstream = urlsplit(demo_config.database_url)
    assert upstream.hostname and upstream.port
    with TcpProxy(upstream.hostname, upstream.port) as proxy:
        config = dataclasses.replace(
            demo_config,
            database_url=url(through(demo_config.database_url, proxy.port)),
            grpc_workers=WORKERS,
            store_timeout_seconds=STORE_TIMEOUT,
        )
        server = create_server(config)
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
            proxy.cut()  # frees any thread still stuck on a connection, so stop() can end
            server.stop(None)


def test_a_partition_ends_calls_by_their_deadline_and_heals_within_seconds(
    partitioned: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_partition(partitioned, monkeypatch)


def check_partition(partitioned: Partitioned, monkeypatch: pytest.MonkeyPatch) -> None:
    """Partition and heal, counting the server's calls inside its store (Sessions)."""
    store = partitioned.proxied.server.store
    sessions = Sessions()
    monkeypatch.setattr(store, "session", sessions.around(store))
    report = within(GUARD, lambda: partition_and_heal(partitioned, sessions))
    assert report["recovery"] < RECOVERY, report


def partition_and_heal(partitioned: Partitioned, sessions: Sessions) -> dict[str, float]:
    proxied, channel = partitioned.proxied, partitioned.channel
    for _ in range(3):
        proxied.call_ok()  # the pool now holds connections that the partition will strand
    health = health_pb2_grpc.HealthStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")

    sessions.spans.clear()
    proxied.proxy.blackhole()
    blackholed = time.monotonic()
    with futures.ThreadPoolExecutor(24) as pool:
        no_deadline = pool.submit(timed_failure, proxied.stub, None)
        over_http = pool.submit(partitioned.http_get)
        # Twice as many calls as the server has threads, all stuck at once.
        waves = [pool.submit(timed_failure, proxied.stub, DEADLINE) for _ in range(16)]
        # Health and reflection answer while every serving thread waits on the store.
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert list(reflection.ServerReflectionInfo(iter([listing]), timeout=2))
        for done in waves:
            code, took = done.result()
            assert code in FAILED and took < DEADLINE + CLIENT_SLACK, (code, took)
        # The threads those calls held are free again: later calls meet the same bound.
        while time.monotonic() - blackholed < PARTITION_SECONDS:
            code, took = timed_failure(proxied.stub, DEADLINE)
            assert code in FAILED and took < DEADLINE + CLIENT_SLACK, (code, took)
        code, took = no_deadline.result()
        assert code == grpc.StatusCode.UNAVAILABLE, code
        assert took < STORE_TIMEOUT + CLIENT_SLACK, took
        # The shim's call gives up at the store's timeout, after waiting for a serving
        # thread behind the first wave (so up to DEADLINE longer).
        status, took = over_http.result()
        assert status == 503 and took < DEADLINE + STORE_TIMEOUT + CLIENT_SLACK, (status, took)

    # The server itself let go of the store in time, every call: none is still waiting
    # on a dead connection, and each waited no longer than its deadline allowed.
    waited_until = time.monotonic() + SLACK
    while sessions.inside and time.monotonic() < waited_until:
        time.sleep(0.05)
    assert not sessions.inside, f"{sessions.inside} calls still wait on the store"
    assert len(sessions.spans) > WORKERS, "no serving thread took a second call"
    for budget, took in sessions.spans:
        assert took < min(budget, STORE_TIMEOUT) + SLACK, (budget, took)

    proxied.proxy.heal()
    healed = time.monotonic()
    while True:
        try:
            assert proxied.stub.GetTaskNodeDetail(seed_request(), timeout=DEADLINE).id == SEED_NODE
            break
        except grpc.RpcError as exc:
            assert exc.code() in FAILED, exc
            assert time.monotonic() - healed < RECOVERY + GUARD / 2, "never recovered"
    recovery = time.monotonic() - healed
    with futures.ThreadPoolExecutor(8) as pool:
        for answered in [pool.submit(proxied.call_ok) for _ in range(24)]:
            answered.result()
    assert partitioned.http_get()[0] == 200
    return {"recovery": recovery}


class Sessions:
    """Counts the calls inside the store (Store.session), and how long each stayed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        #: (the call's deadline in seconds, or inf; seconds it held its session)
        self.spans: list[tuple[float, float]] = []

    def around(self, store: Store) -> Callable[..., AbstractContextManager[None]]:
        session = store.session

        @contextmanager
        def counted(*args: Any) -> Iterator[None]:
            started = time.monotonic()
            with self.lock:
                self.inside += 1
            try:
                with session(*args):
                    yield
            finally:
                with self.lock:
                    self.inside -= 1
                    deadline = args[0] if args and args[0] is not None else math.inf
                    self.spans.append((deadline, time.monotonic() - started))

        return counted


def timed_failure(
    stub: pb_grpc.TaskNodeServiceStub, deadline: float | None
) -> tuple[grpc.StatusCode, float]:
    """The code of a call that must fail, and how long it took."""
    started = time.monotonic()
    try:
        stub.GetTaskNodeDetail(seed_request(), timeout=deadline)
    except grpc.RpcError as exc:
        return exc.code(), time.monotonic() - started
    raise AssertionError("a call succeeded during the partition")


def within(seconds: float, scenario: Callable[[], dict[str, float]]) -> dict[str, float]:
    """scenario's result; a failure if it does not end within seconds (a hung server
    fails the test instead of hanging the suite)."""
    result: list[dict[str, float]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(scenario())
        except BaseException as exc:  # handed to the test's thread
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="partition-scenario")
    thread.start()
    thread.join(seconds)
    if error:
        raise error[0]
    if not result:
        pytest.fail(f"the scenario did not end within {seconds:g} s: the server hangs")
    return result[0]


def test_server_connections_carry_their_bounds_and_the_url_wins(database_url: str) -> None:
    """Keepalives, tcp_user_timeout and a statement timeout on every connection, beside
    the URL's own options (the test schema's search_path); URL parameters win."""
    postgresql = database_url.startswith("postgresql")
    if postgresql:
        overridden = database_url.replace(
            "options=", "keepalives_idle=30&options=-cstatement_timeout%3D7s%20"
        )
    else:
        overridden = f"{database_url}?max_statement_time=7&read_timeout=9"
    for url, idle, statement in (
        (database_url, 10, 3.0),
        (overridden, 30 if postgresql else 10, 7.0),
    ):
        db = open_database(url, timeout=3.0)
        assert isinstance(db, PooledDatabase)
        with db.connection_context():
            conn = db.connection()
            if postgresql:
                assert db.execute_sql("SHOW search_path").fetchone()[0].startswith("t_")
                shown = db.execute_sql("SHOW statement_timeout").fetchone()[0]
                assert shown == f"{statement:g}s"
                dsn = conn.get_dsn_parameters()
                assert (dsn["keepalives_idle"], dsn["tcp_user_timeout"]) == (str(idle), "25000")
            else:
                shown = db.execute_sql("SELECT @@SESSION.max_statement_time").fetchone()[0]
                assert float(shown) == statement
                keepidle = conn._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                assert keepidle == idle
                assert conn._read_timeout == (3.0 if url == database_url else 9.0)
        db.close_all()
