"""2,200 HTTP connections that never finish a request against a real `serve` process: how
soon each is closed, and whether gRPC keeps answering meanwhile (python -m bench.slow_clients).

The server runs as `make run` starts it (one process per core, the shim in each, default
limits) on a fresh SQLite demo database. The client opens the connections in four kinds
(sending nothing, half a request line, half a head, a chunked body that never ends), then
calls GetTaskNodeDetail over gRPC every 50 ms until the server has closed every connection,
and reports when they were closed and how the calls fared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from bench import procs
from server.cli import DEMO_APP

#: What each kind of connection sends before it falls silent.
KINDS = {
    "nothing": b"",
    "half a request line": b"GET /api/c/compapi/v2/sops/get_task_n",
    "half a head": b"GET /api/c/compapi/v2/sops/get_task_node_detail/ HTTP/1.1\r\nhost: x\r\nx-a",
    "an endless chunked body": (
        b"POST /api/c/compapi/v2/sops/get_task_node_detail/ HTTP/1.1\r\nhost: x\r\n"
        b'transfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n5\r\n{"a":'
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _open(port: int, count: int) -> dict[socket.socket, tuple[str, float]]:
    """count connections, each sending one kind's bytes: socket -> (kind, opened at)."""
    opened: dict[socket.socket, tuple[str, float]] = {}
    kinds = list(KINDS)
    for index in range(count):
        kind = kinds[index % len(kinds)]
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(KINDS[kind])
        sock.setblocking(False)
        opened[sock] = (kind, time.monotonic())
    return opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2200)
    parser.add_argument("--limit", type=float, default=60, help="seconds to wait at most")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    request = pb.GetTaskNodeDetailRequest(
        bk_biz_id="2",
        task_id="10",
        node_id="node0df0431f8f553925af01a94854bd",
        subprocess_stack=["nodeaaa0ce51d2143aa9b0dbc27cb7df"],
    )
    metadata = [("x-bkapi-authorization", json.dumps(DEMO_APP))]
    with tempfile.TemporaryDirectory() as scratch:
        http_port, grpc_port = _free_port(), _free_port()
        env = {
            **os.environ,
            "TASKNODE_DATABASE_URL": f"sqlite:///{scratch}/db.sqlite",
            "TASKNODE_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "TASKNODE_HTTP_ADDR": f"127.0.0.1:{http_port}",
        }
        command = [sys.executable, "-m", "server", "serve", "--demo"]
        process = procs.start(command, env, Path(scratch) / "server.log", "HTTP/JSON shim on")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pb_grpc.TaskNodeServiceStub(channel)
                stub.GetTaskNodeDetail(request, metadata=metadata, timeout=5)
                started = time.monotonic()
                opened = _open(http_port, args.connections)
                print(f"{len(opened):,} connections opened in {time.monotonic() - started:.1f} s")
                selector = selectors.DefaultSelector()
                for sock in opened:
                    selector.register(sock, selectors.EVENT_READ, sock)
                closed_after: dict[str, list[float]] = {kind: [] for kind in KINDS}
                answers: dict[str, set[str]] = {kind: set() for kind in KINDS}
                latencies: list[float] = []
                failures = 0
                next_call = 0.0
                while opened and time.monotonic() - started < args.limit:
                    for key, _ in selector.select(timeout=0.05):
                        sock = key.data
                        try:
                            data = sock.recv(65536)
                        except ConnectionError:
                            data = b""
                        kind, at = opened[sock]
                        if data:
                            answers[kind].add(data.split(b"\r\n", 1)[0].decode("latin-1"))
                            continue
                        closed_after[kind].append(time.monotonic() - at)
                        selector.unregister(sock)
                        sock.close()
                        del opened[sock]
                    if time.monotonic() >= next_call:
                        next_call = time.monotonic() + 0.05
                        began = time.perf_counter()
                        try:
                            stub.GetTaskNodeDetail(request, metadata=metadata, timeout=2)
                            latencies.append(time.perf_counter() - began)
                        except grpc.RpcError:
                            failures += 1
                for sock in opened:
                    sock.close()
            rss = procs.peak_rss_mib(procs.tree(process.pid))
        finally:
            procs.stop(process)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for kind, times in closed_after.items():
        times.sort()
        shown = ", ".join(sorted(answers[kind])) or "no answer"
        at_once = sum(1 for t in times if t < 1)
        print(
            f"{kind}: {len(times):,} closed by the server ({at_once:,} within 1 s), the last "
            f"after {times[-1] if times else float('nan'):.1f} s; answered: {shown}"
        )
    print(f"still open after {args.limit:.0f} s: {len(opened):,}")
    if latencies:
        latencies.sort()
        print(
            f"gRPC during the flood: {len(latencies):,} OK, {failures} failed; p50 "
            f"{statistics.median(latencies) * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
        )
    print(f"peak RSS of all server processes: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
