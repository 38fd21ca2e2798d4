"""curl commands for every route, against the demo data: printed at start-up, shown in the docs.

They call as the demo app (server.cli.DEMO_APP, passed in), which holds the seed
document's own credentials, so the seed request is shown exactly as written.
tests/gateway/test_examples.py runs each command with the real curl, and checks that
the docs show them as printed here for the default address.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from server.auth import CREDENTIAL_FIELDS

SEED_NODE = "node0df0431f8f553925af01a94854bd"
SEED_PARENT = "nodeaaa0ce51d2143aa9b0dbc27cb7df"
#: The seed document's request example, its two syntax slips fixed.
SEED_BODY: dict[str, str] = {
    "bk_app_code": "esb_test",
    "bk_app_secret": "xxx",
    "bk_token": "xxx",
    "bk_biz_id": "2",
    "task_id": "10",
    "node_id": SEED_NODE,
    "subprocess_stack": json.dumps([SEED_PARENT]),
    "component_code": "job_fast_execute_script",
}

#: A batch of three nodes of task 11, the second of which does not exist.
BATCH_BODY = {
    "requests": [
        {"bkBizId": "2", "taskId": "11", "nodeId": "nodef1a2b3c4d5e6f708192a3b4c5d6e"},
        {"bkBizId": "2", "taskId": "11", "nodeId": "nodeunknown"},
        {"bkBizId": "2", "taskId": "11", "nodeId": "node3c4d5e6f708192a3b4c5d6e7f809"},
    ]
}


@dataclass(frozen=True)
class Example:
    title: str
    command: str
    #: Whether the example shows a failure.
    fails: bool = False


def curl_examples(
    credentials: Mapping[str, str],
    base: str = "http://127.0.0.1:8080",
    prefix: str = "",
    cacert: str = "",
) -> list[Example]:
    """The examples calling as credentials (bk_app_code, bk_app_secret, bk_username) a shim
    at base (no trailing slash), with its gateway route under prefix, trusting cacert
    (a self-signed certificate is its own) when given."""
    curl = f"curl --cacert {cacert}" if cacert else "curl"
    esb = f"{base}/api/c/compapi/v2/sops/get_task_node_detail/"
    stack = f"--data-urlencode 'subprocess_stack={json.dumps([SEED_PARENT])}'"
    gateway = "/".join(part for part in (prefix.strip("/"), "get_task_node_detail/10/2/") if part)
    header = f"-H 'X-Bkapi-Authorization: {json.dumps(dict(credentials))}'"
    params = " ".join(f"-d {name}={value}" for name, value in credentials.items())
    # The seed request as written when the credentials are the demo's (its bk_token
    # included); with other credentials, those in place of the seed's.
    demo = credentials.get("bk_app_code") == SEED_BODY["bk_app_code"]
    seed = (
        SEED_BODY
        if demo
        else {
            **credentials,
            **{k: v for k, v in SEED_BODY.items() if k not in CREDENTIAL_FIELDS},
        }
    )
    return [
        Example(
            "The seed request: old ESB route, POST with a JSON body",
            f"{curl} -s {esb} \\\n"
            "  -H 'Content-Type: application/json' \\\n"
            f"  -d '{json.dumps(seed)}'",
        ),
        Example(
            "The same as a GET with a query string (old ESB route without /v2)",
            f"{curl} -sG {base}/api/c/compapi/sops/get_task_node_detail/ \\\n"
            f"  {params} \\\n"
            f"  -d bk_biz_id=2 -d task_id=10 -d node_id={SEED_NODE} \\\n"
            f"  {stack} -d component_code=job_fast_execute_script",
        ),
        Example(
            "The API gateway route (task first), credentials in the header the SDKs send",
            f"{curl} -sG {base}/{gateway} \\\n"
            f"  {header} \\\n"
            f"  -d node_id={SEED_NODE} \\\n"
            f"  {stack} -d component_code=job_fast_execute_script",
        ),
        Example(
            "The canonical route of the proto's google.api.http rule, in proto JSON",
            f"{curl} -s {header} \\\n"
            f"  '{base}/v1/businesses/2/tasks/10/nodes/{SEED_NODE}"
            f"?subprocessStack={SEED_PARENT}&componentCode=job_fast_execute_script'",
        ),
        Example(
            "The same with its headers: ETag is the node's etag, which If-None-Match takes",
            f"{curl} -si {header} \\\n"
            f"  '{base}/v1/businesses/2/tasks/10/nodes/{SEED_NODE}"
            f"?subprocessStack={SEED_PARENT}&componentCode=job_fast_execute_script'",
        ),
        Example(
            "Several nodes in one call: a result per request, in order, each the node or the"
            " google.rpc.Status its own call would get",
            f"{curl} -s {base}/v1/nodes:batchGet \\\n"
            f"  {header} \\\n"
            f"  -d '{json.dumps(BATCH_BODY)}'",
        ),
        Example(
            "A business error: HTTP 200, result false, the bk-sops code and message",
            f"{curl} -sG {esb} \\\n  {params} \\\n"
            "  -d bk_biz_id=2 -d task_id=10 -d node_id=nodeunknown",
            fails=True,
        ),
        Example(
            "The same error on the canonical route: HTTP 404 and a google.rpc.Status",
            f"{curl} -si {header} \\\n  {base}/v1/businesses/2/tasks/10/nodes/nodeunknown",
            fails=True,
        ),
    ]


def banner(credentials: Mapping[str, str], base: str, prefix: str = "", cacert: str = "") -> str:
    """The start-up text: every example, ready to paste."""
    lines = [f"HTTP/JSON shim on {base}. Try (as the demo app):"]
    for example in curl_examples(credentials, base, prefix, cacert):
        lines += [
            "",
            f"  # {example.title}",
            *(f"  {line}" for line in example.command.split("\n")),
        ]
    return "\n".join(lines) + "\n"
