"""GetTaskNodeDetail on a bk-sops dataset, in process and on one thread: what a call costs.

    .venv/bin/python -m bench.bksops_profile --tasks 100000 --calls 1500 --mode again [--profile]

Calls server.nodes.read_node_detail on the store (sessions opened as a servicer opens them)
for random nodes that ran of bench.bksops's dataset of --tasks tasks on MariaDB (it must
exist: `bench.run --only bksops` makes it), with mysqlclient. Low load by design (one
thread, no gRPC), for profiling while the machine is busy. Modes:

- first: the reply cache off, each node called once (most calls parse their task's tree);
- again: the reply cache off, each node called once before (its tree kept if it fits);
- hit: the reply cache on and each reply built before (the stamp alone).

Prints per call the CPU of this process and the wall time (median, p99); with --profile,
cProfile's 35 dearest functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time

from bench import bksops
from server.auth import Principal
from server.cache import DetailCache
from server.db.bksops import BksopsStore
from server.db.connection import open_database
from server.db.connection import open_read_only
from server.db.store import Store
from server.nodes import read_node_detail
from server.query import NodeQuery

EVERY_BUSINESS = Principal("bench", "bench", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=bksops.LARGE)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--mode", choices=("first", "again", "hit"), default="again")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    url = f"{bksops.MYSQL}/bench_bksops_{args.tasks}"
    store = BksopsStore(
        open_read_only(f"{url}?driver=mysqlclient"), Store(open_database(bksops.own_database()))
    )
    queries = [
        NodeQuery(
            int(r.bk_biz_id),
            False,
            int(r.task_id),
            r.node_id,
            r.component_code,
            tuple(r.subprocess_stack),
            None,
            None,
        )
        for r in bksops.requests(url, args.calls, random.Random(args.tasks))
    ]
    cache = DetailCache(64 * 1024 * 1024) if args.mode == "hit" else None

    def call(query: NodeQuery) -> None:
        with store.session():
            read_node_detail(store, query, lambda text: text, EVERY_BUSINESS, cache)
            store.end_snapshot()

    for query in queries if args.mode != "first" else queries[:20]:
        call(query)
    parsed = store.trees_parsed
    profile = cProfile.Profile() if args.profile else None
    latencies = []
    cpu = time.process_time()
    if profile is not None:
        profile.enable()
    for query in queries:
        began = time.perf_counter()
        call(query)
        latencies.append(time.perf_counter() - began)
    if profile is not None:
        profile.disable()
    cpu = time.process_time() - cpu
    latencies.sort()
    print(
        f"{args.tasks:,} tasks, mode {args.mode}: {len(queries)} calls, "
        f"CPU {cpu / len(queries) * 1e6:.0f} µs a call, "
        f"median {statistics.median(latencies) * 1e3:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms, "
        f"trees parsed {store.trees_parsed - parsed}"
    )
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(35)
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
