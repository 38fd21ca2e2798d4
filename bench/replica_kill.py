"""A server replica dies under load: what do callers with the client service config see?

Starts two replicas (`python -m server serve`, one process each, gRPC only) on two
ports over one database, and calls GetTaskNodeDetail from N threads over one
channel to both, with the service config of server/service_config.json
(round_robin, reads retried on UNAVAILABLE: server.channels). Halfway through it
SIGKILLs one replica and prints calls/s before and after, the calls that failed
and the longest any call took (the stall a caller saw). With ``--via http`` the
threads call the legacy HTTP route of `python -m server gateway` instead, whose
TASKNODE_GRPC_TARGET names both replicas.

h2load (make bench) cannot balance over two addresses nor retry, so the load is a
grpcio (or httpx) client here: Python threads, a few thousand calls/s at most.

    .venv/bin/python -m bench.replica_kill [--threads 8] [--seconds 10] [--via grpc|http]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field

import grpc
import httpx
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.channels import channel_options
from server.channels import channel_target
from server.cli import DEMO_APP
from server.cli import DEMO_NODE
from server.cli import load_demo_if_empty
from server.config import Config
from tests.processes import running_server

AUTH = (("x-bkapi-authorization", json.dumps(DEMO_APP)),)
READY = re.compile(r"serving \S+ on (127\.0\.0\.1:\d+) in 1 process")
SHIM_READY = re.compile(r"HTTP/JSON shim on (http://127\.0\.0\.1:\d+)")
#: An access line of a GetTaskNodeDetail call answered OK (server.access).
SERVED = re.compile(r"/GetTaskNodeDetail .* OK ")
LEGACY_PATH = "/api/c/compapi/v2/sops/get_task_node_detail/"
#: Seconds of load before the measured windows, once each replica has answered a call.
WARM_UP_SECONDS = 1.0


class Replica:
    """A running `python -m server ...` process, its address, and the GetTaskNodeDetail
    calls it has logged as answered OK (its output is read on a thread: tests.processes)."""

    process: subprocess.Popen[str]
    address: str

    def __init__(self) -> None:
        self.served = 0

    def count(self, line: str) -> None:
        if SERVED.search(line):
            self.served += 1


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], ready: re.Pattern[str]) -> Iterator[Replica]:
    """python -m server <args> with env added, once a line matches ready (its group 1 is
    the address); killed at the end if still running."""
    replica = Replica()
    with running_server(args, env, ready, replica.count) as (process, found):
        replica.process, replica.address = process, found.group(1)
        yield replica


def replica(database_url: str) -> contextlib.AbstractContextManager[Replica]:
    """One replica on database_url: one gRPC process on a free port, no HTTP; its
    address is 127.0.0.1:port."""
    env = {
        "TASKNODE_DATABASE_URL": database_url,
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_GRPC_PROCESSES": "1",
        "TASKNODE_HTTP_ADDR": "",
        "TASKNODE_LOG_LEVEL": "INFO",  # the start line, and the access lines counted
    }
    return running(["serve"], env, READY)


def shim(target: str) -> contextlib.AbstractContextManager[Replica]:
    """`python -m server gateway` on a free port calling target; its address is its URL."""
    env = {"TASKNODE_GRPC_TARGET": target, "TASKNODE_HTTP_ADDR": "127.0.0.1:0"}
    return running(["gateway"], env, SHIM_READY)


@dataclass
class Tally:
    """What the callers saw: calls answered, failures by kind, the longest call (the
    longest stall of a caller) of all and of the calls answered since the last mark."""

    calls: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    longest: float = 0.0
    longest_since_mark: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, seconds: float, failure: str | None) -> None:
        with self.lock:
            self.calls += 1
            self.longest = max(self.longest, seconds)
            self.longest_since_mark = max(self.longest_since_mark, seconds)
            if failure is not None:
                self.failed[failure] += 1

    def mark(self) -> Window:
        """What was answered since the last mark (or the start), and a new mark."""
        with self.lock:
            failed = sum(self.failed.values())
            window = Window(time.monotonic(), self.calls, failed, self.longest_since_mark)
            self.longest_since_mark = 0.0
            return window


@dataclass(frozen=True)
class Window:
    """A Tally's counts at a mark, and the longest call answered since the mark before."""

    at: float
    calls: int
    failed: int
    longest: float

    def since(self, earlier: Window) -> str:
        """calls/s, failures and longest call between earlier and this mark."""
        seconds = self.at - earlier.at
        return (
            f"{(self.calls - earlier.calls) / seconds:,.0f} calls/s,"
            f" {self.failed - earlier.failed} failed, longest call {self.longest * 1000:.0f} ms"
        )


@contextlib.contextmanager
def load(call: Callable[[], None], threads: int, rate: float = 0.0) -> Iterator[Tally]:
    """threads calling call() back to back (each at most rate calls/s if rate) until the
    block ends; a call fails when it raises: a gRPC status by its code name, anything
    else by its message."""
    tally = Tally()
    done = threading.Event()

    def caller() -> None:
        pause = 1 / rate if rate else 0.0
        due = time.monotonic()
        while not done.is_set():
            started = time.monotonic()
            failure = None
            try:
                call()
            except grpc.RpcError as exc:
                failure = exc.code().name
            except Exception as exc:
                failure = str(exc) or type(exc).__name__
            tally.record(time.monotonic() - started, failure)
            due = max(due + pause, time.monotonic() - 1)
            done.wait(max(0.0, due - time.monotonic()))

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield tally
    finally:
        done.set()
        for worker in workers:
            worker.join(30)


@contextlib.contextmanager
def grpc_reads(
    target: str, options: list[tuple[str, object]] | None = None
) -> Iterator[Callable[[], None]]:
    """A GetTaskNodeDetail call of the demo node over one channel to target, with the
    service config unless other options are given; the channel is closed at the end."""
    with grpc.insecure_channel(
        channel_target(target), options=channel_options() if options is None else options
    ) as channel:
        method = pb_grpc.TaskNodeServiceStub(channel).GetTaskNodeDetail
        request = pb.GetTaskNodeDetailRequest(**DEMO_NODE)  # type: ignore[arg-type]

        def call() -> None:
            method(request, metadata=AUTH, timeout=10)

        yield call


@contextlib.contextmanager
def http_reads(url: str) -> Iterator[Callable[[], None]]:
    """A GET of the demo node on the shim's legacy route; fails unless 200 and result
    true. One client for every thread (a client costs tens of ms to build), closed at
    the end."""
    params = {
        **DEMO_APP,
        **DEMO_NODE,
        "subprocess_stack": json.dumps(DEMO_NODE["subprocess_stack"]),
    }
    limits = httpx.Limits(max_connections=64)
    with httpx.Client(base_url=url, timeout=10, limits=limits) as client:

        def call() -> None:
            answer = client.get(LEGACY_PATH, params=params)
            if answer.status_code != 200 or answer.json()["result"] is not True:
                raise RuntimeError(f"HTTP {answer.status_code} {answer.text[:200]}")

        yield call


def warm_up(call: Callable[[], None], replicas: list[Replica], seconds: float = 60) -> None:
    """Call until every replica has answered one (a replica's first call checks the
    credentials with a slow hash, on a low-priority thread), at most seconds."""
    deadline = time.monotonic() + seconds
    while not all(replica.served for replica in replicas):
        if time.monotonic() > deadline:
            raise RuntimeError("a replica answered no call")
        call()
        time.sleep(0.05)


def kill(victim: Replica) -> None:
    """SIGKILL the replica and wait for it to be gone."""
    victim.process.kill()
    victim.process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--via", choices=("grpc", "http"), default="grpc")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replica-kill-") as work:
        url = f"sqlite:///{work}/tasknode.db"
        load_demo_if_empty(Config(database_url=url))
        with replica(url) as first, replica(url) as second:
            target = f"{first.address},{second.address}"
            with contextlib.ExitStack() as stack:
                if args.via == "http":
                    reads = http_reads(stack.enter_context(shim(target)).address)
                else:
                    reads = grpc_reads(target)
                call = stack.enter_context(reads)
                half = args.seconds / 2
                warm_up(call, [first, second])
                with load(call, args.threads) as tally:
                    time.sleep(WARM_UP_SECONDS)
                    start = tally.mark()
                    time.sleep(half)
                    before = tally.mark()
                    kill(first)
                    time.sleep(half)
                    after = tally.mark()
            print(
                f"{args.via}, {args.threads} threads, SIGKILL of one of 2 replicas after"
                f" {half:g} s (it had served {first.served} calls):"
            )
            print(f"  before: {before.since(start)}")
            print(f"  after:  {after.since(before)}")
            failures = ", ".join(f"{k} {v}" for k, v in tally.failed.items()) or "none"
            print(f"  in all, warm-up included: {tally.calls} calls, failed: {failures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
