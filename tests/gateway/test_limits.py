"""What one HTTP connection may send, and how many may be open: over raw sockets, since
an HTTP client would not send what these tests send."""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.config import Config
from server.gateway.app import NOT_HTTP
from server.gateway.runner import HttpServer
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.gateway.conftest import SEED_APP
from tests.gateway.conftest import demo_shim
from tests.gateway.test_commands import SHIM_LINE
from tests.gateway.test_commands import stop
from tests.processes import start_server
from tests.test_server import SERVING_LINE

LINE_LIMIT = 1024
HEAD_LIMIT = 4096
TIMEOUT = 1.0
#: How much later than its bound a busy machine may be seen to act.
SLACK = 4.0
#: The seed request on the old ESB route, as a query string.
SEED_QUERY = "/api/c/compapi/v2/sops/get_task_node_detail/?" + "&".join(
    f"{name}={value}"
    for name, value in {
        **SEED_APP,
        "bk_biz_id": "2",
        "task_id": "10",
        "node_id": SEED_NODE,
        "subprocess_stack": f"%5B%22{SEED_PARENT}%22%5D",
    }.items()
)


@pytest.fixture
def shim(sqlite_config: Config) -> Iterator[HttpServer]:
    """The shim with small limits and a short request timeout."""
    config = replace(
        sqlite_config,
        max_request_line_bytes=LINE_LIMIT,
        max_header_bytes=HEAD_LIMIT,
        http_request_timeout_seconds=TIMEOUT,
        max_http_connections=3,
    )
    with demo_shim(config) as http:
        yield http


def connect(http: HttpServer) -> socket.socket:
    return socket.create_connection((http.host, http.port), timeout=10)


def get(target: str = SEED_QUERY, *headers: str) -> bytes:
    """A GET request's bytes."""
    return "\r\n".join([f"GET {target} HTTP/1.1", "host: x", *headers, "", ""]).encode()


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after an answer counts as a
    close: the server did not read what was still coming)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in data, one after the other: (status, headers, body)."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines)
        length = int(headers["content-length"])
        found.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return found


def refusal(data: bytes) -> tuple[int, str]:
    """The one response in data, a refusal in the envelope: (status, message)."""
    [(status, headers, body)] = responses(data)
    envelope = json.loads(body)
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert set(envelope) == {"result", "code", "message", "data", "request_id", "trace_id"}
    assert (envelope["result"], envelope["code"]) == (False, 3540000)
    return status, envelope["message"]


# Sizes -------------------------------------------------------------------------------------


def padded_get(line: int, head: int) -> bytes:
    """A GET of the seed request whose request line and head have these lengths (the line
    without its CRLF, the head with its blank line)."""
    target = SEED_QUERY + "&pad=" + "p" * (line - len(f"GET {SEED_QUERY}&pad= HTTP/1.1"))
    request = get(target, "x-pad: ")
    return request.replace(b"x-pad: ", b"x-pad: " + b"p" * (head - len(request)))


@pytest.mark.parametrize(
    ("line", "head", "status"),
    [
        (LINE_LIMIT, HEAD_LIMIT, 200),
        (LINE_LIMIT + 1, HEAD_LIMIT, 414),
        (LINE_LIMIT, HEAD_LIMIT + 1, 431),
    ],
)
def test_request_line_and_head_up_to_their_limits_are_read(
    shim: HttpServer, line: int, head: int, status: int
) -> None:
    request = padded_get(line, head)
    assert len(request) == head and request.index(b"\r\n") == line
    with connect(shim) as sock:
        sock.sendall(request)
        answer = sock.recv(65536)
    assert responses(answer)[0][0] == status


def test_a_head_over_the_limit_is_refused_before_it_ends(shim: HttpServer) -> None:
    with connect(shim) as sock:
        sock.sendall(get()[:-2] + b"x-big: " + b"b" * HEAD_LIMIT)  # and never a blank line
        answer = read_to_end(sock)
    status, message = refusal(answer)
    assert (status, message) == (
        431,
        f"the request line and headers are larger than {HEAD_LIMIT} bytes",
    )


def test_a_request_line_over_the_limit_is_refused_before_it_ends(shim: HttpServer) -> None:
    with connect(shim) as sock:
        sock.sendall(b"GET /" + b"a" * LINE_LIMIT)
        answer = read_to_end(sock)
    assert refusal(answer) == (414, f"the request line is longer than {LINE_LIMIT} bytes")


def test_a_huge_header_is_refused_long_before_it_is_all_sent(shim: HttpServer) -> None:
    total = 256 * 1024 * 1024
    sent = 0
    with connect(shim) as sock:
        sock.sendall(get()[:-2] + b"x-big: ")

        def send() -> None:
            nonlocal sent
            chunk = b"b" * 65536
            try:
                while sent < total:
                    sent += sock.send(chunk)
            except OSError:
                pass  # the server closed

        sender = threading.Thread(target=send)
        sender.start()
        first = sock.recv(65536)
        sent_by_then = sent
        answer = first + read_to_end(sock)
        sender.join(10)
    assert refusal(answer)[0] == 431
    assert sent_by_then < total // 8, sent_by_then


# Time --------------------------------------------------------------------------------------

POST = b"POST /api/c/compapi/v2/sops/get_task_node_detail/ HTTP/1.1\r\nhost: x\r\n"

STALLED = {
    "a request line": b"GET /api/c/compapi",
    "a head": get()[:-2],
    "a content-length body": POST + b"content-length: 100\r\n\r\n{}",
    "a chunked body": POST + b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
}


@pytest.mark.parametrize("case", STALLED)
def test_an_unfinished_request_is_408_within_the_timeout(shim: HttpServer, case: str) -> None:
    with connect(shim) as sock:
        started = time.monotonic()
        sock.sendall(STALLED[case])
        answer = read_to_end(sock)
        waited = time.monotonic() - started
    assert refusal(answer) == (408, f"the request did not arrive within {TIMEOUT:g} seconds")
    assert waited < TIMEOUT + SLACK


def test_a_request_sent_a_byte_at_a_time_is_408_within_the_timeout(shim: HttpServer) -> None:
    with connect(shim) as sock:
        started = time.monotonic()
        answer = b""
        for byte in get():  # one byte every 0.1 s would take much longer than the timeout
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if answer:
                break
        answer += read_to_end(sock)
        waited = time.monotonic() - started
    assert refusal(answer)[0] == 408
    assert waited < TIMEOUT + SLACK


def test_a_connection_that_sends_nothing_is_closed_within_the_timeout(shim: HttpServer) -> None:
    with connect(shim) as sock:
        started = time.monotonic()
        answer = read_to_end(sock)
        waited = time.monotonic() - started
    assert answer == b""
    assert waited < TIMEOUT + SLACK


# Pipelining --------------------------------------------------------------------------------

GARBAGE = {
    "not HTTP": (b"\x00garbage\r\n\r\n", 400, NOT_HTTP),
    "a broken chunked body": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        400,
        NOT_HTTP,
    ),
    "a head over the limit": (
        get()[:-2] + b"x-big: " + b"b" * HEAD_LIMIT,
        431,
        f"the request line and headers are larger than {HEAD_LIMIT} bytes",
    ),
}


@pytest.mark.parametrize("case", GARBAGE)
def test_pipelined_requests_are_answered_before_the_garbage_after_them(
    shim: HttpServer, case: str
) -> None:
    garbage, status, message = GARBAGE[case]
    requests = [
        get(SEED_QUERY, f"traceparent: 00-{i + 1:032x}-00f067aa0ba902b7-01") for i in range(3)
    ]
    with connect(shim) as sock:
        sock.sendall(b"".join(requests) + garbage)
        answer = read_to_end(sock)
    *answered, refused = responses(answer)
    assert [(s, h["sops-trace-id"]) for s, h, _ in answered] == [
        (200, f"{i + 1:032x}") for i in range(3)
    ]
    assert all(json.loads(body)["result"] for _, _, body in answered)
    assert refusal(answer[answer.rindex(b"HTTP/1.1 ") :]) == (status, message)
    assert refused[0] == status


FIRST = {
    "a GET": get(),
    "a POST with a Content-Length body": POST + b"content-length: 4\r\n\r\n{}\r\n",
    "a POST with a chunked body": POST
    + b"transfer-encoding: chunked\r\n\r\n4\r\n{}\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", FIRST)
def test_a_pipelined_head_is_counted_from_its_first_byte(shim: HttpServer, case: str) -> None:
    last = get(SEED_QUERY, "connection: close")
    with connect(shim) as sock:
        sock.sendall(FIRST[case] + padded_get(LINE_LIMIT, HEAD_LIMIT) + last)
        answer = read_to_end(sock)
    assert [status for status, _, _ in responses(answer)] == [200, 200, 200]


# Connections -------------------------------------------------------------------------------


def closed_at_once(sock: socket.socket) -> bool:
    """Whether the server closes sock (having sent nothing) within a second."""
    sock.settimeout(1)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_over_the_cap_are_closed_at_once(shim: HttpServer) -> None:
    held = [connect(shim) for _ in range(3)]
    try:
        with connect(shim) as extra:
            assert closed_at_once(extra)
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server learns of the close a moment later
            with connect(shim) as sock:
                sock.sendall(get())
                answer = read_first(sock)
            if answer or time.monotonic() > deadline:
                break
        assert responses(answer)[0][0] == 200
    finally:
        for sock in held:
            sock.close()


def read_first(sock: socket.socket) -> bytes:
    """The first response's bytes, or b"" if the server closed the connection."""
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def test_grpc_answers_while_http_is_flooded(tmp_path: Path) -> None:
    """A real server whose open-files limit is below its HTTP connection cap: it raises
    the limit, refuses connections over the cap, and gRPC still accepts and answers."""
    cap, flood = 150, 250
    soft_limit = 128

    def low_open_files_limit() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (soft_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    env = {
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
        "TASKNODE_GRPC_PROCESSES": "1",
        "TASKNODE_MAX_HTTP_CONNECTIONS": str(cap),
    }
    process, serving = start_server(["serve", "--demo"], env, SERVING_LINE, low_open_files_limit)
    assert process.stdout is not None
    shim_url = None
    while shim_url is None:  # logged just after the gRPC address
        line = process.stdout.readline()
        assert line, "the server exited"
        shim_url = SHIM_LINE.search(line)
    parts = urlsplit(shim_url.group(1))
    sockets: list[socket.socket] = []
    try:
        for i in range(flood):
            sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
            sockets.append(sock)
            if i % 2:
                sock.sendall(b"GET /api/c/compapi")  # and no more
        with grpc.insecure_channel(f"127.0.0.1:{serving.group(1)}") as channel:
            stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
            reply = stub.GetTaskNodeDetail(seed_request(), timeout=10)
        assert reply.id == SEED_NODE
        over_the_cap = sockets[cap + 10 :]  # a few of the first may have closed since
        assert all(closed_at_once(sock) for sock in over_the_cap)
        assert not closed_at_once(sockets[0])
    finally:
        for sock in sockets:
            sock.close()
        stop(process)
