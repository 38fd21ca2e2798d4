"""The ceiling server: the gRPC stack alone, answering every call with a prebuilt reply.

It serves the same method path as the real service, with the reply bytes the real
service gave for the benchmark request, from N sync processes sharing one port
(SO_REUSEPORT), each pinned to its own core: the fastest layout measured for this
stack (../shared/reference/perf-baseline.md). Each process counts the replies it
sent and prints the count when it gets SIGTERM.

    python bench/ceiling.py --addr 127.0.0.1:50200 --reply reply.bin --processes 2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from concurrent import futures
from types import FrameType

import grpc

METHOD = "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"


def serve(addr: str, reply: bytes, core: int | None, ready: int) -> None:
    """One process: a sync server with a prebuilt reply, counting what it sends."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    served = 0
    lock = threading.Lock()

    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        nonlocal served
        with lock:
            served += 1
        return reply

    handler = grpc.method_handlers_generic_handler(
        "bksops.tasknode.v1.TaskNodeService",
        {"GetTaskNodeDetail": grpc.unary_unary_rpc_method_handler(answer)},
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 1)]
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    server.start()
    os.write(ready, b".")

    def stop(signum: int, frame: FrameType | None) -> None:
        server.stop(0)

    signal.signal(signal.SIGTERM, stop)
    server.wait_for_termination()
    print(f"served {served}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--addr", required=True)
    parser.add_argument("--reply", required=True, help="file with the serialized reply")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    with open(args.reply, "rb") as source:
        reply = source.read()
    read_end, write_end = os.pipe()
    children = []
    for k in range(args.processes):
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            serve(args.addr, reply, None if args.no_pin else k % (os.cpu_count() or 1), write_end)
            os._exit(0)
        children.append(pid)
    os.close(write_end)
    started = 0
    while started < args.processes:
        chunk = os.read(read_end, 16)
        if not chunk:
            break
        started += len(chunk)
    print(f"ready {started}", flush=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
