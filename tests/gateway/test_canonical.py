"""The canonical routes over a real socket: grpc-gateway's mapping of the google.api.http rule."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf import json_format

from server.cli import DEMO_APP
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.conftest import seed_request
from tests.gateway.conftest import TRACEPARENT
from tests.gateway.conftest import exchange
from tests.golden_files import assert_golden

SEED_PATH = f"/v1/businesses/2/tasks/10/nodes/{SEED_NODE}"
CANARY = "nodebbb1c2d3e4f5061728394a5b6c7d"
CANARY_CHILD = "nodeccc2d3e4f5a6b7c8d9e0f1a2b3c4"
AS_DEMO_APP = {"x-bkapi-authorization": json.dumps(DEMO_APP), "traceparent": TRACEPARENT}
SEED_QUERY = {"subprocessStack": SEED_PARENT, "componentCode": "job_fast_execute_script"}


@pytest.fixture
def sqlite_http(sqlite_shim: str) -> Iterator[httpx.Client]:
    """A client of the shim on SQLite alone, for tests of HTTP parsing, not of stores."""
    with httpx.Client(base_url=sqlite_shim, timeout=10) as client:
        yield client


def test_the_seed_node_in_proto_json(http: httpx.Client) -> None:
    response = http.get(SEED_PATH, params=SEED_QUERY, headers=AS_DEMO_APP)
    assert response.status_code == 200
    assert_golden("gateway/canonical_seed", exchange(response))


def test_proto_json_is_the_reply_grpc_gives(
    http: httpx.Client, stub: pb_grpc.TaskNodeServiceStub
) -> None:
    reply = stub.GetTaskNodeDetail(seed_request(), timeout=5)
    expected = json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
    body = http.get(SEED_PATH, params=SEED_QUERY, headers=AS_DEMO_APP).json()
    assert body == expected
    assert body["historyId"] == "-1" and body["children"] == []  # int64 quoted, zeros printed


@pytest.mark.parametrize(
    "query",
    [
        {"subprocess_stack": SEED_PARENT, "component_code": "job_fast_execute_script"},
        {**SEED_QUERY, "unknownParameter": "ignored", "bk_app_code": "ignored too"},
        {**SEED_QUERY, "scope": "SCOPE_CMDB_BIZ"},
        {**SEED_QUERY, "scope": "1", "maxHistories": "0"},
    ],
    ids=["proto_names", "unknown_names", "enum_by_name", "enum_by_number"],
)
def test_query_parameters(sqlite_http: httpx.Client, query: dict[str, str]) -> None:
    response = sqlite_http.get(SEED_PATH, params=query, headers=AS_DEMO_APP)
    assert response.status_code == 200, response.text
    assert response.json()["componentCode"] == "job_fast_execute_script"


def test_a_repeated_field_is_a_repeated_parameter(sqlite_http: httpx.Client) -> None:
    path = f"/v1/businesses/2/tasks/10/nodes/{CANARY_CHILD}"
    query = (("subprocessStack", SEED_PARENT), ("subprocess_stack", CANARY))
    response = sqlite_http.get(path, params=query, headers=AS_DEMO_APP)
    assert response.status_code == 200, response.text
    assert response.json()["subprocessStack"] == [SEED_PARENT, CANARY]


def test_scope_project_reads_the_id_as_a_project(http: httpx.Client) -> None:
    path = f"/v1/businesses/1/tasks/10/nodes/{SEED_NODE}"
    response = http.get(path, params={**SEED_QUERY, "scope": "SCOPE_PROJECT"}, headers=AS_DEMO_APP)
    assert response.status_code == 200, response.text


#: (HTTP path, query, credentials): errors of the server and of the shim, as google.rpc.Status.
Query = dict[str, str] | tuple[tuple[str, str], ...]
ERRORS: dict[str, tuple[str, Query, dict[str, str] | None]] = {
    "node_not_found": ("/v1/businesses/2/tasks/10/nodes/nodeunknown", {}, DEMO_APP),
    "task_not_found": (f"/v1/businesses/2/tasks/99/nodes/{SEED_NODE}", SEED_QUERY, DEMO_APP),
    "bad_business_id": (f"/v1/businesses/x/tasks/10/nodes/{SEED_NODE}", SEED_QUERY, DEMO_APP),
    "stack_mismatch": (SEED_PATH, {}, DEMO_APP),
    "not_granted": (f"/v1/businesses/3/tasks/20/nodes/{SEED_NODE}", {}, DEMO_APP),
    "no_credentials": (SEED_PATH, SEED_QUERY, None),
    "loop_not_an_integer": (SEED_PATH, {**SEED_QUERY, "loop": "abc"}, DEMO_APP),
    "loop_out_of_range": (SEED_PATH, {**SEED_QUERY, "loop": "99999999999"}, DEMO_APP),
    "loop_twice": (SEED_PATH, (("loop", "1"), ("loop", "2")), DEMO_APP),
    "scope_unknown": (SEED_PATH, {**SEED_QUERY, "scope": "SCOPE_GALAXY"}, DEMO_APP),
    "component_unknown": (SEED_PATH, {**SEED_QUERY, "componentCode": "nope"}, DEMO_APP),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_statuses_with_grpc_gateways_http_status(http: httpx.Client, case: str) -> None:
    path, query, credentials = ERRORS[case]
    headers = {"traceparent": TRACEPARENT}
    if credentials is not None:
        headers["x-bkapi-authorization"] = json.dumps(credentials)
    response = http.get(path, params=query, headers=headers)
    body = response.json()
    assert set(body) == {"code", "message", "details"}
    assert_golden(f"gateway/canonical_error_{case}", exchange(response))


def test_only_get_is_routed(sqlite_http: httpx.Client) -> None:
    response = sqlite_http.post(SEED_PATH, json={}, headers=AS_DEMO_APP)
    assert (response.status_code, response.headers["allow"]) == (405, "GET")
    assert response.json()["code"] == 12  # UNIMPLEMENTED, as grpc-gateway says it


def test_an_unknown_path_under_v1_answers_a_status(sqlite_http: httpx.Client) -> None:
    response = sqlite_http.get("/v1/businesses/2/tasks/10", headers=AS_DEMO_APP)
    assert response.status_code == 404
    assert response.json()["code"] == 5
