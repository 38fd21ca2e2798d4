"""A state-and-times read_mask read of a node with big inputs and outputs against its full reply.

    .venv/bin/python -m bench.read_mask [--seconds 3] [--kib 256]
    .venv/bin/python -m bench.run --only read-mask

In one process, no network: GetTaskNodeDetail's handler (interceptors, authentication,
the servicer) is called directly on a fresh SQLite file holding one failed node whose
inputs and outputs are each about --kib KiB of JSON, with three earlier attempts of the
same size. Each shape is timed with the reply cache off (every call reads and builds
the reply: what a mask saves) and on (a repeated call reuses the built reply), and
printed as calls/s and µs per call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bksops.tasknode.v1 import task_node_pb2 as pb
from google.protobuf.field_mask_pb2 import FieldMask

from server.app import create_server
from server.cli import DEMO_APP
from server.cli import load_demo_if_empty
from server.config import Config
from server.db.connection import open_database
from server.db.loader import FORMAT
from server.db.loader import load_document
from server.gateway.local import LocalContext

GET = "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"
AUTH = (("x-bkapi-authorization", json.dumps(DEMO_APP)),)
TASK = 90
NODE = "nodebench0000000000000000000big"
STATE_AND_TIMES = ["state", "start_time", "finish_time", "elapsed_seconds"]


def big_document(kib: int) -> dict[str, object]:
    """Business 2 (the demo app's), one task, one failed node with big inputs and outputs."""
    payload = {f"key{i}": "x" * 1000 for i in range(kib)}
    times = {"start_time": "2024-05-01T10:00:00+08:00", "finish_time": "2024-05-01T10:00:07+08:00"}
    attempts = [
        {"loop": 1, "retry": r, "version": f"a{r}", "inputs": payload, "outputs": payload, **times}
        for r in range(3)
    ]
    node = {
        "id": NODE,
        "name": "big",
        "type": "ServiceActivity",
        "inputs": payload,
        "outputs": payload,
        "ex_data": "exit 2",
        "attempts": attempts,
        "execution": {"state": "FAILED", "retry": 3, "version": "v9", **times},
    }
    return {
        "format": FORMAT,
        "projects": [{"id": 1, "name": "Demo business", "bk_biz_id": 2}],
        "tasks": [{"id": TASK, "project_id": 1, "name": "big", "nodes": [node]}],
    }


def per_call_us(call: object, request: pb.GetTaskNodeDetailRequest, seconds: float) -> float:
    """Mean µs per call of call(request) over seconds."""
    assert callable(call)
    count = 0
    started = time.perf_counter()
    stop = started + seconds
    while time.perf_counter() < stop:
        call(request, LocalContext(AUTH, time.monotonic() + 30))
        count += 1
    return (time.perf_counter() - started) / count * 1e6


def measure(seconds: float, kib: int) -> list[tuple[str, str, float]]:
    """(cache, shape, µs per call) for the full reply and the state-and-times read."""
    full = pb.GetTaskNodeDetailRequest(bk_biz_id="2", task_id=str(TASK), node_id=NODE)
    part = pb.GetTaskNodeDetailRequest()
    part.CopyFrom(full)
    part.read_mask.CopyFrom(FieldMask(paths=STATE_AND_TIMES))
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{Path(directory) / 'bench.db'}"
        load_demo_if_empty(Config(database_url=url))
        db = open_database(url)
        with db.connection_context():
            load_document(db, big_document(kib))
        db.close()
        for cache_mb in (0, 64):
            server = create_server(
                Config(database_url=url, grpc_addr="127.0.0.1:0", reply_cache_mb=cache_mb)
            )
            call = server.handlers[GET].unary_unary
            try:
                for name, request in (("full reply", full), ("state and times", part)):
                    per_call_us(call, request, 0.2)  # warm: credentials, cache
                    rows.append(
                        ("off" if not cache_mb else "on", name, per_call_us(call, request, seconds))
                    )
            finally:
                server.stop(None)
    return rows


def print_rows(rows: list[tuple[str, str, float]], kib: int) -> None:
    print(f"read_mask: one node, inputs and outputs ~{kib} KiB each, 3 attempts alike (in process)")
    print("| reply cache | reply | calls/s | µs/call |")
    print("|---|---|---|---|")
    for cache, name, us in rows:
        print(f"| {cache} | {name} | {1e6 / us:,.0f} | {us:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--kib", type=int, default=256)
    args = parser.parse_args()
    print_rows(measure(args.seconds, args.kib), args.kib)


if __name__ == "__main__":
    main()
