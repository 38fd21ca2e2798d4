"""The legacy `data` of nodes loaded from a file, where bk-sops's rules are easy to miss.

Each node here is shaped like one bk-sops's engine produces (tests/engine checks the
same rules on databases the real engine wrote): the engine v2 keys (`root_id:`,
`parent_id`, each history's `id`), histories without ex_data, nodes without execution
data asked with component_code, values Python's json writes oddly, a null name and an
output renamed by a root constant. On each store, through the legacy route.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.app import Server
from server.config import Config
from server.gateway.local import LocalBackend
from tests import documents
from tests.conftest import ALL_APP
from tests.documents import COMPONENT
from tests.documents import attempt
from tests.documents import node
from tests.gateway.conftest import running_shim

TASK = 700
ROOT = "p0f3c1b6d6a2a4e5f8b9c0d1e2f3a4b5c"
ODD = {"nan": math.nan, "inf": math.inf, "minus_inf": -math.inf, "huge": 2**70, "small": -(2**64)}


@pytest.fixture
def legacy(server: Server, demo_config: Config) -> Iterator[httpx.Client]:
    """The shim in front of the demo server, with task TASK loaded."""
    loop_one = [attempt(1, 0), attempt(1, 1, state="FINISHED", ex_data=None, id=9002)]
    nodes = [
        node(
            "quiet",
            execution={"state": "FINISHED", "retry": 1, "version": "v2"},
            # Failed without saying why: bk-sops shows ex_data "" for it.
            attempts=[attempt(1, 0, ex_data=None, outputs={"_result": False}, id=9001)],
        ),
        node(
            "looped",
            execution={"state": "FINISHED", "loop": 2, "version": "v3"},
            attempts=[*loop_one, attempt(2, 0)],
        ),
        # The engine keeps no execution data for an event: outputs null.
        node("start", name=None, type="EmptyStartEvent", outputs=None, ex_data=""),
        {"id": "end", "name": None, "type": "EmptyEndEvent"},
        node("odd", outputs=ODD),
        node("renamed", outputs={"count": 3, "_result": True}, renamed={"count": "total"}),
        documents.subprocess("sub", [node("child")]),
    ]
    record = {**documents.task(TASK, *nodes), "pipeline_id": ROOT}
    documents.load(server.store.db, documents.document(record))
    with (
        running_shim(demo_config, LocalBackend(server.handlers, server.workers)) as http,
        httpx.Client(base_url=http.url, timeout=10) as client,
    ):
        yield client


def ask(client: httpx.Client, node_id: str, **params: Any) -> httpx.Response:
    response = client.get(
        "/api/c/compapi/v2/sops/get_task_node_detail/",
        params={
            **ALL_APP,
            "bk_biz_id": documents.BUSINESS,
            "task_id": TASK,
            "node_id": node_id,
            **params,
        },
    )
    assert response.status_code == 200 and response.json()["result"], response.text
    return response


def data(client: httpx.Client, node_id: str, **params: Any) -> dict[str, Any]:
    found: dict[str, Any] = ask(client, node_id, **params).json()["data"]
    return found


def test_engine_v2_keys_are_sent_as_bk_sops_sends_them(legacy: httpx.Client) -> None:
    quiet = data(legacy, "quiet")
    assert (quiet["root_id:"], quiet["parent_id"]) == (ROOT, ROOT)
    (history,) = quiet["histories"]
    assert (history["id"], history["history_id"]) == (9001, 9001)
    sub = data(legacy, "sub")
    (child,) = sub["children"].values()
    # A child's parent is the sub-process's pipeline, whose id is the sub-process node's.
    assert (child["root_id:"], child["parent_id"]) == (ROOT, "sub")


def test_a_current_loop_history_without_ex_data_shows_an_empty_string(
    legacy: httpx.Client,
) -> None:
    (history,) = data(legacy, "quiet")["histories"]
    assert history["ex_data"] == ""


def test_an_older_loops_histories_have_no_ex_data_key(legacy: httpx.Client) -> None:
    older = data(legacy, "looped", loop="1")
    assert older["history_id"] == 9002
    (history,) = older["histories"]
    assert "ex_data" not in history
    (current,) = data(legacy, "looped")["histories"]
    assert current["ex_data"] == "exit 1"


@pytest.mark.parametrize("node_id", ["start", "end"])
def test_an_event_asked_with_component_code_has_no_output_table(
    legacy: httpx.Client, node_id: str
) -> None:
    event = data(legacy, node_id, component_code=COMPONENT)
    assert (event["outputs"], event["ex_data"], event["name"]) == ([], "", None)


def test_nan_infinity_and_big_integers_are_written_as_pythons_json_writes_them(
    legacy: httpx.Client,
) -> None:
    text = ask(legacy, "odd").text
    for written in (
        '{"key":"nan","value":NaN,',
        '{"key":"inf","value":Infinity,',
        '{"key":"minus_inf","value":-Infinity,',
        '{"key":"huge","value":1180591620717411303424,',
        '{"key":"small","value":-18446744073709551616,',
    ):
        assert written in text


def test_an_output_renamed_by_a_root_constant_keeps_its_name_and_place(
    legacy: httpx.Client,
) -> None:
    outputs = data(legacy, "renamed", component_code=COMPONENT)["outputs"]
    assert outputs[0] == {"name": "count", "key": "total", "value": 3, "preset": True}
