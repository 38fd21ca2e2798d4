"""The legacy routes over a real socket: the seed request, the data shapes, the error table."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server.cli import DEMO_APP
from server.gateway.examples import SEED_BODY
from tests.conftest import ALL_APP
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.gateway.conftest import HEX32
from tests.gateway.conftest import SEED_APP
from tests.gateway.conftest import TRACE_ID
from tests.gateway.conftest import TRACEPARENT
from tests.gateway.conftest import exchange
from tests.gateway.conftest import without_live_times
from tests.golden_files import assert_golden

ESB_V2 = "/api/c/compapi/v2/sops/get_task_node_detail/"
ESB = "/api/c/compapi/sops/get_task_node_detail/"
APIGW = "/get_task_node_detail/10/2/"
CANARY = "nodebbb1c2d3e4f5061728394a5b6c7d"
FAILED_NODE = "nodef1a2b3c4d5e6f708192a3b4c5d6e"
NOT_RUN_NODE = "node3c4d5e6f708192a3b4c5d6e7f809"
LOOP_NODE = "node4d5e6f708192a3b4c5d6e7f8091a"
STATS_NODE = "node5e6f708192a3b4c5d6e7f8091a2b"
STACK = json.dumps([SEED_PARENT])
#: The seed request's parameters, without its credentials.
SEED_PARAMS = {k: v for k, v in SEED_BODY.items() if k not in SEED_APP}
TRACED = {"traceparent": TRACEPARENT}

#: The seed document's example response: every field and value it shows.
DOCUMENTED: dict[str, Any] = {
    "inputs": {
        "job_account": "root",
        "job_script_timeout": "",
        "job_script_source": "manual",
        "job_script_list_public": "",
        "job_content": "echo 0\nexit 0",
        "job_script_type": "1",
        "job_script_param": "",
        "job_script_list_general": "",
        "job_ip_list": "127.0.0.1",
    },
    "retry": 0,
    "name": "<class 'pipeline.core.flow.activity.ServiceActivity'>",
    "finish_time": "2019-01-17 22:02:46 +0800",
    "skip": False,
    "start_time": "2019-01-17 22:02:37 +0800",
    "children": {},
    "histories": [],
    "ex_data": None,
    "elapsed_time": 9,
    "state": "FINISHED",
    "version": "23ac8c29f62b3337aafcf1f538d277f8",
    "error_ignorable": False,
    "id": "node0df0431f8f553925af01a94854bd",
    "loop": 1,
}
DOCUMENTED_OUTPUTS = [
    {"value": 407584, "name": "task ID", "key": "job_inst_id"},
    {"value": "", "name": "link", "key": "job_inst_url"},
    {"value": True, "name": "result", "key": "_result"},
]


def seed_post(http: httpx.Client, path: str) -> httpx.Response:
    """The seed document's request, as written, as the JSON body of a POST."""
    headers = {**TRACED, "content-type": "application/json"}
    return http.post(path, content=json.dumps(SEED_BODY), headers=headers)


def seed_get(http: httpx.Client, path: str) -> httpx.Response:
    """The seed document's request, as written, as a query string."""
    return http.get(path, params=SEED_BODY, headers=TRACED)


def seed_apigw(http: httpx.Client) -> httpx.Response:
    """The seed request on the API gateway route, credentials in the SDKs' header."""
    params = {k: v for k, v in SEED_PARAMS.items() if k not in ("bk_biz_id", "task_id")}
    headers = {**TRACED, "x-bkapi-authorization": json.dumps(SEED_APP)}
    return http.get(APIGW, params=params, headers=headers)


@pytest.mark.parametrize("path", [ESB_V2, ESB], ids=["v2", "no_v2"])
def test_the_seed_request_as_a_json_body(http: httpx.Client, path: str) -> None:
    name = "v2" if "/v2/" in path else "no_v2"
    assert_golden(f"gateway/legacy_seed_esb_{name}_post", exchange(seed_post(http, path)))


@pytest.mark.parametrize("path", [ESB_V2, ESB], ids=["v2", "no_v2"])
def test_the_seed_request_as_a_query_string(http: httpx.Client, path: str) -> None:
    name = "v2" if "/v2/" in path else "no_v2"
    assert_golden(f"gateway/legacy_seed_esb_{name}_get", exchange(seed_get(http, path)))


def test_the_seed_request_on_the_gateway_route(http: httpx.Client) -> None:
    assert_golden("gateway/legacy_seed_apigw_get", exchange(seed_apigw(http)))


def test_every_legacy_route_gives_the_seed_the_same_answer(http: httpx.Client) -> None:
    answers = [
        seed_post(http, ESB_V2),
        seed_get(http, ESB_V2),
        seed_post(http, ESB),
        seed_get(http, ESB),
        seed_apigw(http),
    ]
    bodies = [{**r.json(), "request_id": None} for r in answers]
    assert all(body == bodies[0] for body in bodies)


def test_the_seed_request_reproduces_the_documented_example(http: httpx.Client) -> None:
    response = seed_post(http, ESB_V2)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["result"], body["code"], body["message"]) == (True, 0, "")
    data = body["data"]
    assert {key: data[key] for key in DOCUMENTED} == DOCUMENTED
    assert list(data["inputs"]) == list(DOCUMENTED["inputs"])  # stored key order
    assert [{k: o[k] for k in ("value", "name", "key")} for o in data["outputs"]] == (
        DOCUMENTED_OUTPUTS
    )
    assert [o["preset"] for o in data["outputs"]] == [True, True, True]
    assert (data["error_ignored"], data["history_id"]) == (False, -1)
    assert list(data) == [
        "id",
        "name",
        "state",
        "root_id:",
        "parent_id",
        "start_time",
        "finish_time",
        "elapsed_time",
        "skip",
        "retry",
        "loop",
        "error_ignorable",
        "error_ignored",
        "version",
        "inputs",
        "outputs",
        "ex_data",
        "histories",
        "children",
        "history_id",
    ]


def test_numbers_keep_their_kind_and_precision(http: httpx.Client) -> None:
    params: dict[str, str | int] = {
        **DEMO_APP,
        "bk_biz_id": 2,
        "task_id": 11,
        "node_id": STATS_NODE,
    }
    response = http.get(ESB_V2, params=params)
    text = response.text
    assert '"value":42,' in text and '"value":9007199254740993,' in text
    assert '"value":0.375,' in text and '"window_hours":24,' in text
    assert ".0," not in text and '"42"' not in text
    outputs = {o["key"]: o["value"] for o in response.json()["data"]["outputs"]}
    assert outputs["big_count"] == 2**53 + 1
    assert list(outputs["detail"]) == ["cpu", "disks", "ok"]


#: Nodes of every shape, on the old ESB route (GET), as the demo app.
SHAPES: dict[str, dict[str, Any]] = {
    "ready_node": {"task_id": "11", "node_id": NOT_RUN_NODE, "component_code": "pause_node"},
    "ready_node_without_component_code": {"task_id": "11", "node_id": NOT_RUN_NODE},
    "failed_node_with_histories": {
        "task_id": "11",
        "node_id": FAILED_NODE,
        "component_code": "job_fast_execute_script",
    },
    "failed_node_last_history_only": {
        "task_id": "11",
        "node_id": FAILED_NODE,
        "max_histories": "1",
    },
    "older_loop": {
        "task_id": "11",
        "node_id": LOOP_NODE,
        "loop": "2",
        "component_code": "sleep_timer",
    },
    "sub_process_children": {"task_id": "10", "node_id": CANARY, "subprocess_stack": STACK},
    "every_value_kind": {
        "task_id": "11",
        "node_id": STATS_NODE,
        "component_code": "bk_collect_stats",
    },
    "every_value_kind_without_component_code": {"task_id": "11", "node_id": STATS_NODE},
    "by_project_id": {**SEED_PARAMS, "bk_biz_id": "1", "scope": "project"},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_data_shapes(http: httpx.Client, shape: str) -> None:
    params = {**DEMO_APP, "bk_biz_id": "2", **SHAPES[shape]}
    response = http.get(ESB_V2, params=params, headers=TRACED)
    assert response.json()["result"] is True, response.text
    assert_golden(f"gateway/legacy_data_{shape}", without_live_times(exchange(response)))


#: The error table of legacy-contract.md, and the reference's crashes we answer instead,
#: on the old ESB route (GET): (credentials, parameters).
ERRORS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "node_id_missing": (DEMO_APP, {"bk_biz_id": "2", "task_id": "10"}),
    "node_not_in_task": (DEMO_APP, {**SEED_PARAMS, "node_id": "nodeunknown"}),
    "node_of_another_task": (DEMO_APP, {**SEED_PARAMS, "task_id": "11"}),
    "business_unknown": (ALL_APP, {**SEED_PARAMS, "bk_biz_id": "99"}),
    "project_unknown": (ALL_APP, {**SEED_PARAMS, "bk_biz_id": "99", "scope": "project"}),
    "task_not_in_business": (DEMO_APP, {**SEED_PARAMS, "task_id": "99"}),
    "task_deleted": (DEMO_APP, {**SEED_PARAMS, "task_id": "12"}),
    "subprocess_stack_not_json": (DEMO_APP, {**SEED_PARAMS, "subprocess_stack": "[nodeaaa"}),
    "subprocess_stack_empty_text": (DEMO_APP, {**SEED_PARAMS, "subprocess_stack": ""}),
    "subprocess_stack_not_a_list": (DEMO_APP, {**SEED_PARAMS, "subprocess_stack": '{"a":1}'}),
    "subprocess_stack_not_strings": (DEMO_APP, {**SEED_PARAMS, "subprocess_stack": "[1, 2]"}),
    "subprocess_stack_missing_for_nested_node": (
        DEMO_APP,
        {k: v for k, v in SEED_PARAMS.items() if k != "subprocess_stack"},
    ),
    "component_code_unknown": (DEMO_APP, {**SEED_PARAMS, "component_code": "no_such_plugin"}),
    "business_not_granted": (DEMO_APP, {**SEED_PARAMS, "bk_biz_id": "3"}),
    "loop_not_a_number": (DEMO_APP, {**SEED_PARAMS, "loop": "abc"}),
    "loop_zero": (DEMO_APP, {**SEED_PARAMS, "loop": "0"}),
    "loop_too_big": (DEMO_APP, {**SEED_PARAMS, "loop": "99999999999"}),
    "max_histories_negative": (DEMO_APP, {**SEED_PARAMS, "max_histories": "-1"}),
    "max_histories_not_a_number": (DEMO_APP, {**SEED_PARAMS, "max_histories": "all"}),
    "bk_biz_id_not_a_number": (DEMO_APP, {**SEED_PARAMS, "bk_biz_id": "abc"}),
    "credentials_missing": ({}, SEED_PARAMS),
    "user_missing": ({k: v for k, v in DEMO_APP.items() if k != "bk_username"}, SEED_PARAMS),
    "secret_wrong": ({**DEMO_APP, "bk_app_secret": "guess"}, SEED_PARAMS),
}


@pytest.mark.parametrize("case", ERRORS)
def test_business_errors_are_http_200_with_the_legacy_code(http: httpx.Client, case: str) -> None:
    credentials, params = ERRORS[case]
    response = http.get(ESB_V2, params={**credentials, **params}, headers=TRACED)
    assert response.status_code == 200
    assert response.json()["result"] is False
    assert_golden(f"gateway/legacy_error_{case}", exchange(response))


@pytest.mark.parametrize(
    ("case", "credentials", "params"),
    [
        ("credentials_missing", None, {}),
        ("secret_wrong", {**DEMO_APP, "bk_app_secret": "guess"}, {}),
        ("business_not_granted", DEMO_APP, {}),
        ("node_not_in_task", DEMO_APP, {"node_id": "nodeunknown"}),
    ],
)
def test_gateway_route_errors(
    http: httpx.Client, case: str, credentials: dict[str, str] | None, params: dict[str, str]
) -> None:
    """The gateway's own errors in its envelope and status; bk-sops's as on the ESB route."""
    headers = dict(TRACED)
    if credentials is not None:
        headers["x-bkapi-authorization"] = json.dumps(credentials)
    path = "/get_task_node_detail/20/3/" if case == "business_not_granted" else APIGW
    query = {"node_id": SEED_NODE, "subprocess_stack": STACK, **params}
    response = http.get(path, params=query, headers=headers)
    assert_golden(f"gateway/legacy_apigw_error_{case}", exchange(response))


def test_a_json_body_may_give_ids_as_numbers_and_the_stack_as_a_list(http: httpx.Client) -> None:
    body = {**SEED_BODY, "bk_biz_id": 2, "task_id": 10, "subprocess_stack": [SEED_PARENT]}
    response = http.post(ESB_V2, json=body)
    assert response.json()["result"] is True, response.text
    assert response.json()["data"] == seed_post(http, ESB_V2).json()["data"]


def test_body_parameters_win_over_query_ones(http: httpx.Client) -> None:
    response = http.post(ESB_V2, params={"node_id": "nodeunknown"}, json=SEED_BODY)
    assert response.json()["result"] is True, response.text


def test_the_header_wins_over_credential_parameters(http: httpx.Client) -> None:
    wrong = {**DEMO_APP, "bk_app_secret": "guess"}
    headers = {"x-bkapi-authorization": json.dumps(DEMO_APP)}
    response = http.get(ESB_V2, params={**wrong, **SEED_PARAMS}, headers=headers)
    assert response.json()["result"] is True, response.text


def test_trace_id_follows_traceparent_else_is_fresh(http: httpx.Client) -> None:
    traced = seed_get(http, ESB_V2)
    assert traced.json()["trace_id"] == TRACE_ID == traced.headers["sops-trace-id"]
    fresh = [http.get(ESB_V2, params=SEED_BODY) for _ in range(2)]
    ids = [(r.json()["trace_id"], r.json()["request_id"]) for r in fresh]
    assert len({i for pair in ids for i in pair}) == 4
    garbled = http.get(ESB_V2, params=SEED_BODY, headers={"traceparent": "x" * 300})
    assert HEX32.fullmatch(garbled.json()["trace_id"])
