"""Fixtures: a configured database, a real gRPC server on port 0, a stub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.app import Server
from server.app import create_server
from server.cli import load_demo_if_empty
from server.config import Config

SEED_NODE = "node0df0431f8f553925af01a94854bd"
SEED_PARENT = "nodeaaa0ce51d2143aa9b0dbc27cb7df"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A config on a fresh SQLite file, gRPC on a free port, "hunter2" a secret keyword."""
    return Config(
        database_url=f"sqlite:///{tmp_path / 'tasknode.db'}",
        grpc_addr="127.0.0.1:0",
        secret_keywords=("hunter2",),
    )


@pytest.fixture
def demo_config(config: Config) -> Config:
    """config, with the demo dataset loaded."""
    assert load_demo_if_empty(config)
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


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.TaskNodeServiceStub:
    return pb_grpc.TaskNodeServiceStub(channel)


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
