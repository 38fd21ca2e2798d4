"""The commands that run the shim: `serve` (gRPC and HTTP) and `gateway` (HTTP alone)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.app import create_server
from server.cli import DEMO_APP
from server.cli import load_demo_if_empty
from server.config import Config
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.processes import start_server

SHIM_LINE = re.compile(
    r"HTTP/JSON shim on (http://127\.0\.0\.1:\d+), calling gRPC (at \S+|in-process)"
)
QUERY = {
    "node_id": SEED_NODE,
    "subprocess_stack": json.dumps([SEED_PARENT]),
    "component_code": "job_fast_execute_script",
}


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Run python -m server <args> until the shim says where it is: (process, its URL)."""
    process, found = start_server(args, {"TASKNODE_HTTP_ADDR": "127.0.0.1:0", **env}, SHIM_LINE)
    return process, found.group(1)


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM; the rest of the output, once the process exited 0."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert process.stdout is not None
    rest = process.stdout.read()
    process.stdout.close()
    return rest


def seed_on_the_gateway_route(url: str) -> dict[str, object]:
    headers = {"x-bkapi-authorization": json.dumps(DEMO_APP)}
    answer: dict[str, object] = httpx.get(
        f"{url}/get_task_node_detail/10/2/", params=QUERY, headers=headers, timeout=10
    ).json()
    return answer


def test_serve_starts_http_next_to_grpc(tmp_path: Path) -> None:
    env = {
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
    }
    process, url = start(["serve", "--demo"], env)
    try:
        answer = seed_on_the_gateway_route(url)
    finally:
        rest = stop(process)
    assert answer["result"] is True, answer
    assert "# The seed request" in rest  # the curl examples
    assert "draining" in rest and "stopped" in rest


@pytest.fixture
def backend(sqlite_config: Config) -> Iterator[str]:
    """The address of a gRPC server on the demo data."""
    load_demo_if_empty(sqlite_config)
    server = create_server(sqlite_config)
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(None)


def test_gateway_serves_http_alone_against_a_grpc_target(backend: str) -> None:
    process, url = start(["gateway"], {"TASKNODE_GRPC_TARGET": backend})
    try:
        answer = seed_on_the_gateway_route(url)
    finally:
        rest = stop(process)
    assert answer["result"] is True, answer
    assert "stopped" in rest


def test_gateway_serves_its_own_metrics(backend: str) -> None:
    with socket.socket() as probe:  # a free port, for the metrics address
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"TASKNODE_GRPC_TARGET": backend, "TASKNODE_METRICS_ADDR": f"127.0.0.1:{port}"}
    process, url = start(["gateway"], env)
    try:
        seed_on_the_gateway_route(url)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        stop(process)
    assert re.search(
        r'^tasknode_http_requests_total\{method="GET",route="/get_task_node_detail/'
        r'\{task_id\}/\{bk_biz_id\}/",status="200"\} 1\.0$',
        text,
        re.M,
    ), text


def test_gateway_refuses_an_empty_http_address() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "gateway"],
        env={**os.environ, "TASKNODE_HTTP_ADDR": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "TASKNODE_HTTP_ADDR is empty" in result.stderr
