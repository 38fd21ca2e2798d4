"""Fixtures: a configured database, a real gRPC server on port 0, a stub."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.app import Server
from server.app import create_server
from server.cli import DEMO_APP
from server.cli import load_demo_if_empty
from server.config import Config
from server.db.apps import AppStore
from server.db.connection import open_database

SEED_NODE = "node0df0431f8f553925af01a94854bd"
SEED_PARENT = "nodeaaa0ce51d2143aa9b0dbc27cb7df"


#: The stores every store, gRPC and shim test runs against. A store that cannot be reached
#: fails its tests loudly; it is never skipped.
STORES = os.environ.get("TASKNODE_TEST_STORES", "sqlite,postgresql,mysql").split(",")
POSTGRESQL = os.environ.get("TASKNODE_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL = os.environ.get("TASKNODE_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test")


@pytest.fixture(params=STORES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database of its own on each store: a file, a schema or a database."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@contextmanager
def fresh_database(store: str, directory: Path) -> Iterator[str]:
    """An empty database on store (a file in directory, a schema or a database), dropped after."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    if store == "sqlite":
        yield f"sqlite:///{directory / 'tasknode.db'}"
    elif store == "postgresql":
        with _admin_postgresql() as run:
            run(f"CREATE SCHEMA {name}")
            try:
                yield f"{POSTGRESQL}?options=-csearch_path%3D{name}"
            finally:
                run(f"DROP SCHEMA {name} CASCADE")
    elif store == "mysql":
        with _admin_mysql() as run:
            run(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            try:
                yield MYSQL.rsplit("/", 1)[0] + f"/{name}"
            finally:
                run(f"DROP DATABASE {name}")
    else:
        raise ValueError(f"TASKNODE_TEST_STORES: unknown store {store!r}")


@contextmanager
def _admin_postgresql() -> Iterator[Callable[[str], None]]:
    import psycopg2

    parts = urlsplit(POSTGRESQL)
    connection = psycopg2.connect(
        host=parts.hostname, port=parts.port, user=parts.username, dbname=parts.path[1:]
    )
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            yield cursor.execute
    finally:
        connection.close()


@contextmanager
def _admin_mysql() -> Iterator[Callable[[str], None]]:
    import pymysql

    parts = urlsplit(MYSQL)
    connection = pymysql.connect(
        host=parts.hostname,
        port=parts.port or 3306,
        user=parts.username,
        password="",
        autocommit=True,
    )
    try:
        with connection.cursor() as cursor:
            yield cursor.execute
    finally:
        connection.close()


@pytest.fixture
def config(database_url: str) -> Config:
    """A config on a fresh database, gRPC on a free port, "hunter2" a secret keyword."""
    return Config(
        database_url=database_url,
        grpc_addr="127.0.0.1:0",
        secret_keywords=("hunter2",),
    )


@pytest.fixture
def sqlite_config(tmp_path: Path) -> Config:
    """A config on a fresh SQLite file in tmp_path, for tests about the file itself."""
    return Config(database_url=f"sqlite:///{tmp_path / 'tasknode.db'}", grpc_addr="127.0.0.1:0")


#: An app granted every business, for tests about data outside the demo app's grant.
ALL_APP = {"bk_app_code": "test-all", "bk_app_secret": "test-all-secret", "bk_username": "ops"}


@pytest.fixture
def demo_config(config: Config) -> Config:
    """config, with the demo dataset (and demo app) loaded, and ALL_APP added."""
    assert load_demo_if_empty(config)
    db = open_database(config.database_url)
    with db.connection_context():
        AppStore(db).add(
            ALL_APP["bk_app_code"],
            ALL_APP["bk_app_secret"],
            all_businesses=True,
            may_assert_user=True,
        )
    return config


@pytest.fixture
def server(demo_config: Config) -> Iterator[Server]:
    """A started server on the demo dataset."""
    running = create_server(demo_config)
    running.start()
    yield running
    running.stop(None)


@pytest.fixture
def grpc_address(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def channel(grpc_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_address) as open_channel:
        yield open_channel


class _WithCredentials(grpc.UnaryUnaryClientInterceptor):
    """Adds x-bkapi-authorization to every call, as a BlueKing caller would."""

    def __init__(self, credentials: dict[str, str]) -> None:
        self.header = ("x-bkapi-authorization", json.dumps(credentials))

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        metadata = [*(client_call_details.metadata or ()), self.header]
        return continuation(client_call_details._replace(metadata=metadata), request)


def authorized(channel: grpc.Channel, credentials: dict[str, str] = DEMO_APP) -> grpc.Channel:
    """channel, sending credentials (the demo app's by default) with every call."""
    return grpc.intercept_channel(channel, _WithCredentials(credentials))


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.TaskNodeServiceStub:
    """A stub calling as the demo app (granted business 2, user admin)."""
    return pb_grpc.TaskNodeServiceStub(authorized(channel))


@pytest.fixture
def all_stub(channel: grpc.Channel) -> pb_grpc.TaskNodeServiceStub:
    """A stub calling as ALL_APP (granted every business)."""
    return pb_grpc.TaskNodeServiceStub(authorized(channel, ALL_APP))


def seed_request(**overrides: object) -> pb.GetTaskNodeDetailRequest:
    """The seed document's request, with fields replaced as given."""
    fields: dict[str, object] = {
        "bk_biz_id": "2",
        "task_id": "10",
        "node_id": SEED_NODE,
        "subprocess_stack": [SEED_PARENT],
        "component_code": "job_fast_execute_script",
    }
    fields.update(overrides)
    return pb.GetTaskNodeDetailRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="session")
def _cheaper_secret_hashing() -> Iterator[None]:
    """Hash app secrets at scrypt N=2^10 instead of 2^14 in tests, 16x faster.

    The cost parameters travel inside each stored hash, so verification is the same
    code either way; tests/test_secrets.py checks the production parameters.
    """
    from server import secrets

    secrets.SCRYPT_N = 2**10
    yield
    secrets.SCRYPT_N = secrets.DEFAULT_SCRYPT_N
