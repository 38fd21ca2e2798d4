"""SIGTERM on a real `serve` process: refuse new work at once, finish what was admitted, exit.

A steady stream of gRPC calls runs throughout; an HTTP request admitted before
SIGTERM, its body held back, keeps the server draining while the test looks.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from server.cli import DEMO_APP
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.processes import start_server
from tests.test_server import health_of

GRACE_SECONDS = 30
CLIENTS = 4
ADDRESSES = re.compile(r"127\.0\.0\.1:(\d+) bksops|HTTP/JSON shim on http://127\.0\.0\.1:(\d+)\.")
LEGACY_PATH = "/api/c/compapi/v2/sops/get_task_node_detail/"


@contextmanager
def serving(tmp_path: Path, processes: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """`serve --demo` with a long grace: (the process, its gRPC port, its HTTP port).
    Its output is read on a thread from then on, so that it never blocks on a full pipe;
    killed at the end if it still runs."""
    env = {
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
        "TASKNODE_GRPC_PROCESSES": processes,
        "TASKNODE_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
        "TASKNODE_LOG_LEVEL": "WARNING",  # no access lines; the ports are printed anyway
    }
    process, found = start_server(["serve", "--demo"], env, ADDRESSES)
    assert process.stdout is not None
    grpc_port = int(found.group(1))
    for line in process.stdout:
        shim = ADDRESSES.search(line)
        if shim and shim.group(2):
            http_port = int(shim.group(2))
            break
    else:
        raise AssertionError("the shim's address was not printed")
    reader = threading.Thread(target=process.stdout.read)
    reader.start()
    try:
        yield process, grpc_port, http_port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        reader.join(10)
        process.stdout.close()


@contextmanager
def steady_calls(port: int) -> Iterator[collections.Counter[str]]:
    """CLIENTS threads calling GetTaskNodeDetail back to back until the block ends: the
    count of each outcome (status code name).

    Each starts once the one before has been answered: a worker hashes a secret it has
    not checked yet for one caller at a time (server.throttle) and refuses the others."""
    outcomes: collections.Counter[str] = collections.Counter()
    done = threading.Event()

    def call(answered: threading.Event) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
            while not done.is_set():
                try:
                    stub.GetTaskNodeDetail(seed_request(), timeout=10)
                    outcomes["OK"] += 1
                except grpc.RpcError as exc:
                    outcomes[exc.code().name] += 1
                    done.wait(0.01)  # a refused caller would go elsewhere; do not spin
                answered.set()

    threads = []
    for _ in range(CLIENTS):
        answered = threading.Event()
        threads.append(threading.Thread(target=call, args=(answered,)))
        threads[-1].start()
        answered.wait(30)
    try:
        yield outcomes
    finally:
        done.set()
        for thread in threads:
            thread.join(30)


def held_request(port: int) -> tuple[socket.socket, bytes]:
    """A connection with the seed request POSTed on it but for its body's last byte:
    (the connection, that byte). The request is admitted: one answered before it on
    the same connection shows that this server took the connection."""
    body = json.dumps({**DEMO_APP, "bk_biz_id": "2", "task_id": "10", "node_id": "nodeunknown"})
    head = (
        f"POST {LEGACY_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall((head + body).encode())
    assert read_response(connection).startswith(b"HTTP/1.1 200")
    connection.sendall((head + body[:-1]).encode())
    time.sleep(0.3)  # let uvicorn parse the head and start the request
    return connection, body[-1].encode()


def read_response(connection: socket.socket) -> bytes:
    """One HTTP response (headers and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def not_serving_within(port: int, seconds: float) -> bool:
    """Whether health says NOT_SERVING (over a new connection) within seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                if health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return True
        except grpc.RpcError:
            pass  # a worker that has exited already
        time.sleep(0.05)
    return False


def refusal_reason(port: int) -> str:
    """The ErrorInfo reason of a new call's refusal. Every try must be UNAVAILABLE; tried
    again while that is a worker closing the connection as it exits, not a refusal."""
    for _ in range(20):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetTaskNodeDetail(seed_request(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(refused.value)
        info = error_details_pb2.ErrorInfo()
        if status is not None and status.details[0].Unpack(info):
            return info.reason
    raise AssertionError("no server answered")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sigterm_refuses_new_calls_at_once_and_finishes_admitted_ones(
    tmp_path: Path, processes: str
) -> None:
    with (
        serving(tmp_path, processes) as (process, grpc_port, http_port),
        steady_calls(grpc_port) as outcomes,
    ):
        connection, last_byte = held_request(http_port)
        time.sleep(1)  # calls under way
        served_before = outcomes["OK"]
        process.send_signal(signal.SIGTERM)
        assert not_serving_within(grpc_port, 3)

        # The held request keeps the server draining: new work is refused meanwhile.
        assert refusal_reason(grpc_port) == "SHUTTING_DOWN"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", http_port), timeout=5).close()
        assert process.poll() is None, "the admitted HTTP request is still running"

        connection.sendall(last_byte)
        answer = read_response(connection)
        connection.close()
        answered = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 200") and b'"code":3540000' in answer
        assert process.wait(GRACE_SECONDS) == 0
        assert time.monotonic() - answered < GRACE_SECONDS / 3, "nothing held it"
    assert served_before > 0
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
