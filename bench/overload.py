"""Overload: what callers see while 3,200 calls are in flight.

A probe sends its own batches of concurrent calls during an h2load run at 3,200
in flight and sorts the answers by status code, with how long each took: the
server should answer what it admits within the deadline and refuse the rest at
once with RESOURCE_EXHAUSTED (not CANCELLED, not timeouts).
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from dataclasses import dataclass

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Probe:
    """The probe's answers: count and median/max milliseconds per status code."""

    by_code: dict[str, tuple[int, float, float]]


async def _probe(
    addr: str,
    request: pb.GetTaskNodeDetailRequest,
    metadata: list[tuple[str, str]],
    seconds: float,
    concurrency: int,
    deadline: float,
) -> Probe:
    times: dict[str, list[float]] = collections.defaultdict(list)
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.TaskNodeServiceStub(channel)

        async def one() -> None:
            started = time.perf_counter()
            try:
                await stub.GetTaskNodeDetail(request, metadata=metadata, timeout=deadline)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            times[code].append((time.perf_counter() - started) * 1000)

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.gather(*(one() for _ in range(concurrency)))
    return Probe(
        {
            code: (len(values), statistics.median(values), max(values))
            for code, values in sorted(times.items())
        }
    )


def probe(
    addr: str,
    request: pb.GetTaskNodeDetailRequest,
    metadata: list[tuple[str, str]],
    seconds: float,
    concurrency: int = 200,
    deadline: float = 5.0,
) -> Probe:
    """Run the probe for seconds (blocking)."""
    return asyncio.run(_probe(addr, request, metadata, seconds, concurrency, deadline))
