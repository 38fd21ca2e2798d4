"""The canonical batch route, and ETag / If-None-Match on the canonical Get route."""

from __future__ import annotations

import httpx
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf import json_format

from tests.conftest import SEED_NODE
from tests.conftest import seed_request
from tests.gateway.conftest import TRACE_ID
from tests.gateway.conftest import exchange
from tests.gateway.conftest import without_live_times
from tests.gateway.test_canonical import AS_DEMO_APP
from tests.gateway.test_canonical import SEED_PATH
from tests.gateway.test_canonical import SEED_QUERY
from tests.golden_files import assert_golden
from tests.test_batch import MIXED

BATCH_PATH = "/v1/nodes:batchGet"


def test_the_batch_route_answers_what_grpc_answers(
    http: httpx.Client, stub: pb_grpc.TaskNodeServiceStub
) -> None:
    batch = pb.BatchGetTaskNodeDetailsRequest(requests=MIXED)
    body = json_format.MessageToDict(batch)  # camelCase, as grpc-gateway callers send
    response = http.post(BATCH_PATH, json=body, headers=AS_DEMO_APP)
    assert response.status_code == 200, response.text
    assert "etag" not in response.headers  # the etags are in the results
    expected = stub.BatchGetTaskNodeDetails(batch, timeout=10)
    assert without_live_times(response.json()) == without_live_times(
        json_format.MessageToDict(expected, always_print_fields_with_no_presence=True)
    )
    first = response.json()["results"][1]["error"]
    assert (first["code"], first["details"][0]["reason"]) == (5, "TASK_NOT_FOUND")


def test_a_malformed_batch_is_a_400(http: httpx.Client) -> None:
    bodies: list[dict[str, list[object]]] = [{}, {"requests": []}]
    for body in bodies:
        response = http.post(BATCH_PATH, json=body, headers=AS_DEMO_APP)
        assert response.status_code == 400, response.text
        assert response.json()["details"][0]["metadata"]["fields"] == "requests"
    assert http.get(BATCH_PATH, headers=AS_DEMO_APP).status_code == 405


def test_the_batch_route_in_proto_json(sqlite_shim: str) -> None:
    requests = [seed_request(), seed_request(node_id="nodeunknown")]
    body = json_format.MessageToDict(pb.BatchGetTaskNodeDetailsRequest(requests=requests))
    with httpx.Client(base_url=sqlite_shim, timeout=10) as client:
        response = client.post(BATCH_PATH, json=body, headers=AS_DEMO_APP)
    assert_golden("gateway/canonical_batch", exchange(response))


def test_the_get_route_sends_the_etag_and_answers_304_to_it(http: httpx.Client) -> None:
    first = http.get(SEED_PATH, params=SEED_QUERY, headers=AS_DEMO_APP)
    etag = first.headers["etag"]
    assert etag == first.json()["etag"] and etag.startswith('"')
    again = http.get(SEED_PATH, params=SEED_QUERY, headers=AS_DEMO_APP)
    assert again.headers["etag"] == etag
    for if_none_match in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        headers = {**AS_DEMO_APP, "if-none-match": if_none_match}
        cached = http.get(SEED_PATH, params=SEED_QUERY, headers=headers)
        assert cached.status_code == 304, if_none_match
        assert cached.content == b"" and cached.headers["etag"] == etag
        assert "content-type" not in cached.headers
        assert cached.headers["sops-trace-id"] == TRACE_ID
    stale = {**AS_DEMO_APP, "if-none-match": '"0123456789abcdef0123456789abcdef"'}
    response = http.get(SEED_PATH, params=SEED_QUERY, headers=stale)
    assert response.status_code == 200 and response.json()["id"] == SEED_NODE
    # Another rendering of the node is another representation: not a 304.
    other = {**AS_DEMO_APP, "if-none-match": etag}
    response = http.get(SEED_PATH, params={**SEED_QUERY, "componentCode": ""}, headers=other)
    assert response.status_code == 200 and response.headers["etag"] != etag


def test_errors_carry_no_etag_and_never_304(http: httpx.Client) -> None:
    headers = {**AS_DEMO_APP, "if-none-match": "*"}
    response = http.get("/v1/businesses/2/tasks/10/nodes/nodeunknown", headers=headers)
    assert response.status_code == 404 and "etag" not in response.headers


def test_legacy_routes_send_the_etag_and_answer_304_to_it(http: httpx.Client) -> None:
    """The node's etag, as on the canonical route; callers sending no If-None-Match get the
    envelope as before, and its data gains no key."""
    canonical = http.get(SEED_PATH, params=SEED_QUERY, headers=AS_DEMO_APP)
    etag = canonical.headers["etag"]
    params = {
        "bk_biz_id": "2",
        "task_id": "10",
        "node_id": SEED_NODE,
        "subprocess_stack": f'["{SEED_QUERY["subprocessStack"]}"]',
        "component_code": "job_fast_execute_script",
    }
    paths = (
        "/api/c/compapi/v2/sops/get_task_node_detail/",
        "/api/c/compapi/sops/get_task_node_detail/",
    )
    for path in paths:
        plain = http.get(path, params=params, headers=AS_DEMO_APP)
        assert plain.status_code == 200 and plain.headers["etag"] == etag
        data = plain.json()["data"]
        assert data["id"] == SEED_NODE and "etag" not in data
        for if_none_match in (etag, "*"):
            headers = {**AS_DEMO_APP, "if-none-match": if_none_match}
            cached = http.get(path, params=params, headers=headers)
            assert cached.status_code == 304 and cached.content == b""
            assert cached.headers["etag"] == etag
        stale = {**AS_DEMO_APP, "if-none-match": '"0123456789abcdef0123456789abcdef"'}
        assert http.get(path, params=params, headers=stale).json()["data"] == data
        # POST is no conditional read: its answer is whole whatever the header says.
        headers = {**AS_DEMO_APP, "if-none-match": etag}
        posted = http.post(
            path,
            json={**params, "subprocess_stack": [SEED_QUERY["subprocessStack"]]},
            headers=headers,
        )
        assert posted.status_code == 200 and posted.json()["data"] == data
