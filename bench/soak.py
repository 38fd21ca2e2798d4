"""A soak of bad input: does a serving process's memory stay flat while it refuses it?

Starts `python -m server serve --demo` (worker processes, the shim in each) on a
database of its own and feeds it, from a few threads, nothing but input it must
refuse: unknown apps and wrong secrets, missing tasks and nodes, invalid arguments,
bytes that are no request, over gRPC; and over HTTP bytes that are no request, wrong
credentials and missing nodes. Every interval it prints each serving process's
low-water resident memory over that interval (the floor the heap returns to: a leak
raises it, a burst of garbage does not), and at the end how far it moved.

    .venv/bin/python -m bench.soak --seconds 120
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from bench import procs

METADATA_KEY = "x-bkapi-authorization"
DEMO = {"bk_app_code": "esb_test", "bk_app_secret": "xxx", "bk_username": "admin"}
NODE = "node0df0431f8f553925af01a94854bd"
SAMPLE_SECONDS = 0.5

Metadata = tuple[tuple[str, str | bytes], ...]


def rss_mib(pid: int) -> float:
    """The process's resident set size now, in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def serving_pids(parent: int) -> list[int]:
    """The processes that serve: the workers `serve` spawned, or `serve` itself."""
    workers = []
    for pid in procs.tree(parent)[1:]:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            workers.append(pid)
    return workers or [parent]


def grpc_mistakes(addr: str) -> list[Callable[[], None]]:
    """Calls the server must refuse, each a function making one."""
    channel = grpc.insecure_channel(addr)
    stub = pb_grpc.TaskNodeServiceStub(channel)
    raw: grpc.UnaryUnaryMultiCallable = channel.unary_unary(
        "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"
    )
    demo: Metadata = ((METADATA_KEY, json.dumps(DEMO)),)

    def unknown_app() -> None:
        app = {"bk_app_code": uuid.uuid4().hex, "bk_app_secret": "wrong", "bk_username": "u"}
        stub.GetTaskNodeDetail(_request(), timeout=10, metadata=((METADATA_KEY, json.dumps(app)),))

    def wrong_secret() -> None:
        app = {**DEMO, "bk_app_secret": uuid.uuid4().hex}
        stub.GetTaskNodeDetail(_request(), timeout=10, metadata=((METADATA_KEY, json.dumps(app)),))

    def missing_task() -> None:
        stub.GetTaskNodeDetail(
            _request(task_id=str(uuid.uuid4().int % 10**12)), timeout=10, metadata=demo
        )

    def missing_node() -> None:
        stub.GetTaskNodeDetail(
            _request(node_id=f"node{uuid.uuid4().hex}"), timeout=10, metadata=demo
        )

    def invalid_arguments() -> None:
        request = _request(bk_biz_id=uuid.uuid4().hex, loop=-1, subprocess_stack=[uuid.uuid4().hex])
        stub.GetTaskNodeDetail(request, timeout=10, metadata=demo)

    def not_a_request() -> None:
        raw(b"\xff\xff\xff" + uuid.uuid4().bytes, timeout=10, metadata=demo)

    return [unknown_app, wrong_secret, missing_task, missing_node, invalid_arguments, not_a_request]


def _request(**fields: object) -> pb.GetTaskNodeDetailRequest:
    return pb.GetTaskNodeDetailRequest(
        **{"bk_biz_id": "2", "task_id": "10", "node_id": NODE, **fields}  # type: ignore[arg-type]
    )


def http_mistakes(port: int) -> list[Callable[[], None]]:
    """HTTP requests the shim must refuse, each a function sending one on a new connection."""
    path = "/api/c/compapi/v2/sops/get_task_node_detail/"

    def send(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(data)
            connection.recv(65536)

    def garbage() -> None:
        send(b"\x01\x02 " + uuid.uuid4().hex.encode() + b"\r\n\r\n")

    def wrong_credentials() -> None:
        query = (
            f"bk_app_code={uuid.uuid4().hex}&bk_app_secret=x&bk_username=u&task_id=10&bk_biz_id=2"
        )
        send(f"GET {path}?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())

    def missing_node() -> None:
        body = json.dumps({**DEMO, "bk_biz_id": "2", "task_id": "10", "node_id": uuid.uuid4().hex})
        send(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )

    def bad_json() -> None:
        body = "{" + uuid.uuid4().hex
        send(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )

    return [garbage, wrong_credentials, missing_node, bad_json]


def feed(mistakes: list[Callable[[], None]], stop: threading.Event, done: Counter[str]) -> None:
    """Make the mistakes in turn until stop; count them by name."""
    while not stop.is_set():
        for mistake in mistakes:
            with contextlib.suppress(grpc.RpcError, OSError):
                mistake()
            done[mistake.__name__] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--interval", type=float, default=10, help="seconds per line")
    parser.add_argument("--processes", type=int, default=2, help="serving processes")
    parser.add_argument("--callers", type=int, default=3, help="threads sending bad input")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    grpc_port, http_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "TASKNODE_DATABASE_URL": f"sqlite:///{work / 'soak.db'}",
        "TASKNODE_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "TASKNODE_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "TASKNODE_GRPC_PROCESSES": str(args.processes),
    }
    server = procs.start(
        [sys.executable, "-m", "server", "serve", "--demo"], env, work / "server.log", "serving"
    )
    stop = threading.Event()
    done: Counter[str] = Counter()
    try:
        pids = serving_pids(server.pid)
        mistakes = grpc_mistakes(f"127.0.0.1:{grpc_port}") + http_mistakes(http_port)
        callers = [
            threading.Thread(target=feed, args=(mistakes, stop, done), daemon=True)
            for _ in range(args.callers)
        ]
        for caller in callers:
            caller.start()
        print(f"serving processes {pids}; low-water RSS (MiB) per {args.interval:g} s", flush=True)
        floors: list[list[float]] = []
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            interval_end = min(started + args.seconds, time.monotonic() + args.interval)
            floor = [float("inf")] * len(pids)
            while time.monotonic() < interval_end:
                floor = [min(f, rss_mib(pid)) for f, pid in zip(floor, pids, strict=True)]
                time.sleep(SAMPLE_SECONDS)
            floors.append(floor)
            print(
                f"{time.monotonic() - started:6.0f} s  {sum(done.values()):8d} refused  "
                + "  ".join(f"{f:7.1f}" for f in floor),
                flush=True,
            )
        if len(floors) > 1:
            moved = [last - first for first, last in zip(floors[0], floors[-1], strict=True)]
            print("low-water moved (MiB): " + "  ".join(f"{m:+.1f}" for m in moved))
        print("sent: " + ", ".join(f"{name} {count}" for name, count in sorted(done.items())))
    finally:
        stop.set()
        procs.stop(server)
    return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    raise SystemExit(main())
