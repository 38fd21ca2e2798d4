"""The watch step's callers (bench.watch): many WatchTaskNode streams from one process.

    python -m bench.watch_clients TARGET COUNT FINAL OUT.json

Opens COUNT streams on TARGET (over 1 connection per 100 streams) with grpc.aio, prints
"ready" once every stream has its first message, records when each later detail
arrives, by version, and prints "converged" once every stream has received version
FINAL. On SIGTERM it writes OUT.json:
{"receipts": {version: [epoch seconds, ...]}, "heartbeats": n, "errors": {code: n}}.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections import defaultdict

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.cli import DEMO_APP

STREAMS_PER_CONNECTION = 100
NODE = "watchbench"
TASK = 901


async def main(target: str, count: int, final: str, out: str) -> None:
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
    request = pb.WatchTaskNodeRequest(
        node=pb.GetTaskNodeDetailRequest(bk_biz_id="2", task_id=str(TASK), node_id=NODE)
    )

    async def one(index: int) -> None:
        nonlocal opened, heartbeats, finished
        stub = pb_grpc.TaskNodeServiceStub(channels[index % len(channels)])
        first = True
        try:
            async for message in stub.WatchTaskNode(request, metadata=metadata):
                now = time.time()
                if first:
                    first = False
                    opened += 1
                    if opened == count:
                        all_open.set()
                elif message.HasField("detail"):
                    receipts[message.detail.version].append(now)
                    if message.detail.version == final:
                        finished += 1
                        if finished == count:
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
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
