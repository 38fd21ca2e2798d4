"""The watch step's callers (bench.watch): many WatchTaskNode streams from one process.

    python -m bench.watch_clients TARGET COUNT PER_NODE FINAL EXPECTED OUT.json

Opens COUNT streams on TARGET (over 1 connection per 100 streams) with grpc.aio, PER_NODE
streams a node (watched() says which), prints "ready" once every stream has its first
message, records when each later detail arrives, by version, and prints "converged" once
EXPECTED details of a version starting with FINAL have arrived. On SIGTERM it writes
OUT.json: {"receipts": {version: [epoch seconds, ...]}, "heartbeats": n,
"errors": {code: n}}.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
import time
from collections import Counter
from collections import defaultdict

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb

from server.cli import DEMO_APP

STREAMS_PER_CONNECTION = 100
#: The first of the bench's tasks (business 2), and the nodes each has (n0, n1, ...).
TASK = 901
NODES_PER_TASK = 10
WATCH_NODE = "/bksops.tasknode.v1.TaskNodeService/WatchTaskNode"


def watched(index: int, per_node: int) -> tuple[int, str]:
    """The task and node stream index watches: streams fill a node, nodes a task."""
    node = index // per_node
    return TASK + node // NODES_PER_TASK, f"n{node % NODES_PER_TASK}"


async def main(target: str, count: int, per_node: int, final: str, expected: int, out: str) -> None:
    receipts: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    heartbeats = 0
    opened = 0
    finished = 0
    all_open = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, count // STREAMS_PER_CONNECTION))
    ]
    metadata = (("x-bkapi-authorization", json.dumps(DEMO_APP)),)

    async def one(index: int) -> None:
        nonlocal opened, heartbeats, finished
        task, node = watched(index, per_node)
        request = pb.WatchTaskNodeRequest(
            node=pb.GetTaskNodeDetailRequest(bk_biz_id="2", task_id=str(task), node_id=node)
        )
        watch = channels[index % len(channels)].unary_stream(
            WATCH_NODE,
            request_serializer=pb.WatchTaskNodeRequest.SerializeToString,
            response_deserializer=pb.WatchTaskNodeResponse.FromString,
        )
        first = True
        try:
            async for message in watch(request, metadata=metadata):
                now = time.time()
                if first:
                    first = False
                    opened += 1
                    if opened == count:
                        all_open.set()
                elif message.HasField("detail"):
                    receipts[message.detail.version].append(now)
                    if message.detail.version.startswith(final):
                        finished += 1
                        if finished == expected:
                            print("converged", flush=True)
                else:
                    heartbeats += 1
        except grpc.aio.AioRpcError as exc:
            if not stop.is_set():  # not the end of the run cancelling it
                errors[exc.code().name] += 1
            if first:
                opened += 1
                if opened == count:
                    all_open.set()

    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(one(index)))
        if index % 200 == 199:
            await asyncio.sleep(0.05)  # open in waves: the server's opening reads queue
    await all_open.wait()
    print("ready", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with open(out, "w") as handle:
        json.dump({"receipts": receipts, "heartbeats": heartbeats, "errors": errors}, handle)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    # As the server does (server.watch.service.GC_YOUNG): 10^4 streams' coroutines make
    # the collector's passes long, and this process shares the server's two cores.
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    target, count, per_node, final, expected, out = sys.argv[1:]
    asyncio.run(main(target, int(count), int(per_node), final, int(expected), out))
