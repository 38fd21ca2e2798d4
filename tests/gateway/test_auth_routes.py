"""Authentication and business scoping on every HTTP route, each failure in its route's style.

The old ESB routes answer HTTP 200 with the legacy envelope, the API gateway route its own
envelope with a real status and the X-Bkapi-Error-* headers, the canonical route a
google.rpc.Status with grpc-gateway's status. tests/test_auth.py has the gRPC side.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from server.app import Server
from server.cli import DEMO_APP
from server.config import Config
from server.db.apps import AppStore
from tests.conftest import ALL_APP
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.conftest import STORES
from tests.gateway.conftest import HEX32

HEADER = "x-bkapi-authorization"
ESB_V2 = "/api/c/compapi/v2/sops/get_task_node_detail/"
ESB = "/api/c/compapi/sops/get_task_node_detail/"

Credentials = dict[str, str]


@dataclass(frozen=True)
class Target:
    """The node a request asks for."""

    bk_biz_id: str
    task_id: str
    node_id: str
    stack: tuple[str, ...] = ()

    def legacy_params(self) -> dict[str, str]:
        return {
            "bk_biz_id": self.bk_biz_id,
            "task_id": self.task_id,
            "node_id": self.node_id,
            "subprocess_stack": json.dumps(list(self.stack)),
        }


GRANTED = Target("2", "10", SEED_NODE, (SEED_PARENT,))
NOT_GRANTED = Target("3", "20", "node708192a3b4c5d6e7f8091a2b3c4d")
NOT_GRANTED_NO_TASK = Target("3", "424242", "node708192a3b4c5d6e7f8091a2b3c4d")


def _header(credentials: Credentials) -> dict[str, str]:
    return {HEADER: json.dumps(credentials)} if credentials else {}


def esb_get_query(
    http: httpx.Client, credentials: Credentials, target: Target, path: str = ESB_V2
) -> httpx.Response:
    return http.get(path, params={**credentials, **target.legacy_params()})


def esb_post_body(http: httpx.Client, credentials: Credentials, target: Target) -> httpx.Response:
    return http.post(ESB_V2, json={**credentials, **target.legacy_params()})


def esb_get_header(http: httpx.Client, credentials: Credentials, target: Target) -> httpx.Response:
    return http.get(ESB_V2, params=target.legacy_params(), headers=_header(credentials))


def esb_no_v2(http: httpx.Client, credentials: Credentials, target: Target) -> httpx.Response:
    return esb_get_query(http, credentials, target, ESB)


def apigw_header(http: httpx.Client, credentials: Credentials, target: Target) -> httpx.Response:
    path = f"/get_task_node_detail/{target.task_id}/{target.bk_biz_id}/"
    params = {"node_id": target.node_id, "subprocess_stack": json.dumps(list(target.stack))}
    return http.get(path, params=params, headers=_header(credentials))


def canonical_header(
    http: httpx.Client, credentials: Credentials, target: Target
) -> httpx.Response:
    path = f"/v1/businesses/{target.bk_biz_id}/tasks/{target.task_id}/nodes/{target.node_id}"
    params = {"subprocessStack": list(target.stack)}
    return http.get(path, params=params, headers=_header(credentials))


Call = Callable[[httpx.Client, Credentials, Target], httpx.Response]
#: Every route, and every way of presenting credentials to it: (style, call).
ROUTES: dict[str, tuple[str, Call]] = {
    "esb_get_query": ("esb", esb_get_query),
    "esb_post_body": ("esb", esb_post_body),
    "esb_get_header": ("esb", esb_get_header),
    "esb_no_v2_query": ("esb", esb_no_v2),
    "apigw_header": ("apigw", apigw_header),
    "canonical_header": ("canonical", canonical_header),
}


@dataclass(frozen=True)
class Codes:
    """How each style words a kind of failure."""

    legacy: int
    #: The API gateway's own envelope: (HTTP status, code, code_name).
    gateway: tuple[int, int, str]
    #: grpc-gateway's: (HTTP status, gRPC code).
    canonical: tuple[int, int]


UNAUTHENTICATED = Codes(1306000, (400, 1640001, "INVALID_ARGS"), (401, 16))
DENIED = Codes(3599999, (403, 1640301, "APP_NO_PERMISSION"), (403, 7))

MISSING = "APP Code [bk_app_code] cannot be empty"
INVALID = "APP authentication failed: bk_app_code or bk_app_secret is invalid"
UNVERIFIED = (
    "User authentication failed, please provide a valid user identity, such as bk_token, "
    "bk_username"
)
NO_PERMISSION = "APP [esb_test] has no permission to perform action [task_view] on business [3]"

#: Apps the matrix makes on the running server's database (see the callers fixture).
REVOKED_APP = {"bk_app_code": "revoked-app", "bk_app_secret": "revoked-secret", "bk_username": "u"}
NO_ASSERT_APP = {"bk_app_code": "no-assert", "bk_app_secret": "no-assert-secret"}
#: Stands for the expired token the callers fixture issues.
EXPIRED = "<expired token>"


@dataclass(frozen=True)
class Case:
    credentials: Credentials
    target: Target
    #: None: the node detail is answered.
    codes: Codes | None = None
    reason: str = ""
    message: str = ""


CASES: dict[str, Case] = {
    "no_credentials": Case({}, GRANTED, UNAUTHENTICATED, "CREDENTIALS_MISSING", MISSING),
    "unknown_app": Case(
        {**DEMO_APP, "bk_app_code": "nobody"},
        GRANTED,
        UNAUTHENTICATED,
        "CREDENTIALS_INVALID",
        INVALID,
    ),
    "wrong_secret": Case(
        {**DEMO_APP, "bk_app_secret": "guess"},
        GRANTED,
        UNAUTHENTICATED,
        "CREDENTIALS_INVALID",
        INVALID,
    ),
    "revoked_app": Case(REVOKED_APP, GRANTED, UNAUTHENTICATED, "CREDENTIALS_INVALID", INVALID),
    "not_granted": Case(DEMO_APP, NOT_GRANTED, DENIED, "BUSINESS_NOT_GRANTED", NO_PERMISSION),
    "granted": Case(DEMO_APP, GRANTED),
    "expired_token": Case(
        {"bk_app_code": "esb_test", "bk_app_secret": "xxx", "bk_token": EXPIRED},
        GRANTED,
        UNAUTHENTICATED,
        "USER_UNVERIFIED",
        UNVERIFIED,
    ),
    "user_not_assertable": Case(
        {**NO_ASSERT_APP, "bk_username": "root"},
        GRANTED,
        UNAUTHENTICATED,
        "USER_UNVERIFIED",
        UNVERIFIED,
    ),
}

#: The case each route also answers on every store; the rest of the matrix is about HTTP,
#: not stores, and runs on the first store alone (SQLite unless TASKNODE_TEST_STORES says).
ON_EVERY_STORE = {
    "esb_get_query": "revoked_app",
    "esb_post_body": "expired_token",
    "esb_get_header": "user_not_assertable",
    "esb_no_v2_query": "wrong_secret",
    "apigw_header": "not_granted",
    "canonical_header": "granted",
}
MATRIX = [
    pytest.param(store, route, case, id=f"{store}-{route}-{case}")
    for route in ROUTES
    for case in CASES
    for store in (STORES if ON_EVERY_STORE[route] == case else STORES[:1])
]


@pytest.fixture
def callers(server: Server) -> dict[str, str]:
    """Makes the revoked and the no-assert app and an expired token on the running server's
    database; returns what stands for the token. Done before any call, since the server
    trusts what it has verified for 10 s."""
    db = server.store.db
    apps = AppStore(db)
    with db.connection_context():
        apps.add(
            REVOKED_APP["bk_app_code"],
            REVOKED_APP["bk_app_secret"],
            businesses=[2],
            may_assert_user=True,
        )
        apps.revoke(REVOKED_APP["bk_app_code"])
        apps.add(NO_ASSERT_APP["bk_app_code"], NO_ASSERT_APP["bk_app_secret"], businesses=[2])
        return {EXPIRED: apps.issue_token("alice", 0)}


def without_ids(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    """(status, error headers, body) with the ids left out, once checked: the request id
    header on every response, and in a legacy envelope the same ids as the headers."""
    request_id = response.headers["x-bkapi-request-id"]
    assert HEX32.fullmatch(request_id), request_id
    body = response.json()
    if "request_id" in body:
        assert body.pop("request_id") == request_id
        assert body.pop("trace_id") == response.headers["sops-trace-id"]
    headers = {
        name: value
        for name, value in response.headers.items()
        if name.startswith("x-bkapi-error") or name == "www-authenticate"
    }
    return response.status_code, headers, body


def seen(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    """without_ids, a node detail reduced to its id and a Status's details to their reasons."""
    status, headers, body = without_ids(response)
    if isinstance(body.get("data"), dict):
        body["data"] = {"id": body["data"]["id"]}
    elif "details" in body:
        body["details"] = [detail["reason"] for detail in body["details"]]
    elif "id" in body:
        body = {"id": body["id"]}
    return status, headers, body


def expected(style: str, case: Case) -> tuple[int, dict[str, str], Any]:
    """What seen() should give for case on a route of style."""
    if case.codes is None:
        if style == "canonical":
            return 200, {}, {"id": case.target.node_id}
        body = {"result": True, "code": 0, "message": "", "data": {"id": case.target.node_id}}
        return 200, {}, body
    if style == "canonical":
        status, code = case.codes.canonical
        headers = {"www-authenticate": case.message} if status == 401 else {}
        return status, headers, {"code": code, "message": case.message, "details": [case.reason]}
    if style == "apigw":
        status, code, code_name = case.codes.gateway
        headers = {"x-bkapi-error-code": str(code), "x-bkapi-error-message": case.message}
        body = {
            "code_name": code_name,
            "code": code,
            "result": False,
            "data": None,
            "message": case.message,
        }
        return status, headers, body
    body = {"result": False, "code": case.codes.legacy, "message": case.message, "data": None}
    return 200, {}, body


@pytest.mark.parametrize(("database_url", "route", "case"), MATRIX, indirect=["database_url"])
def test_credentials_matrix(
    http: httpx.Client, callers: dict[str, str], route: str, case: str
) -> None:
    style, call = ROUTES[route]
    credentials = {
        name: callers.get(value, value) for name, value in CASES[case].credentials.items()
    }
    response = call(http, credentials, CASES[case].target)
    assert seen(response) == expected(style, CASES[case])


def test_denial_says_nothing_about_the_task(http: httpx.Client) -> None:
    for route, (_, call) in ROUTES.items():
        exists = without_ids(call(http, DEMO_APP, NOT_GRANTED))
        missing = without_ids(call(http, DEMO_APP, NOT_GRANTED_NO_TASK))
        assert exists == missing, route
        # An app granted every business tells the two apart: the task really is missing.
        granted = [without_ids(call(http, ALL_APP, t)) for t in (NOT_GRANTED, NOT_GRANTED_NO_TASK)]
        assert granted[0] != granted[1], route


@pytest.mark.parametrize("database_url", STORES[:1], indirect=True)
def test_throttled_credential_checks_are_429_on_every_route(http: httpx.Client) -> None:
    """A secret refused unchecked is neither right nor wrong: every route says retry later,
    and callers whose secret was verified before are served all the while."""
    assert seen(esb_get_query(http, DEMO_APP, GRANTED))[0] == 200
    for n in range(Config.auth_failures_per_minute):  # this address's whole budget
        guess = {**DEMO_APP, "bk_app_secret": f"guess{n}"}
        assert esb_get_query(http, guess, GRANTED).json()["code"] == UNAUTHENTICATED.legacy
    one_more = {**DEMO_APP, "bk_app_secret": "one more guess"}
    for route, (style, call) in ROUTES.items():
        status, _, body = seen(call(http, one_more, GRANTED))
        assert status == 429, route
        if style == "canonical":
            assert (body["code"], body["details"]) == (8, ["CREDENTIAL_CHECKS_THROTTLED"])
        else:
            assert (body["result"], body["code"]) == (False, 3555000), route
        assert seen(call(http, DEMO_APP, GRANTED)) == expected(style, CASES["granted"]), route
