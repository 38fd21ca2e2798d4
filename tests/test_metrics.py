"""Prometheus metrics on /metrics: the sum of every worker process, and valid exposition."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server import secrets
from server.app import Server
from server.app import create_server
from server.config import Config
from server.db.apps import AppStore
from server.db.connection import open_database
from server.gateway.client import CallFailed
from server.gateway.local import LocalBackend
from server.gateway.routes import APIGW_PATH
from server.gateway.routes import GET_TASK_NODE_DETAIL
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.gateway.test_commands import seed_on_the_gateway_route
from tests.processes import start_server

SERVICE = "bksops.tasknode.v1.TaskNodeService"
GRPC_PORT = re.compile(r"on 127\.0\.0\.1:(\d+) in \d+ process")
SHIM_URL = re.compile(r"HTTP/JSON shim on (http://127\.0\.0\.1:\d+),")
METRICS_URL = re.compile(r"Prometheus metrics on (http://127\.0\.0\.1:\d+/metrics)")
#: Samples by name and labels (as sorted pairs).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Serving:
    process: subprocess.Popen[str]
    grpc_port: int
    shim_url: str
    metrics_url: str

    def scrape(self) -> str:
        answer = httpx.get(self.metrics_url, timeout=10)
        assert answer.status_code == 200
        return answer.text

    def samples(self) -> Samples:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(self.scrape())
            for sample in family.samples
        }


@contextmanager
def serving(database_url: str, processes: int) -> Iterator[Serving]:
    """`serve --demo` in processes with metrics on a free port; its output read on a
    thread once the addresses are known; stopped (SIGTERM) at the end."""
    env = {
        "TASKNODE_DATABASE_URL": database_url,
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
        "TASKNODE_METRICS_ADDR": "127.0.0.1:0",
        "TASKNODE_GRPC_PROCESSES": str(processes),
        # A process verifies the demo credentials once: its credential reads count it.
        "TASKNODE_AUTH_CACHE_SECONDS": "3600",
    }
    process, found = start_server(["serve", "--demo"], env, GRPC_PORT)
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_read_into, args=(process.stdout, lines))
    reader.start()
    shim_url = metrics_url = ""
    deadline = time.monotonic() + 60
    while not metrics_url:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            raise AssertionError("the metrics address was not printed") from None
        shim = SHIM_URL.search(line)
        shim_url = shim.group(1) if shim else shim_url
        printed = METRICS_URL.search(line)
        metrics_url = printed.group(1) if printed else ""
    try:
        yield Serving(process, int(found.group(1)), shim_url, metrics_url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            reader.join(10)
            process.stdout.close()


def _read_into(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def call_on_new_connection(port: int, credentials: bool = True) -> str:
    """One seed call on a connection of its own (SO_REUSEPORT spreads connections over
    the workers): its status code's name."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel) if credentials else channel)
        try:
            stub.GetTaskNodeDetail(seed_request(), timeout=20)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def handled(samples: Samples, code: str) -> float:
    labels = (("grpc_code", code), ("grpc_method", "GetTaskNodeDetail"), ("grpc_service", SERVICE))
    return samples.get(("tasknode_grpc_server_handled_total", labels), 0.0)


def credential_reads(samples: Samples) -> float:
    """Reads of the demo app's record: one per process that verified it (cache: 1 h)."""
    key = ("tasknode_store_query_duration_seconds_count", (("query", "credentials"),))
    return samples.get(key, 0.0)


def promtool_check(text: str) -> None:
    """promtool check metrics on text; it must pass (CI installs promtool:
    scripts/install-promtool.sh), and a missing promtool fails the test."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/install-promtool.sh"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def worker_pids(parent: int) -> set[int]:
    """The parent's worker processes (not multiprocessing's resource tracker)."""
    listed = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    workers = set()
    for pid in listed.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # it just ended
        if b"spawn_main" in cmdline:
            workers.add(int(pid))
    return workers


def test_metrics_sum_every_worker_and_survive_a_restart(database_url: str) -> None:
    with serving(database_url, processes=2) as server:
        before = server.samples()
        codes = [call_on_new_connection(server.grpc_port) for _ in range(20)]
        codes += [call_on_new_connection(server.grpc_port, credentials=False) for _ in range(3)]
        answers = [seed_on_the_gateway_route(server.shim_url) for _ in range(4)]
        assert codes == ["OK"] * 20 + ["UNAUTHENTICATED"] * 3
        assert all(answer["result"] is True for answer in answers), answers

        after = server.samples()
        # Each process keeps its own credential cache: two reads, two workers served.
        assert credential_reads(after) == 2
        # The shim's requests are calls of the service too (in-process).
        assert handled(after, "OK") - handled(before, "OK") == 20 + 4
        assert handled(after, "UNAUTHENTICATED") - handled(before, "UNAUTHENTICATED") == 3
        refused = ("tasknode_refused_calls_total", (("reason", "CREDENTIALS_MISSING"),))
        assert after[refused] - before.get(refused, 0.0) == 3
        route = (
            "tasknode_http_requests_total",
            (("method", "GET"), ("route", APIGW_PATH), ("status", "200")),
        )
        assert after[route] - before.get(route, 0.0) == 4
        seconds = (
            "tasknode_grpc_server_handling_seconds_count",
            (("grpc_method", "GetTaskNodeDetail"), ("grpc_service", SERVICE)),
        )
        assert after[seconds] - before.get(seconds, 0.0) == 27
        in_flight = (
            "tasknode_grpc_server_calls_in_flight",
            (("grpc_method", "GetTaskNodeDetail"), ("grpc_service", SERVICE)),
        )
        assert after[in_flight] == 0
        assert after[("tasknode_store_connections_in_use", ())] == 0

        # A worker that crashes is started again: what it counted stays in the sum, and
        # what its successor counts is added.
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2
        crashed = min(workers)
        os.kill(crashed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        more = 0
        while credential_reads(server.samples()) < 3:
            assert time.monotonic() < deadline, "the restarted worker served no call"
            if len(worker_pids(server.process.pid) - {crashed}) < 2:
                time.sleep(0.2)  # not started again yet
                continue
            assert call_on_new_connection(server.grpc_port) == "OK"
            more += 1
        final = server.samples()
        assert handled(final, "OK") - handled(before, "OK") == 20 + 4 + more
        assert final[in_flight] == 0
        promtool_check(server.scrape())


def test_one_process_serves_its_own_metrics(tmp_path: Path) -> None:
    with serving(f"sqlite:///{tmp_path / 'db.sqlite'}", processes=1) as server:
        codes = [call_on_new_connection(server.grpc_port) for _ in range(3)]
        assert codes == ["OK"] * 3
        samples = server.samples()
        assert handled(samples, "OK") == 3
        assert samples[("tasknode_reply_cache_hits_total", ())] == 2
        assert samples[("tasknode_reply_cache_misses_total", ())] == 1
        assert samples[("tasknode_credential_cache_misses_total", ())] == 1
        assert samples[("tasknode_credential_cache_hits_total", ())] == 2
        text = server.scrape()
        assert re.search(r'^tasknode_build_info\{.*grpcio_version="[\d.]+".*\} 1\.0$', text, re.M)
        promtool_check(text)


def test_metrics_are_off_by_default() -> None:
    assert Config().metrics_addr == ""
    assert Config.from_env({"TASKNODE_METRICS_ADDR": "127.0.0.1:9464"}).metrics_addr == (
        "127.0.0.1:9464"
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_a_taken_metrics_address_is_a_clear_error(tmp_path: Path, processes: int) -> None:
    with socketserver_on_a_port() as port:
        result = subprocess.run(
            [sys.executable, "-m", "server", "serve"],
            env={
                **os.environ,
                "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
                "TASKNODE_HTTP_ADDR": "",
                "TASKNODE_METRICS_ADDR": f"127.0.0.1:{port}",
                "TASKNODE_GRPC_PROCESSES": str(processes),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@contextmanager
def socketserver_on_a_port() -> Iterator[int]:
    """A port taken by a listening socket for the block."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


#: Apps whose secrets take ~60 ms to check (production scrypt cost), each once: a call
#: with one holds the one call admitted for that long.
SLOW_APPS = [
    {"bk_app_code": f"slow{i}", "bk_app_secret": f"slow-secret-{i}", "bk_username": "ops"}
    for i in range(5)
]


def test_calls_beyond_the_concurrency_limit_are_counted(
    demo_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as slow_hashing:
        slow_hashing.setattr(secrets, "SCRYPT_N", secrets.DEFAULT_SCRYPT_N)
        db = open_database(demo_config.database_url)
        with db.connection_context():
            for app in SLOW_APPS:
                AppStore(db).add(
                    app["bk_app_code"],
                    app["bk_app_secret"],
                    all_businesses=True,
                    may_assert_user=True,
                )
    server = create_server(dataclasses.replace(demo_config, max_concurrent_rpcs=1))
    server.start()
    refusals = {"reason": "CONCURRENCY_LIMIT"}
    in_flight = {"grpc_service": SERVICE, "grpc_method": "GetTaskNodeDetail"}
    before = REGISTRY.get_sample_value("tasknode_refused_calls_total", refusals) or 0.0
    refused = 0
    try:
        # A call sent while the slow one is in flight is refused; on a busy machine the
        # slow one may be done first, so a few tries. Every refusal seen must be counted.
        for app in SLOW_APPS:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                slow = pb_grpc.TaskNodeServiceStub(authorized(channel, app))
                first = slow.GetTaskNodeDetail.future(seed_request(), timeout=20)
                deadline = time.monotonic() + 20
                while not first.done() and not REGISTRY.get_sample_value(
                    "tasknode_grpc_server_calls_in_flight", in_flight
                ):
                    assert time.monotonic() < deadline, "the slow call never started"
                    time.sleep(0.001)
                refused += call_on_new_connection(server.port) == "RESOURCE_EXHAUSTED"
                # The slow call may itself meet the one before, which the server counts
                # as finished only a moment after its caller has its answer.
                try:
                    assert first.result().id
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    refused += 1
            if refused >= 2:
                break
    finally:
        server.stop(None)
    assert refused
    after = REGISTRY.get_sample_value("tasknode_refused_calls_total", refusals)
    assert after == before + refused


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("tasknode_refused_calls_total", {"reason": reason}) or 0.0


def test_calls_refused_while_draining_are_counted(server: Server) -> None:
    before = refusals("SHUTTING_DOWN")
    server.gate.close()
    assert call_on_new_connection(server.port) == "UNAVAILABLE"
    assert refusals("SHUTTING_DOWN") == before + 1


def test_http_requests_beyond_the_limit_are_counted(server: Server) -> None:
    before = refusals("OVERLOADED")
    backend = LocalBackend(server.handlers, server.workers, limit=0)
    with pytest.raises(CallFailed):
        asyncio.run(backend.call(GET_TASK_NODE_DETAIL, seed_request(), [], peer="-"))
    assert refusals("OVERLOADED") == before + 1
