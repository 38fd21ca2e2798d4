"""CPU per GetTaskNodeDetail call on the call path alone, no network: what metrics and
traces cost.

Calls the service's in-process handler (interceptors, credential check, reply cache,
store; server.gateway.local) for the demo node, on a fresh SQLite demo database, in
rounds of --calls, and prints CPU microseconds per call of each round and the best.
Whatever code is importable as ``server`` is measured, so the figure before a change
comes from running this file with the old checkout first on PYTHONPATH; set
PROMETHEUS_MULTIPROC_DIR to an empty directory to measure multiprocess mode:

    taskset -c 1 .venv/bin/python bench/call_cpu.py
    PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) taskset -c 1 .venv/bin/python bench/call_cpu.py
    PYTHONPATH=../main:../main/generated taskset -c 1 .venv/bin/python bench/call_cpu.py

--traces unsampled sets tracing up with sampling off (ratio 0: each call makes a span
that is not recorded); --traces sampled records every call's spans and hands them to an
exporter that drops them (the export itself, a batch sent off the call's thread, is
not measured); the default, off, makes no span at all.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence

from bksops.tasknode.v1 import task_node_pb2 as pb
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from server import traces
from server.app import create_server
from server.cli import DEMO_APP
from server.cli import DEMO_NODE
from server.cli import load_demo_if_empty
from server.config import Config
from server.gateway.local import LocalContext

METHOD = "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"
#: --traces: the sample ratio of each setting; None: tracing off.
TRACES = {"off": None, "unsampled": 0.0, "sampled": 1.0}


class Dropped(SpanExporter):
    """Takes spans and keeps none."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--traces", choices=list(TRACES), default="off")
    args = parser.parse_args()
    ratio = TRACES[args.traces]
    if ratio is not None:
        traces.configure(Config(traces_sample_ratio=ratio), Dropped())
    with tempfile.TemporaryDirectory() as scratch:
        config = Config(
            database_url=f"sqlite:///{scratch}/db.sqlite", grpc_addr="127.0.0.1:0", http_addr=""
        )
        load_demo_if_empty(config)
        server = create_server(config)
        handler = server.handlers[METHOD].unary_unary
        assert handler is not None
        metadata = (("x-bkapi-authorization", json.dumps(DEMO_APP)),)
        request = pb.GetTaskNodeDetailRequest(**DEMO_NODE)  # type: ignore[arg-type]

        def run(calls: int) -> float:
            started = time.process_time()
            for _ in range(calls):
                handler(request, LocalContext(metadata, time.monotonic() + 10, "ipv4:127.0.0.1:1"))
            return (time.process_time() - started) / calls * 1e6

        run(args.calls)  # warm: the caches fill, the first credential check hashes
        rounds = [run(args.calls) for _ in range(args.rounds)]
        server.stop(None)
    mode = "multiprocess" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "one process"
    print(f"CPU µs/call ({mode}, traces {args.traces}):", " ".join(f"{r:.1f}" for r in rounds))
    print(f"best {min(rounds):.1f}")


if __name__ == "__main__":
    main()
