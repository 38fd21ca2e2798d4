"""A whole run of `python -m server serve --demo` prints no secret or token, right or wrong,
and still names the app and peer of each failed attempt and the app and user of each call."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import seed_request
from tests.gateway.test_auth_routes import ESB_V2
from tests.gateway.test_auth_routes import GRANTED
from tests.gateway.test_auth_routes import HEADER
from tests.gateway.test_auth_routes import INVALID
from tests.gateway.test_auth_routes import ROUTES
from tests.gateway.test_auth_routes import UNAUTHENTICATED
from tests.gateway.test_auth_routes import UNVERIFIED
from tests.gateway.test_auth_routes import Case
from tests.gateway.test_auth_routes import expected
from tests.gateway.test_auth_routes import seen
from tests.raw_grpc import raw_call

APP = "logcheck"
WRONG_SECRET = f"wrong-secret-{uuid.uuid4().hex}"
WRONG_TOKEN = f"wrong-token-{uuid.uuid4().hex}"
#: X-Bkapi-Authorization values the server cannot read, each holding a wrong secret or token.
MALFORMED = [
    '{"bk_app_code": "logcheck", "bk_app_secret": "' + WRONG_SECRET,
    json.dumps([APP, WRONG_SECRET]),
    json.dumps({"bk_app_code": APP, "bk_app_secret": WRONG_SECRET * 8, "bk_username": "bob"}),
    json.dumps({"bk_app_code": APP, "bk_app_secret": "s", "bk_token": {"t": WRONG_TOKEN}}),
]
#: The code of a credential failure in the body of each route style: ESB, gateway, canonical.
REFUSED = {1306000, 1640001, 16}
GET_DETAIL = "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"


def not_utf8(credentials: dict[str, str]) -> bytes:
    """X-Bkapi-Authorization bytes for credentials, with a byte that is not UTF-8 in the
    user name: no gRPC client sends them, so they go as raw HTTP/2 or HTTP headers."""
    text = json.dumps({**credentials, "bk_username": "bob\xff"}, ensure_ascii=False)
    return text.encode("latin-1")


PEER = r"peer=ipv4:127\.0\.0\.1:\d+"


class Run:
    """`python -m server serve --demo` in a subprocess, its stdout and stderr read as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--demo"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.printed: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="server-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The match of pattern in the next line printed that has one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                printed = "".join(self.printed)
                raise AssertionError(f"no line matches {pattern!r}; printed:\n{printed}")
            self.printed.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM; once the run has exited, everything it printed."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout) == 0
        self._reader.join(timeout)
        while not self._lines.empty():
            line = self._lines.get_nowait()
            if line is not None:
                self.printed.append(line)
        return "".join(self.printed)

    def close(self) -> None:
        """Kill the run if it is still going, and close its pipe."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture(params=["text", "json"])
def env(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of a run on a SQLite file, on free ports, with two gRPC workers,
    logging in each format."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TASKNODE_")}
    return {
        **inherited,
        "TASKNODE_LOG_FORMAT": request.param,
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'tasknode.db'}",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
        "TASKNODE_GRPC_PROCESSES": "2",
    }


@pytest.fixture
def run(env: dict[str, str]) -> Iterator[Run]:
    started = Run(env)
    try:
        yield started
    finally:
        started.close()


def admin(env: dict[str, str], *args: str) -> str:
    """What a `python -m server` admin command prints."""
    done = subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def grpc_reason(channel: grpc.Channel, header: str) -> str:
    """The ErrorInfo reason of a call with header as x-bkapi-authorization; "OK" if none."""
    stub = pb_grpc.TaskNodeServiceStub(channel)
    try:
        stub.GetTaskNodeDetail(seed_request(), metadata=[(HEADER, header)], timeout=10)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        info = error_details_pb2.ErrorInfo()
        assert status is not None and status.details[0].Unpack(info)
        return info.reason
    return "OK"


def messages(output: str) -> str:
    """The text of a JSON run's lines, each line's message and traceback on lines of its
    own, as a text run prints them; every line must be one JSON object."""
    texts = []
    for line in output.splitlines():
        record = json.loads(line)
        texts += [record["message"], *([record["exception"]] if "exception" in record else [])]
    return "".join(f"{text}\n" for text in texts)


def test_a_run_logs_who_failed_and_who_called_but_no_secret(env: dict[str, str], run: Run) -> None:
    grpc_port = run.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1)
    base = run.wait_for(r"HTTP/JSON shim on (http://127\.0\.0\.1:\d+)").group(1)
    added = admin(env, "apps", "add", APP, "--business", "2", "--may-assert-user")
    secret = re.search(r"^bk_app_secret=(\S+)$", added, re.M)
    assert secret, added
    token = admin(env, "tokens", "issue", "alice").strip()
    as_bob = {"bk_app_code": APP, "bk_app_secret": secret.group(1), "bk_username": "bob"}
    as_alice = {"bk_app_code": APP, "bk_app_secret": secret.group(1), "bk_token": token}
    attempts = [
        (as_bob, Case(as_bob, GRANTED)),
        (as_alice, Case(as_alice, GRANTED)),
        (
            {**as_bob, "bk_app_secret": WRONG_SECRET},
            Case({}, GRANTED, UNAUTHENTICATED, "CREDENTIALS_INVALID", INVALID),
        ),
        (
            {**as_alice, "bk_token": WRONG_TOKEN},
            Case({}, GRANTED, UNAUTHENTICATED, "USER_UNVERIFIED", UNVERIFIED),
        ),
    ]

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        for credentials, case in attempts:
            assert grpc_reason(channel, json.dumps(credentials)) == (case.reason or "OK")
        for header in MALFORMED:
            assert grpc_reason(channel, header) == "CREDENTIALS_INVALID"
    for credentials in (as_bob, {**as_bob, "bk_app_secret": WRONG_SECRET}):
        metadata = [(HEADER.encode(), not_utf8(credentials))]
        reply = raw_call(
            f"127.0.0.1:{grpc_port}", GET_DETAIL, metadata, seed_request().SerializeToString()
        )
        assert (reply.code, reply.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_INVALID",
        )
    with httpx.Client(base_url=base, timeout=10) as http:
        for route, (style, call) in ROUTES.items():
            for credentials, case in attempts:
                assert seen(call(http, credentials, GRANTED)) == expected(style, case), route
        unreadable_headers = [
            *(header.encode() for header in MALFORMED),
            *(not_utf8(c) for c in (as_bob, {**as_bob, "bk_app_secret": WRONG_SECRET})),
        ]
        for value in unreadable_headers:
            for path in (
                ESB_V2,
                "/get_task_node_detail/10/2/",
                "/v1/businesses/2/tasks/10/nodes/x",
            ):
                response = http.get(
                    path, params=GRANTED.legacy_params(), headers={HEADER.encode(): value}
                )
                assert response.json()["code"] in REFUSED, (path, response.text)
        too_long = {**as_bob, "bk_app_secret": WRONG_SECRET * 8, **GRANTED.legacy_params()}
        assert http.get(ESB_V2, params=too_long).json()["code"] in REFUSED
    output = run.stop()

    leaks = [
        piece
        for value in (secret.group(1), token, WRONG_SECRET, WRONG_TOKEN)
        for piece in (value, value[:12], value[-12:])
        if piece in output
    ]
    assert leaks == [], output
    if env["TASKNODE_LOG_FORMAT"] == "json":
        output = messages(output)
    calls = 1 + len(ROUTES)  # each attempt once over gRPC, once on every HTTP route
    for reason in ("CREDENTIALS_INVALID", "USER_UNVERIFIED"):
        failed = rf"authentication failed: app='{APP}' {PEER} reason={reason}\n"
        assert len(re.findall(failed, output)) == calls, output
    unreadable = rf"authentication failed: app='' {PEER} reason=CREDENTIALS_INVALID\n"
    assert len(re.findall(unreadable, output)) >= len(MALFORMED) + 2, output
    assert "grpcio received a value that is not UTF-8: <" in output
    for user in ("bob", "alice"):
        line = rf"access \S+ ipv4:127\.0\.0\.1:\d+ \S+/GetTaskNodeDetail app={APP} user={user} OK "
        assert len(re.findall(line, output)) == calls, output
    for path in (ESB_V2, "/api/c/compapi/sops/get_task_node_detail/", "/get_task_node_detail/"):
        assert re.search(rf"http \S+ 127\.0\.0\.1:\d+ GET {path}\S* 200 ", output), output
    assert "stopped" in output
