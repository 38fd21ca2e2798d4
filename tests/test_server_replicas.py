"""Several replicas: a replica SIGKILLed under load costs callers with the client service
config no read, over gRPC or through the HTTP shim.

Two real `python -m server serve` processes on two ports over one database; callers
on threads (bench.replica_kill's load generator) read the demo node over one channel
to both. One replica is stopped (SIGSTOP) while calls pile up on it, then SIGKILLed:
the calls it holds die mid-call. A bare round_robin channel without the retry policy
runs beside, and loses calls: the kill did drop calls in flight, and the config is
what saves them.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf import descriptor_pool

from bench import replica_kill
from bench.replica_kill import Replica
from server import channels
from server.app import create_server
from server.cli import load_demo_if_empty
from server.config import Config

#: Calls/s per caller thread, and threads: a few hundred calls/s in all.
RATE = 50
THREADS = 6
#: The victim is stopped until no caller has been answered for this long (each has a
#: call stuck on it), at most STOPPED_SECONDS, then killed.
QUIET_SECONDS = 0.3
STOPPED_SECONDS = 5.0
#: Seconds of load before the kill.
BEFORE_SECONDS = 1.0
#: Calls answered after the kill that show the survivor serving every caller (a few
#: each), and the most seconds they may take (the machine may be loaded).
SURVIVOR_ANSWERS = 10 * THREADS
AFTER_SECONDS_AT_MOST = 30.0
README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_service_config_retries_every_read_of_the_service_on_unavailable_only() -> None:
    config = json.loads(channels.service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    reads, watches = config["methodConfig"]
    service = descriptor_pool.Default().FindServiceByName("bksops.tasknode.v1.TaskNodeService")
    # Every method is a read: a new method must be added here, or get a config of its own.
    named = [name["method"] for config in (reads, watches) for name in config["name"]]
    assert sorted(named) == sorted(method.name for method in service.methods)
    streams = {m.name for m in service.methods if m.server_streaming}
    assert {name["method"] for name in watches["name"]} == streams
    # A stream lives until its caller ends it: a timeout there would cut every watch.
    assert reads["timeout"] == "10s" and "timeout" not in watches
    for method_config in (reads, watches):
        assert {name["service"] for name in method_config["name"]} == {service.full_name}
        assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert pb.DESCRIPTOR.package == "bksops.tasknode.v1"


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("127.0.0.1:5001", "127.0.0.1:5001"),
        ("127.0.0.1:5001, 127.0.0.1:5002", "ipv4:127.0.0.1:5001,127.0.0.1:5002"),
        ("[::1]:5001,[::1]:5002", "ipv6:[::1]:5001,[::1]:5002"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
        ("dns:///tasknode.internal:50051", "dns:///tasknode.internal:50051"),
    ],
)
def test_targets(spec: str, target: str) -> None:
    assert channels.channel_target(spec) == target


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "10.0.0.1"),
        ("ipv6:[::1]:5001,[::2]:5001", "::1"),
        ("10.0.0.1:50051", ""),
        ("ipv4:10.0.0.1:50051", ""),
        ("dns:///tasknode.internal:50051", ""),
    ],
)
def test_the_tls_name_of_a_list_is_its_first_host(target: str, name: str) -> None:
    assert channels.tls_name(target) == name


@pytest.mark.parametrize("spec", ["a.internal:1,b.internal:1", "127.0.0.1:1,[::1]:1", "1.2.3.4,"])
def test_a_list_gRPC_cannot_resolve_is_refused(spec: str) -> None:
    with pytest.raises(channels.BadTarget):
        channels.channel_target(spec)


def kill_one_under_load(
    first: Replica,
    second: Replica,
    call: Callable[[], None],
    bare: Callable[[], None] | None = None,
) -> tuple[replica_kill.Tally, replica_kill.Tally | None, int]:
    """Readers through call (and bare, if given) while first is stopped, then killed:
    (what call's readers saw, what bare's saw, calls answered after the kill)."""
    replica_kill.warm_up(call, [first, second])
    with (
        replica_kill.load(call, THREADS, RATE) as tally,
        replica_kill.load(bare, 2, RATE) if bare else contextlib.nullcontext() as bare_tally,
    ):
        time.sleep(BEFORE_SECONDS)
        assert first.served and second.served, "round_robin sends calls to both"
        stop_until_stuck(first, [tally, *([bare_tally] if bare_tally else [])])
        killed = tally.mark()
        limit = time.monotonic() + AFTER_SECONDS_AT_MOST
        while tally.calls - killed.calls < SURVIVOR_ANSWERS and time.monotonic() < limit:
            time.sleep(0.05)
        after = tally.calls - killed.calls
    return tally, bare_tally, after


def stop_until_stuck(victim: Replica, tallies: list[replica_kill.Tally]) -> None:
    """SIGSTOP victim; once the tallies' callers have had no answer for QUIET_SECONDS (each
    has a call on the victim: round_robin sends every caller's calls to both in turn), or
    after STOPPED_SECONDS, SIGKILL it: the calls it holds die mid-call."""
    victim.process.send_signal(signal.SIGSTOP)
    limit = time.monotonic() + STOPPED_SECONDS
    seen, since = sum(t.calls for t in tallies), time.monotonic()
    while time.monotonic() < limit and time.monotonic() - since < QUIET_SECONDS:
        time.sleep(0.02)
        if sum(t.calls for t in tallies) != seen:
            seen, since = sum(t.calls for t in tallies), time.monotonic()
    replica_kill.kill(victim)


def report(what: str, tally: replica_kill.Tally, after: int | None = None) -> None:
    survivor = "" if after is None else f" {after} answered after the kill,"
    print(
        f"\n{what}: {tally.calls} calls, failed {dict(tally.failed) or 0},{survivor}"
        f" longest call {tally.longest * 1000:.0f} ms (the victim was stopped first, until"
        f" its callers had waited {QUIET_SECONDS * 1000:.0f} ms)"
    )


@contextlib.contextmanager
def big_batches(target: str) -> Iterator[Callable[[], None]]:
    """A BatchGetTaskNodeDetails call of a request over gRPC's default retry buffer (256
    KiB), on a channel of its own with the service config: its calls alternate between
    the replicas, so one of any two is on the victim. Its items are refused at once (a
    stack deeper than 32), so that it costs the servers little; the call itself is OK."""
    stack = [f"node{i:028x}" for i in range(1000)]
    item = pb.GetTaskNodeDetailRequest(bk_biz_id="2", task_id="10", node_id=stack[0])
    item.subprocess_stack.extend(stack)
    request = pb.BatchGetTaskNodeDetailsRequest(requests=[item] * 10)
    assert request.ByteSize() > 300 * 1024
    options = [*channels.channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(channels.channel_target(target), options=options) as channel:
        method = pb_grpc.TaskNodeServiceStub(channel).BatchGetTaskNodeDetails

        def call() -> None:
            method(request, metadata=replica_kill.AUTH, timeout=10)

        yield call


def test_a_replica_killed_mid_call_costs_no_read(demo_config: Config) -> None:
    with (
        replica_kill.replica(demo_config.database_url) as first,
        replica_kill.replica(demo_config.database_url) as second,
    ):
        both = f"{first.address},{second.address}"
        without_retries = [("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 0)]
        with (
            replica_kill.grpc_reads(both) as call,
            replica_kill.grpc_reads(both, without_retries) as bare,
            big_batches(both) as batch,
            replica_kill.load(batch, 1) as batches,
        ):
            tally, bare_tally, after = kill_one_under_load(first, second, call, bare)
    report("gRPC with the service config", tally, after)
    assert bare_tally is not None
    report("gRPC, round_robin without retries", bare_tally)
    report("gRPC, batches of 300 KiB with the service config", batches)
    assert tally.failed == {}, tally.failed
    assert batches.failed == {}, batches.failed
    assert batches.calls > 0
    assert after >= SURVIVOR_ANSWERS, "the survivor keeps answering"
    assert bare_tally.failed.get("UNAVAILABLE"), "the kill dropped calls in flight"
    assert set(bare_tally.failed) == {"UNAVAILABLE"}, bare_tally.failed


def test_http_callers_of_a_shim_over_two_replicas_see_no_failed_request(
    demo_config: Config,
) -> None:
    with (
        replica_kill.replica(demo_config.database_url) as first,
        replica_kill.replica(demo_config.database_url) as second,
        replica_kill.shim(f"{first.address},{second.address}") as shim,
        replica_kill.http_reads(shim.address) as call,
    ):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", shim.address)
        tally, _, after = kill_one_under_load(first, second, call)
    report("HTTP through the shim", tally, after)
    assert tally.failed == {}, tally.failed
    assert after >= SURVIVOR_ANSWERS, "the survivor keeps answering"


def readme_block(language: str) -> str:
    """The first ```language block of the README's "Several replicas" section."""
    section = README.read_text(encoding="utf-8").split("\n## Several replicas\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_shows_the_service_config_in_use() -> None:
    assert json.loads(readme_block("json")) == json.loads(channels.service_config())


def test_the_readme_python_example_works(sqlite_config: Config) -> None:
    load_demo_if_empty(sqlite_config)
    servers = [create_server(sqlite_config) for _ in range(2)]
    for server in servers:
        server.start()
    try:
        addresses = ",".join(f"127.0.0.1:{server.port}" for server in servers)
        example = readme_block("python")
        assert "127.0.0.1:50051,127.0.0.1:50052" in example
        code = example.replace("127.0.0.1:50051,127.0.0.1:50052", addresses)
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=README.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        for server in servers:
            server.stop(None)
    assert (result.returncode, result.stdout, result.stderr) == (0, "NODE_STATE_FINISHED\n", "")
