"""Watch streams across real server processes: SIGTERM ends a stream with a status to
resume from, and another process resumes it from its token, missing nothing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.config import Config
from server.db.connection import open_database
from tests import documents
from tests.conftest import ALL_APP
from tests.processes import start_server
from tests.test_watch import _node_request
from tests.test_watch import error_info
from tests.test_watch import revision

WATCH_PORT = re.compile(r"serving the watch streams on [0-9.]+:(\d+)")
METADATA = [("x-bkapi-authorization", json.dumps(ALL_APP))]


@contextmanager
def serving(database_url: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`serve` in one process on database_url, every port free: (process, watch port)."""
    env = {
        "TASKNODE_DATABASE_URL": database_url,
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_WATCH_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "",
        "TASKNODE_GRPC_PROCESSES": "1",
        "TASKNODE_WATCH_INTERVAL": "0.05",
        "TASKNODE_WATCH_HEARTBEAT_SECONDS": "0.3",
        "TASKNODE_SHUTDOWN_GRACE_SECONDS": "2",
    }
    process, found = start_server(["serve"], env, WATCH_PORT)
    try:
        yield process, int(found.group(1))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


def test_sigterm_ends_a_stream_resumable_on_another_process(demo_config: Config) -> None:
    db = open_database(demo_config.database_url)
    documents.load(db, revision(0))
    with serving(demo_config.database_url) as (first, first_port):
        with grpc.insecure_channel(f"127.0.0.1:{first_port}") as channel:
            stream = pb_grpc.TaskNodeServiceStub(channel).WatchTaskNode(
                _node_request(), metadata=METADATA, timeout=20
            )
            token = next(stream).resume_token
            first.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stream:
                    pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        info = error_info(caught.value)
        assert info.reason == "SHUTTING_DOWN"
        assert info.metadata["resumeToken"] == token
        assert first.wait(20) == 0
    documents.load(db, revision(1))  # changed while no process served the stream
    with (
        serving(demo_config.database_url) as (_, second_port),
        grpc.insecure_channel(f"127.0.0.1:{second_port}") as channel,
    ):
        stub = pb_grpc.TaskNodeServiceStub(channel)
        resumed = stub.WatchTaskNode(_node_request(token), metadata=METADATA, timeout=20)
        changed = next(resumed)
        assert changed.detail.version == "r1"
        resumed.cancel()
        # From the new token, nothing new: a heartbeat, not the same detail again.
        again = stub.WatchTaskNode(
            _node_request(changed.resume_token), metadata=METADATA, timeout=20
        )
        assert next(again).HasField("heartbeat_time")
        again.cancel()
