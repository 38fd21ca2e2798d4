"""TASKNODE_LOG_FORMAT=json: every line a real `serve` writes is one JSON object with the
stable keys, access lines (gRPC and HTTP, served and refused) with their fields."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.access import AccessLog
from server.cli import DEMO_APP
from server.cli import DEMO_TOKEN
from server.logs import JsonFormatter
from tests.conftest import seed_request
from tests.gateway.test_auth_routes import ESB_V2
from tests.gateway.test_auth_routes import GRANTED
from tests.gateway.test_auth_routes import HEADER
from tests.processes import start_server
from tests.raw_grpc import raw_call

GET_DETAIL = "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
KEYS = {"time", "level", "logger", "message", "trace_id"}


def json_env(tmp_path: Path) -> dict[str, str]:
    return {
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'tasknode.db'}",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
        "TASKNODE_GRPC_PROCESSES": "2",
        "TASKNODE_LOG_FORMAT": "json",
    }


def test_every_line_of_a_json_run_is_an_object_with_the_stable_keys(tmp_path: Path) -> None:
    process, found = start_server(
        ["serve", "--demo"],
        json_env(tmp_path),
        re.compile(r"serving \S+ on 127\.0\.0\.1:(\d+)"),
    )
    assert process.stdout is not None
    try:
        printed = [found.string]
        for line in process.stdout:
            printed.append(line)
            shim = re.search(r"HTTP/JSON shim on (http://127\.0\.0\.1:\d+)", line)
            if shim:
                break
        assert shim, "".join(printed)
        grpc_target = f"127.0.0.1:{found.group(1)}"
        good = json.dumps(DEMO_APP)
        wrong = json.dumps({**DEMO_APP, "bk_app_secret": "not-the-secret"})
        with grpc.insecure_channel(grpc_target) as channel:
            stub = pb_grpc.TaskNodeServiceStub(channel)
            stub.GetTaskNodeDetail(
                seed_request(), metadata=[(HEADER, good), ("traceparent", TRACEPARENT)], timeout=10
            )
            try:
                stub.GetTaskNodeDetail(seed_request(), metadata=[(HEADER, wrong)], timeout=10)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                raise AssertionError("a wrong secret was accepted")
        # Bytes that are not a request, and a header that is not UTF-8.
        raw_call(grpc_target, GET_DETAIL, [(HEADER.encode(), b"\xff\xfe")], b"\xff\x01")
        with httpx.Client(base_url=shim.group(1), timeout=10) as http:
            params = {**GRANTED.legacy_params(), **DEMO_APP, "bk_token": DEMO_TOKEN}
            ok = http.get(ESB_V2, params=params, headers={"traceparent": TRACEPARENT})
            assert ok.json()["result"] is True, ok.text
            refused = http.get(ESB_V2, params={**params, "bk_app_secret": "not-the-secret"})
            assert refused.json()["result"] is False
            assert http.get("/no/such/route").status_code == 404
            assert http.request("BREW", ESB_V2).status_code in (400, 405, 501)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        printed.extend(process.stdout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()

    records = [_parsed(line) for line in printed]
    for record in records:
        assert record.keys() >= KEYS, record
        assert datetime.fromisoformat(record["time"]).tzinfo is not None, record
    grpc_lines = [r for r in records if r["logger"] == "tasknode.access"]
    http_lines = [r for r in records if r["logger"] == "tasknode.access.http"]
    # The caller's trace id: its own call, and the shim's call for its request.
    traced_calls = [r for r in grpc_lines if r["outcome"] == "OK" and r["trace_id"] == TRACE_ID]
    assert len(traced_calls) == 2, grpc_lines
    served = [r for r in traced_calls if r["request_id"] is None]
    assert len(served) == 1 and served[0]["method"] == GET_DETAIL, traced_calls
    assert (served[0]["app"], served[0]["user"]) == ("esb_test", "admin")
    assert served[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert isinstance(served[0]["duration_ms"], float)
    refusals = [r for r in grpc_lines if r["outcome"] == "UNAUTHENTICATED/CREDENTIALS_INVALID"]
    assert len(refusals) == 2, grpc_lines  # over gRPC, and through the shim
    assert all((r["app"], r["user"]) == ("esb_test", None) for r in refusals), refusals
    malformed = [r for r in grpc_lines if r["outcome"] == "INVALID_ARGUMENT/MALFORMED_REQUEST"]
    assert len(malformed) == 1 and malformed[0]["app"] is None, grpc_lines
    answered = {(r["path"].split("?")[0], r["status"]) for r in http_lines}
    assert {(ESB_V2, 200), ("/no/such/route", 404)} <= answered, http_lines
    traced = [r for r in http_lines if r["trace_id"] == TRACE_ID]
    assert len(traced) == 1 and traced[0]["status"] == 200, http_lines
    # The shim's call to gRPC carries its request id and the caller's trace: the two lines
    # of one request meet.
    assert traced[0]["request_id"] in {r["request_id"] for r in traced_calls}, grpc_lines
    assert all(re.fullmatch(r"[0-9a-f]{32}", r["request_id"]) for r in http_lines), http_lines


def _parsed(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise AssertionError(f"not one JSON object: {line!r}") from exc
    assert isinstance(record, dict), line
    return record


def test_a_log_format_it_does_not_know_stops_the_start(tmp_path: Path) -> None:
    env = {**os.environ, **json_env(tmp_path), "TASKNODE_LOG_FORMAT": "xml"}
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "TASKNODE_LOG_FORMAT: 'xml' is not one of text, json" in done.stderr
    assert not (tmp_path / "tasknode.db").exists()


def test_a_traceback_and_a_batch_of_access_lines_stay_one_object_a_line() -> None:
    formatter = JsonFormatter(worker=3)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "it\nfailed", (), sys.exc_info()
        )
    failed = formatter.format(record)
    assert "\n" not in failed
    parsed = json.loads(failed)
    assert (parsed["message"], parsed["worker"], parsed["trace_id"]) == ("it\nfailed", 3, None)
    assert "ValueError: bad\nvalue" in parsed["exception"]

    access = AccessLog(flush_seconds=3600)
    try:
        access.record("ipv4:1.2.3.4:5", "/a", "app", "-", "OK", 1.5, "r1", "-")
        access.record("ipv4:1.2.3.4:5", "/b", "app\n", "u", "OK", 2.0, "-", TRACEPARENT)
        batch = logging.LogRecord("tasknode.access", logging.INFO, __file__, 1, "", (), None)
        batch.msg = access._take()
    finally:
        access.stop()
    lines = [json.loads(line) for line in formatter.format(batch).split("\n")]
    assert [(r["method"], r["user"], r["request_id"], r["trace_id"]) for r in lines] == [
        ("/a", None, "r1", None),
        ("/b", "u", None, TRACEPARENT),
    ]
    assert lines[1]["app"] == "app\n" and "app=app? " in lines[1]["message"]
