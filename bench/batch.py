"""Node details per second: BatchGetTaskNodeDetails in batches of 100 against single calls.

    .venv/bin/python -m bench.batch --seconds 5 --in-flight 1 8

Not part of `make bench`: a quick comparison. A real server on the demo dataset (a
fresh SQLite file in a temporary directory, the reply cache on, as shipped) in this
process; a stub over a loopback channel calls it from --in-flight threads, each for
--seconds, first with single GetTaskNodeDetail calls, then with batches. The nodes
asked for take turns over the demo's nodes of business 2, so the server's work is
authorization, the stamp read and a cached reply per node.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.app import create_server
from server.cli import DEMO_APP
from server.cli import load_demo_if_empty
from server.config import Config

AUTH = (("x-bkapi-authorization", json.dumps(DEMO_APP)),)
SEED_PARENT = "nodeaaa0ce51d2143aa9b0dbc27cb7df"
#: Demo nodes of business 2: (task, node, stack).
NODES = [
    ("10", "node0df0431f8f553925af01a94854bd", [SEED_PARENT]),
    ("10", "nodebbb1c2d3e4f5061728394a5b6c7d", [SEED_PARENT]),
    ("11", "nodef1a2b3c4d5e6f708192a3b4c5d6e", []),
    ("11", "node3c4d5e6f708192a3b4c5d6e7f809", []),
    ("11", "node4d5e6f708192a3b4c5d6e7f8091a", []),
    ("11", "node5e6f708192a3b4c5d6e7f8091a2b", []),
]
REQUESTS = [
    pb.GetTaskNodeDetailRequest(bk_biz_id="2", task_id=t, node_id=n, subprocess_stack=s)
    for t, n, s in NODES
]


def rate(work: Callable[[int], int], threads: int, seconds: float) -> float:
    """Node details per second that threads calling work(turn) (which returns how many
    it got) reach in seconds."""
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(index: int) -> None:
        turn = 0
        while time.monotonic() < stop:
            counts[index] += work(turn)
            turn += 1

    started = time.monotonic()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    batch = pb.BatchGetTaskNodeDetailsRequest(
        requests=[REQUESTS[i % len(REQUESTS)] for i in range(args.batch)]
    )
    with tempfile.TemporaryDirectory() as directory:
        config = Config(
            database_url=f"sqlite:///{Path(directory) / 'bench.db'}", grpc_addr="127.0.0.1:0"
        )
        load_demo_if_empty(config)
        server = create_server(config)
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.TaskNodeServiceStub(channel)

                def single(turn: int) -> int:
                    stub.GetTaskNodeDetail(REQUESTS[turn % len(REQUESTS)], metadata=AUTH)
                    return 1

                def batched(turn: int) -> int:
                    reply = stub.BatchGetTaskNodeDetails(batch, metadata=AUTH)
                    assert all(r.HasField("detail") for r in reply.results)
                    return len(reply.results)

                single(0), batched(0)  # warm: credentials checked, replies cached
                for threads in args.in_flight:
                    one = rate(single, threads, args.seconds)
                    many = rate(batched, threads, args.seconds)
                    print(
                        f"{threads} in flight: single calls {one:,.0f} nodes/s, "
                        f"batches of {args.batch} {many:,.0f} nodes/s ({many / one:.1f}x)"
                    )
        finally:
            server.stop(None)


if __name__ == "__main__":
    main()
