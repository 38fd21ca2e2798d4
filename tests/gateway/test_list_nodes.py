"""ListTaskNodes on its canonical route, GET /v1/businesses/{bk_biz_id}/tasks/{task_id}/nodes."""

from __future__ import annotations

import httpx
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from tests.conftest import SEED_PARENT
from tests.gateway.test_canonical import AS_DEMO_APP

TASK_11 = "/v1/businesses/2/tasks/11/nodes"
SUMMARY = {
    "id",
    "name",
    "state",
    "executed",
    "startTime",
    "finishTime",
    "loop",
    "retry",
    "componentCode",
    "subprocessStack",
}


def test_the_list_route_answers_what_grpc_answers(
    http: httpx.Client, stub: pb_grpc.TaskNodeServiceStub
) -> None:
    response = http.get(TASK_11, headers=AS_DEMO_APP)
    assert response.status_code == 200, response.text
    assert "etag" not in response.headers
    body = response.json()
    expected = stub.ListTaskNodes(pb.ListTaskNodesRequest(bk_biz_id="2", task_id="11"), timeout=10)
    assert [n["id"] for n in body["nodes"]] == [n.id for n in expected.nodes]
    assert body["totalSize"] == expected.total_size == len(expected.nodes)
    assert body["nextPageToken"] == ""
    # The summary view prints the summary only, zero values included (grpc-gateway's way).
    assert all(
        set(node) <= SUMMARY and {"id", "state", "loop"} <= set(node) for node in body["nodes"]
    )


def test_pages_filters_and_views_as_query_parameters(http: httpx.Client) -> None:
    whole = [n["id"] for n in http.get(TASK_11, headers=AS_DEMO_APP).json()["nodes"]]
    seen: list[str] = []
    params: dict[str, str] = {"pageSize": "2"}
    while True:
        body = http.get(TASK_11, params=params, headers=AS_DEMO_APP).json()
        seen += [n["id"] for n in body["nodes"]]
        if not body["nextPageToken"]:
            break
        params = {"page_size": "2", "page_token": body["nextPageToken"]}
    assert seen == whole
    failed = http.get(TASK_11, params={"filter": "state = FAILED"}, headers=AS_DEMO_APP).json()
    assert [n["state"] for n in failed["nodes"]] == ["NODE_STATE_FAILED"]
    full = http.get(
        TASK_11, params={"view": "NODE_VIEW_FULL", "pageSize": "1"}, headers=AS_DEMO_APP
    ).json()
    assert {"inputs", "outputs", "histories", "etag"} <= set(full["nodes"][0])
    children = http.get(
        "/v1/businesses/2/tasks/10/nodes",
        params={"subprocessStack": SEED_PARENT},
        headers=AS_DEMO_APP,
    ).json()
    assert all(n["subprocessStack"] == [SEED_PARENT] for n in children["nodes"])
    assert children["totalSize"] == len(children["nodes"]) > 0


def test_a_bad_listing_is_a_400_and_another_business_a_403(http: httpx.Client) -> None:
    for params, field in (
        ({"filter": "state > FAILED"}, "filter"),
        ({"pageToken": "nonsense"}, "page_token"),
        ({"pageSize": "-3"}, "page_size"),
    ):
        response = http.get(TASK_11, params=params, headers=AS_DEMO_APP)
        assert response.status_code == 400, response.text
        details = response.json()["details"]
        violations = next(d for d in details if "fieldViolations" in d)["fieldViolations"]
        assert [v["field"] for v in violations] == [field]
    response = http.get("/v1/businesses/3/tasks/20/nodes", headers=AS_DEMO_APP)
    assert response.status_code == 403
    response = http.get("/v1/businesses/2/tasks/99/nodes", headers=AS_DEMO_APP)
    assert response.status_code == 404


def test_a_read_mask_on_the_full_view(http: httpx.Client) -> None:
    params = {"view": "NODE_VIEW_FULL", "read_mask": "state,inputs", "pageSize": "2"}
    body = http.get(TASK_11, params=params, headers=AS_DEMO_APP).json()
    assert len(body["nodes"]) == 2
    assert all(set(node) == {"state", "inputs", "etag"} for node in body["nodes"]), body
