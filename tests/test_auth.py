"""Authentication and business scoping of TaskNodeService calls over gRPC."""

from __future__ import annotations

import json
import logging
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server import secrets
from server.app import Server
from server.app import create_server
from server.auth import Credentials
from server.cli import DEMO_APP
from server.config import Config
from server.db.apps import AppStore
from tests.conftest import ALL_APP
from tests.conftest import seed_request

ROOT = Path(__file__).resolve().parent.parent
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
THROTTLED = grpc.StatusCode.RESOURCE_EXHAUSTED
OTHER_BUSINESS_TASK = seed_request(
    bk_biz_id="3",
    task_id="20",
    node_id="node708192a3b4c5d6e7f8091a2b3c4d",
    subprocess_stack=[],
    component_code="",
)


@pytest.fixture
def apps(server: Server) -> Iterator[AppStore]:
    """The running server's credential store, to add and change apps."""
    store = AppStore(server.store.db)
    with server.store.db.connection_context():
        yield store


def call(
    channel: grpc.Channel, credentials: object, request: pb.GetTaskNodeDetailRequest
) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason or "", message) of a call with the given header value."""
    stub = pb_grpc.TaskNodeServiceStub(channel)
    metadata = []
    if credentials is not None:
        text = credentials if isinstance(credentials, str) else json.dumps(credentials)
        metadata.append(("x-bkapi-authorization", text))
    try:
        stub.GetTaskNodeDetail(request, metadata=metadata, timeout=5)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        info = error_details_pb2.ErrorInfo()
        assert status is not None and status.details[0].Unpack(info)
        return error.code(), info.reason, error.details() or ""
    return grpc.StatusCode.OK, "", ""


def creds(**changes: str) -> dict[str, str]:
    return {**DEMO_APP, **changes}


MATRIX = [
    ("no credentials", None, UNAUTHENTICATED, "CREDENTIALS_MISSING"),
    ("empty object", {}, UNAUTHENTICATED, "CREDENTIALS_MISSING"),
    ("no secret", {"bk_app_code": "esb_test"}, UNAUTHENTICATED, "CREDENTIALS_MISSING"),
    ("not JSON", "{bk_app_code", UNAUTHENTICATED, "CREDENTIALS_INVALID"),
    ("not an object", "[1]", UNAUTHENTICATED, "CREDENTIALS_INVALID"),
    (
        "a number for a field",
        {**DEMO_APP, "bk_app_secret": 1},
        UNAUTHENTICATED,
        "CREDENTIALS_INVALID",
    ),
    ("unknown app", creds(bk_app_code="nobody"), UNAUTHENTICATED, "CREDENTIALS_INVALID"),
    ("wrong secret", creds(bk_app_secret="guess"), UNAUTHENTICATED, "CREDENTIALS_INVALID"),
    (
        "no user",
        {"bk_app_code": "esb_test", "bk_app_secret": "xxx"},
        UNAUTHENTICATED,
        "USER_UNVERIFIED",
    ),
    (
        "bad token",
        {**creds(), "bk_username": "", "bk_token": "forged"},
        UNAUTHENTICATED,
        "USER_UNVERIFIED",
    ),
    ("granted business", creds(), grpc.StatusCode.OK, ""),
]


@pytest.mark.parametrize(
    ("case", "credentials", "code", "reason"), MATRIX, ids=[m[0] for m in MATRIX]
)
def test_credentials_matrix(
    channel: grpc.Channel, case: str, credentials: object, code: grpc.StatusCode, reason: str
) -> None:
    assert call(channel, credentials, seed_request())[:2] == (code, reason)


def test_revoked_app_is_refused(channel: grpc.Channel, apps: AppStore) -> None:
    apps.add("short-lived", "s3cret", businesses=[2], may_assert_user=True)
    apps.revoke("short-lived")
    revoked = {"bk_app_code": "short-lived", "bk_app_secret": "s3cret", "bk_username": "u"}
    assert call(channel, revoked, seed_request())[:2] == (UNAUTHENTICATED, "CREDENTIALS_INVALID")
    wrong = {**revoked, "bk_app_secret": "guess"}
    assert call(channel, revoked, seed_request())[2] == call(channel, wrong, seed_request())[2]


def test_ungranted_business_is_denied(channel: grpc.Channel) -> None:
    code, reason, message = call(channel, creds(), OTHER_BUSINESS_TASK)
    assert (code, reason) == (DENIED, "BUSINESS_NOT_GRANTED")
    assert (
        message == "APP [esb_test] has no permission to perform action [task_view] on business [3]"
    )


def test_denial_says_nothing_about_the_task(channel: grpc.Channel) -> None:
    exists = call(channel, creds(), OTHER_BUSINESS_TASK)
    missing = call(
        channel, creds(), seed_request(bk_biz_id="3", task_id="424242", subprocess_stack=[])
    )
    no_business = call(channel, creds(), seed_request(bk_biz_id="3", node_id="nodeunknown"))
    assert exists == missing == no_business


def test_scope_project_is_checked_against_its_business(channel: grpc.Channel) -> None:
    own = seed_request(bk_biz_id="1", scope=pb.SCOPE_PROJECT)
    assert call(channel, creds(), own)[0] == grpc.StatusCode.OK
    other = seed_request(bk_biz_id="5", task_id="20", scope=pb.SCOPE_PROJECT)
    unknown = seed_request(bk_biz_id="77", task_id="20", scope=pb.SCOPE_PROJECT)
    assert call(channel, creds(), other)[:2] == (DENIED, "BUSINESS_NOT_GRANTED")
    assert call(channel, creds(), unknown)[:2] == (DENIED, "BUSINESS_NOT_GRANTED")


def test_app_may_not_assert_a_user_unless_allowed(channel: grpc.Channel, apps: AppStore) -> None:
    apps.add("no-assert", "pw", businesses=[2])
    asserted = {"bk_app_code": "no-assert", "bk_app_secret": "pw", "bk_username": "root"}
    assert call(channel, asserted, seed_request())[:2] == (UNAUTHENTICATED, "USER_UNVERIFIED")
    token = apps.issue_token("alice", 60)
    with_token = {"bk_app_code": "no-assert", "bk_app_secret": "pw", "bk_token": token}
    assert call(channel, with_token, seed_request())[0] == grpc.StatusCode.OK


def test_expired_token_is_refused(channel: grpc.Channel, apps: AppStore) -> None:
    token = apps.issue_token("alice", 0)
    expired = {**DEMO_APP, "bk_username": "", "bk_token": token}
    assert call(channel, expired, seed_request())[:2] == (UNAUTHENTICATED, "USER_UNVERIFIED")


def test_a_token_is_refused_from_the_moment_it_expires(
    channel: grpc.Channel, apps: AppStore
) -> None:
    """Though the identity it verified is trusted for the cache time (10 s here)."""
    token = apps.issue_token("alice", 2)
    expiry = time.time() + 2  # no earlier than the token's own
    holder = {**DEMO_APP, "bk_username": "", "bk_token": token}
    assert call(channel, holder, seed_request())[0] == grpc.StatusCode.OK
    time.sleep(max(0.0, expiry - time.time()) + 0.01)  # the token has now expired
    assert call(channel, holder, seed_request())[:2] == (UNAUTHENTICATED, "USER_UNVERIFIED")


def test_health_and_reflection_stay_open(channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2
    from grpc_health.v1 import health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1


@contextmanager
def serving(demo_config: Config, **settings: Any) -> Iterator[tuple[Server, AppStore]]:
    """A started demo server with these Config settings, and its apps."""
    config = Config(database_url=demo_config.database_url, grpc_addr="127.0.0.1:0", **settings)
    running = create_server(config)
    running.start()
    try:
        yield running, AppStore(running.store.db)
    finally:
        running.stop(None)


def test_revocation_and_rotation_apply_within_the_cache_time(demo_config: Config) -> None:
    with serving(demo_config, auth_cache_seconds=0.5) as (running, apps):
        with running.store.db.connection_context():
            apps.add("rotating", "first", businesses=[2], may_assert_user=True)
        first = {"bk_app_code": "rotating", "bk_app_secret": "first", "bk_username": "u"}
        second = {**first, "bk_app_secret": "second"}
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            assert call(channel, first, seed_request())[0] == grpc.StatusCode.OK
            with running.store.db.connection_context():
                apps.rotate("rotating", "second")
            time.sleep(0.6)
            assert call(channel, first, seed_request())[1] == "CREDENTIALS_INVALID"
            assert call(channel, second, seed_request())[0] == grpc.StatusCode.OK
            with running.store.db.connection_context():
                apps.revoke("rotating")
                apps.withdraw("esb_test", [2])
            time.sleep(0.6)
            assert call(channel, second, seed_request())[1] == "CREDENTIALS_INVALID"
            assert call(channel, creds(), seed_request())[1] == "BUSINESS_NOT_GRANTED"


def test_an_expired_identity_is_rechecked_without_hashing_its_secret_again(
    demo_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-reading the app row is enough while its stored hash is unchanged; a rotation
    (a new hash) is hashed against again."""
    hashed: list[str] = []
    verify = secrets.verify_secret

    def counted(secret: str, stored: str) -> bool:
        hashed.append(stored)
        return verify(secret, stored)

    monkeypatch.setattr(secrets, "verify_secret", counted)
    with serving(demo_config, auth_cache_seconds=0.1) as (running, apps):
        with running.store.db.connection_context():
            apps.add("steady", "its-secret", businesses=[2], may_assert_user=True)
        steady = {"bk_app_code": "steady", "bk_app_secret": "its-secret", "bk_username": "u"}
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for _ in range(3):
                assert call(channel, steady, seed_request())[0] == grpc.StatusCode.OK
                time.sleep(0.15)  # the identity expires between calls
            assert len(hashed) == 1
            with running.store.db.connection_context():
                apps.rotate("steady", "its-secret")  # same secret, new salt: a new hash
            time.sleep(0.15)
            assert call(channel, steady, seed_request())[0] == grpc.StatusCode.OK
            assert len(hashed) == 2 and hashed[0] != hashed[1]


class HashesAtOnce:
    """Stands in for secrets.verify_secret, running the real one, to count how many run at
    once: the most, how many in all, and on which threads."""

    def __init__(self) -> None:
        self.verify = secrets.verify_secret
        self.running = self.most = self.total = 0
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, secret: str, stored: str) -> bool:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.total += 1
            self.threads.add(threading.get_ident())
        try:
            return self.verify(secret, stored)
        finally:
            with self.lock:
                self.running -= 1


@contextmanager
def flooding(address: str, app_code: str, callers: int = 16) -> Iterator[Counter[str]]:
    """bench.flood in a process of its own (not competing with the server for this
    process's GIL): callers sending fresh wrong secrets for app_code until the block ends.
    Filled on exit with how many answers of each reason they got."""
    answered: Counter[str] = Counter()
    command = [sys.executable, "-m", "bench.flood", address, app_code, "--callers", str(callers)]
    process = subprocess.Popen(
        [*command, "--seconds", "60", "--until-stdin-closes"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield answered
    finally:
        out, _ = process.communicate(timeout=30)  # closing its stdin stops it
    answered.update(json.loads(out))


def test_a_flood_of_wrong_secrets_hashes_within_the_slots_and_spares_known_callers(
    demo_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 callers sending a fresh wrong secret with every call, each hashed at production
    cost: one secret is hashed at a time, always on the same thread (which alone keeps
    scrypt's 16 MiB), the other checks are refused, and a caller whose secret was verified
    before is answered as fast as ever, never waiting for a hash."""
    hashing = HashesAtOnce()
    monkeypatch.setattr(secrets, "verify_secret", hashing)
    settings = {"auth_hash_slots": 1, "auth_failures_per_minute": 0}  # every caller is 127.0.0.1
    with serving(demo_config, **settings) as (running, apps):
        with running.store.db.connection_context():
            monkeypatch.setattr(secrets, "SCRYPT_N", secrets.DEFAULT_SCRYPT_N)
            apps.add("flooded", "its-secret", businesses=[2])
        address = f"127.0.0.1:{running.port}"
        with grpc.insecure_channel(address) as channel:
            assert call(channel, creds(), seed_request())[0] == grpc.StatusCode.OK
            with flooding(address, "flooded") as answered:
                while hashing.total < 4:  # the flood is under way
                    time.sleep(0.01)
                took = []
                for i in range(20):
                    started = time.perf_counter()
                    # A new user each time: a new header, checked again, its secret known.
                    outcome = call(channel, creds(bk_username=f"user{i}"), seed_request())
                    took.append(time.perf_counter() - started)
                    assert outcome[0] == grpc.StatusCode.OK
    assert hashing.most == 1 and len(hashing.threads) == 1
    assert answered["CREDENTIALS_INVALID"] and answered["CREDENTIAL_CHECKS_THROTTLED"]
    assert statistics.median(took) < 0.1, took  # ~25 ms here; ~250 ms with every thread hashing


def test_a_burst_of_first_calls_with_one_secret_costs_one_hash(
    demo_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client opening many connections at once to a fresh server: every call is
    answered, none is throttled for want of a hash slot, and the secret is hashed once."""
    hashing = HashesAtOnce()
    monkeypatch.setattr(secrets, "verify_secret", hashing)
    callers = 16
    start = threading.Barrier(callers)
    outcomes: list[grpc.StatusCode] = []

    def first_call(address: str, user: int) -> None:
        with grpc.insecure_channel(address) as own:  # a connection each
            grpc.channel_ready_future(own).result(timeout=10)
            start.wait(timeout=10)
            outcomes.append(call(own, creds(bk_username=f"u{user}"), seed_request())[0])

    with serving(demo_config, auth_hash_slots=1) as (running, _):
        address = f"127.0.0.1:{running.port}"
        threads = [
            threading.Thread(target=first_call, args=(address, user)) for user in range(callers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert outcomes == [grpc.StatusCode.OK] * callers
    assert hashing.total == 1


def test_a_caller_past_its_failure_budget_is_refused_without_hashing(
    demo_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown app alike (neither is hashed), and secrets verified before still pass."""
    hashing = HashesAtOnce()
    monkeypatch.setattr(secrets, "verify_secret", hashing)
    throttled = (THROTTLED, "CREDENTIAL_CHECKS_THROTTLED")
    with (
        serving(demo_config, auth_failures_per_minute=3) as (running, _),
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        assert call(channel, creds(), seed_request())[0] == grpc.StatusCode.OK
        guesses = [
            call(channel, creds(bk_app_secret=f"guess{i}"), seed_request()) for i in range(5)
        ]
        failed = (UNAUTHENTICATED, "CREDENTIALS_INVALID")
        assert [guess[:2] for guess in guesses] == [failed] * 3 + [throttled] * 2
        unknown = call(channel, creds(bk_app_code="nobody"), seed_request())
        assert unknown[:2] == throttled
        for message in (guesses[-1][2], unknown[2]):
            assert re.fullmatch(
                r"too many failed credential checks from this caller; retry in \d+ s", message
            )
        assert hashing.total == 4
        # The demo app's secret is known: a new user of it needs no hash.
        assert call(channel, creds(bk_username="other"), seed_request())[0] == grpc.StatusCode.OK
        # A good secret not checked yet waits for the budget like any other.
        assert call(channel, ALL_APP, seed_request())[:2] == throttled
        assert hashing.total == 4


def test_failed_attempts_are_logged_without_secrets(
    channel: grpc.Channel, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    call(channel, creds(bk_app_secret="wrong-secret-xyz"), seed_request())
    call(channel, creds(), seed_request())
    server.access.flush()
    failures = [r for r in caplog.records if r.name == "tasknode.auth"]
    assert failures and "app='esb_test'" in failures[0].getMessage()
    assert "peer=ipv4:127.0.0.1" in failures[0].getMessage()
    access = [r.getMessage() for r in caplog.records if r.name == "tasknode.access"]
    assert any("app=esb_test user=admin OK" in line for line in access)
    assert any("app=esb_test user=- UNAUTHENTICATED/CREDENTIALS_INVALID" in line for line in access)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "wrong-secret-xyz" not in everything
    assert not re.search(r"\bxxx\b", everything)


def test_a_claimed_app_code_cannot_forge_access_lines(
    channel: grpc.Channel, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    forged = creds(bk_app_code="x\naccess 2026-01-01T00:00:00.000 forged OK")
    call(channel, forged, seed_request())
    server.access.flush()
    lines = "\n".join(r.getMessage() for r in caplog.records if r.name == "tasknode.access")
    assert "app=x?access?2026-01-01T00:00:00.000?forged?OK" in lines
    assert not any(line.startswith("access 2026-01-01") for line in lines.splitlines())


def test_credentials_render_back_to_the_header() -> None:
    header = Credentials.from_mapping(DEMO_APP).to_header()
    assert json.loads(header) == DEMO_APP


def test_deeply_nested_header_json_is_refused_cleanly(channel: grpc.Channel) -> None:
    nested = "[" * 1500 + "]" * 1500  # deeper than Python's recursion limit, under 8 KiB
    assert call(channel, nested, seed_request())[:2] == (UNAUTHENTICATED, "CREDENTIALS_INVALID")
