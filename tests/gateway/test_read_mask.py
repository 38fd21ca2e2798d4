"""read_mask on the canonical routes: a FieldMask query parameter, comma-separated as
grpc-gateway reads it; the legacy routes ignore it."""

from __future__ import annotations

import httpx
from bksops.tasknode.v1 import task_node_pb2 as pb
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask

from tests.conftest import SEED_NODE
from tests.conftest import seed_request
from tests.gateway.test_batch_and_etags import BATCH_PATH
from tests.gateway.test_canonical import AS_DEMO_APP
from tests.gateway.test_canonical import SEED_PATH
from tests.gateway.test_canonical import SEED_QUERY

LEGACY = "/api/c/compapi/v2/sops/get_task_node_detail/"


def test_the_get_route_takes_read_mask_as_a_query_parameter(http: httpx.Client) -> None:
    full = http.get(SEED_PATH, params=SEED_QUERY, headers=AS_DEMO_APP)
    for mask in ("state,start_time,finish_time", "state,startTime,finishTime"):
        response = http.get(
            SEED_PATH, params={**SEED_QUERY, "read_mask": mask}, headers=AS_DEMO_APP
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"state", "startTime", "finishTime", "etag"}, mask
        assert {k: full.json()[k] for k in ("state", "startTime", "finishTime")} == {
            k: body[k] for k in ("state", "startTime", "finishTime")
        }
        assert response.headers["etag"] == body["etag"] != full.headers["etag"]
    # readMask (the JSON name) works too; zero values asked for are printed.
    response = http.get(
        SEED_PATH, params={**SEED_QUERY, "readMask": "retry,skip"}, headers=AS_DEMO_APP
    )
    assert response.json() == {"retry": 0, "skip": False, "etag": response.headers["etag"]}


def test_a_partial_reply_is_revalidated_by_its_own_etag(http: httpx.Client) -> None:
    query = {**SEED_QUERY, "read_mask": "state"}
    part = http.get(SEED_PATH, params=query, headers=AS_DEMO_APP)
    full = http.get(SEED_PATH, params=SEED_QUERY, headers=AS_DEMO_APP)
    same = http.get(
        SEED_PATH, params=query, headers={**AS_DEMO_APP, "if-none-match": part.headers["etag"]}
    )
    assert same.status_code == 304 and same.content == b""
    other = http.get(
        SEED_PATH, params=query, headers={**AS_DEMO_APP, "if-none-match": full.headers["etag"]}
    )
    assert other.status_code == 200 and other.json()["state"] == "NODE_STATE_FINISHED"


def test_a_bad_read_mask_is_a_400_naming_the_path(http: httpx.Client) -> None:
    for mask, field in (("state,nosuch", "read_mask.paths[1]"), ("inputs.x", "read_mask.paths[0]")):
        response = http.get(
            SEED_PATH, params={**SEED_QUERY, "read_mask": mask}, headers=AS_DEMO_APP
        )
        assert response.status_code == 400, response.text
        details = response.json()["details"]
        assert details[0]["reason"] == "INVALID_ARGUMENT"
        violations = next(d for d in details if "fieldViolations" in d)["fieldViolations"]
        assert [v["field"] for v in violations] == [field]


def test_the_batch_route_trims_each_item_by_its_mask(http: httpx.Client) -> None:
    masked = seed_request(read_mask=FieldMask(paths=["id", "state"]))
    batch = pb.BatchGetTaskNodeDetailsRequest(requests=[masked, seed_request()])
    response = http.post(BATCH_PATH, json=json_format.MessageToDict(batch), headers=AS_DEMO_APP)
    assert response.status_code == 200, response.text
    first, second = (r["detail"] for r in response.json()["results"])
    assert set(first) == {"id", "state", "etag"} and first["id"] == SEED_NODE
    assert {"inputs", "outputs", "histories"} <= set(second)


def test_legacy_routes_ignore_read_mask(http: httpx.Client) -> None:
    params = {
        "bk_biz_id": "2",
        "task_id": "10",
        "node_id": SEED_NODE,
        "subprocess_stack": f'["{SEED_QUERY["subprocessStack"]}"]',
        "component_code": "job_fast_execute_script",
    }
    plain = http.get(LEGACY, params=params, headers=AS_DEMO_APP)
    for mask in ("state", "nosuch"):
        masked = http.get(LEGACY, params={**params, "read_mask": mask}, headers=AS_DEMO_APP)
        assert masked.status_code == 200 and masked.json()["data"] == plain.json()["data"]
