"""Bad input never breaks the shim: malformed requests, limits, a dead backend, random input."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from server.cli import DEMO_APP
from server.config import Config
from server.gateway.examples import SEED_BODY
from tests.gateway.conftest import TRACEPARENT
from tests.gateway.conftest import exchange
from tests.gateway.conftest import running_shim
from tests.golden_files import assert_golden

ESB_V2 = "/api/c/compapi/v2/sops/get_task_node_detail/"
APIGW = "/get_task_node_detail/10/2/"
CANONICAL = "/v1/businesses/2/tasks/10/nodes/node0df0431f8f553925af01a94854bd"
SEED = {**SEED_BODY, **DEMO_APP}
SEED.pop("bk_token")
ENVELOPE = {"result", "code", "message", "data", "request_id", "trace_id"}
LIMIT = 64 * 1024


@pytest.fixture
def client(sqlite_shim: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sqlite_shim, timeout=10, headers={"traceparent": TRACEPARENT}) as c:
        yield c


def post(client: httpx.Client, body: bytes | str, **headers: str) -> httpx.Response:
    return client.post(
        ESB_V2, content=body, headers={"content-type": "application/json", **headers}
    )


#: Malformed requests on the old ESB route (POST): each gets a clear envelope error.
MALFORMED_BODIES: dict[str, bytes | str] = {
    "body_not_json": '{"bk_biz_id": "2",',
    "body_not_an_object": "[1, 2]",
    "body_not_utf8": b'{"node_id": "\xff\xfe"}',
    "body_nan": '{"loop": NaN}',
    "body_nested_too_deeply": "[" * 50_000,
    "body_integer_too_long": '{"loop": ' + "9" * 5000 + "}",
    "id_as_a_float": json.dumps({**SEED, "bk_biz_id": 2.5}),
    "id_as_a_boolean": json.dumps({**SEED, "task_id": True}),
    "node_id_as_a_list": json.dumps({**SEED, "node_id": ["a"]}),
    "node_id_half_a_surrogate_pair": json.dumps({**SEED, "node_id": "node\ud800"}),
    "scope_as_a_number": json.dumps({**SEED, "scope": 2}),
    "loop_as_a_float": json.dumps({**SEED, "loop": 1.5}),
    "subprocess_stack_as_an_object": json.dumps({**SEED, "subprocess_stack": {"a": 1}}),
    "credential_as_a_number": json.dumps({**SEED, "bk_app_secret": 1}),
}


@pytest.mark.parametrize("case", MALFORMED_BODIES)
def test_malformed_bodies(client: httpx.Client, case: str) -> None:
    response = post(client, MALFORMED_BODIES[case])
    assert response.status_code == 200
    assert response.json()["result"] is False
    assert_golden(f"gateway/malformed_{case}", exchange(response))


#: Malformed X-Bkapi-Authorization headers: credential errors, as the server words them.
MALFORMED_HEADERS = {
    "header_not_json": "{bk_app_code",
    "header_not_an_object": "[1]",
    "header_nested_too_deeply": "[" * 5000,
    "header_field_not_a_string": json.dumps({**DEMO_APP, "bk_username": 7}),
}


@pytest.mark.parametrize("case", MALFORMED_HEADERS)
def test_malformed_authorization_headers(client: httpx.Client, case: str) -> None:
    headers = {"x-bkapi-authorization": MALFORMED_HEADERS[case]}
    response = client.get(ESB_V2, params=SEED_BODY, headers=headers)
    assert response.json()["code"] == 1306000
    assert_golden(f"gateway/malformed_{case}", exchange(response))


def test_an_authorization_header_that_is_not_utf8(client: httpx.Client) -> None:
    """Unreadable credentials, as over gRPC; not Latin-1 text that happens to be accepted."""
    header = json.dumps({**DEMO_APP, "bk_username": "bob\xff"}, ensure_ascii=False)
    headers = {b"x-bkapi-authorization": header.encode("latin-1")}
    response = client.get(ESB_V2, params=SEED_BODY, headers=headers)
    assert (response.json()["code"], response.json()["message"]) == (
        1306000,
        "X-Bkapi-Authorization is not UTF-8",
    )


def test_an_error_stays_small_however_many_fields_are_bad(http: httpx.Client) -> None:
    """One violation per bad entry once made errors larger than the request (and, over a
    channel, larger than a gRPC client accepts)."""
    bad = "x!"  # not a node id
    legacy = http.post(ESB_V2, json={**SEED, "subprocess_stack": [bad] * 5000})
    assert legacy.json()["code"] == 3599999, legacy.text[:500]  # INVALID_SUBPROCESS_STACK
    assert len(legacy.content) < 1024, len(legacy.content)
    canonical = http.get(
        CANONICAL,
        params=[("subprocessStack", bad)] * 250,
        headers={"x-bkapi-authorization": json.dumps(DEMO_APP)},
    )
    assert canonical.status_code == 400
    assert len(canonical.content) < 2048, len(canonical.content)
    violations = canonical.json()["details"][1]["fieldViolations"]
    assert violations[-1]["description"] == "and 241 more violations, not listed"


def test_a_query_string_that_is_not_utf8(client: httpx.Client) -> None:
    response = client.get(ESB_V2 + "?node_id=%ff%fe&bk_biz_id=2")
    assert_golden("gateway/malformed_query_not_utf8", exchange(response))


def test_too_many_query_parameters(client: httpx.Client) -> None:
    response = client.get(ESB_V2, params=[("p", str(i)) for i in range(300)])
    assert response.json()["message"] == "the query string has more than 256 parameters"


def test_a_path_segment_that_is_not_utf8(client: httpx.Client) -> None:
    response = client.get("/get_task_node_detail/%ff/2/", params={"node_id": "x"})
    assert_golden("gateway/malformed_path_segment_not_utf8", exchange(response))


def test_a_body_over_the_limit_is_413_in_the_envelope(client: httpx.Client) -> None:
    response = post(client, "x" * (LIMIT + 1))
    assert response.status_code == 413
    assert_golden("gateway/refused_body_too_large", exchange(response))


def test_a_streamed_body_over_the_limit_is_413_too(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(80):
            yield b" " * 1024

    response = client.post(ESB_V2, content=chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413
    assert response.json()["message"] == f"the request body is larger than {LIMIT} bytes"


def test_a_body_at_the_limit_is_read(client: httpx.Client) -> None:
    body = json.dumps(SEED)
    response = post(client, body + " " * (LIMIT - len(body)))
    assert response.json()["result"] is True, response.text


def test_an_unknown_path_is_a_json_404(client: httpx.Client) -> None:
    response = client.get("/no/such/path", params={"bk_app_secret": "not logged"})
    assert_golden("gateway/refused_unknown_path", exchange(response))


@pytest.mark.parametrize(
    ("case", "method", "path"),
    [("esb_put", "PUT", ESB_V2), ("apigw_post", "POST", APIGW), ("esb_head", "HEAD", ESB_V2)],
)
def test_other_methods_are_405_with_allow(
    client: httpx.Client, case: str, method: str, path: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    if method != "HEAD":
        assert_golden(f"gateway/refused_method_{case}", exchange(response))


@pytest.fixture
def dead_backend() -> str:
    """host:port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def orphan(sqlite_config: Config, dead_backend: str) -> Iterator[httpx.Client]:
    """A client of a shim whose gRPC backend is down."""
    with (
        running_shim(sqlite_config, dead_backend) as http,
        httpx.Client(base_url=http.url, timeout=10) as client,
    ):
        yield client


def test_a_dead_backend_is_named_in_the_envelope(orphan: httpx.Client, dead_backend: str) -> None:
    response = orphan.get(ESB_V2, params=SEED)
    body = response.json()
    assert (response.status_code, body["result"], body["code"]) == (200, False, 3555000)
    assert body["message"].startswith(f"the gRPC backend at {dead_backend} is unavailable: ")


def test_a_dead_backend_is_503_on_the_canonical_route(
    orphan: httpx.Client, dead_backend: str
) -> None:
    headers = {"x-bkapi-authorization": json.dumps(DEMO_APP)}
    response = orphan.get(CANONICAL, headers=headers)
    body = response.json()
    assert (response.status_code, body["code"]) == (503, 14)
    assert body["details"][0]["reason"] == "BACKEND_UNAVAILABLE"
    assert body["details"][0]["metadata"] == {"target": dead_backend}


def test_requests_are_logged_without_their_query(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="tasknode.access.http"):
        response = client.get(ESB_V2, params=SEED)
        deadline = time.monotonic() + 5  # the access log is written in batches
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
    line = caplog.records[-1].getMessage()
    assert f"GET {ESB_V2} 200" in line and response.headers["x-bkapi-request-id"] in line
    assert "xxx" not in line


# Random input ------------------------------------------------------------------------------

NAMES = [
    *SEED_BODY,
    "bk_username",
    "loop",
    "scope",
    "max_histories",
    "subprocessStack",
    "componentCode",
    "maxHistories",
]
texts = st.text(max_size=30)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
params = st.lists(
    st.tuples(st.sampled_from(NAMES) | texts, texts | st.sampled_from(["1", "-1", "[]", "2"])),
    max_size=8,
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(NAMES) | texts, json_values, max_size=8).map(json.dumps),
    json_values.map(json.dumps),
)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
headers = st.dictionaries(
    st.sampled_from(["x-bkapi-authorization", "traceparent", "content-type", "x-other"]),
    header_values | json_values.map(json.dumps),
    max_size=3,
)
segment = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#"))
paths = st.one_of(
    st.sampled_from([ESB_V2, "/api/c/compapi/sops/get_task_node_detail", APIGW, CANONICAL]),
    st.tuples(segment, segment).map(lambda ids: f"/get_task_node_detail/{ids[0]}/{ids[1]}/"),
    st.tuples(segment, segment, segment).map(
        lambda ids: "/v1/businesses/{}/tasks/{}/nodes/{}".format(*ids)
    ),
    st.text(max_size=20).map(lambda text: "/" + text),
)


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "GET", "PUT", "DELETE"]),
    path=paths,
    query=params,
    body=bodies,
    extra=headers,
)
def test_random_requests_get_a_well_formed_answer(
    client: httpx.Client,
    method: str,
    path: str,
    query: list[tuple[str, str]],
    body: bytes | str,
    extra: dict[str, str],
) -> None:
    try:
        request = client.build_request(
            method, path, params=tuple(query), content=body, headers=extra
        )
        response = client.send(request)
    except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
        return  # httpx will not send that: it is no HTTP request
    assert response.status_code < 500, response.text
    assert len(response.headers["x-bkapi-request-id"]) == 32
    answer: Any = response.json()
    assert isinstance(answer, dict)
    if answer.get("message") == "the request is not valid HTTP/1.1":  # refused by the parser
        assert (response.status_code, set(answer)) == (400, ENVELOPE)
    elif request.url.path.startswith("/v1/"):
        assert response.status_code == 200 or set(answer) == {"code", "message", "details"}
    elif "code_name" in answer:  # the API gateway's own envelope
        assert response.status_code in (400, 403) and answer["result"] is False
    else:
        assert set(answer) == ENVELOPE
        assert isinstance(answer["code"], int) and isinstance(answer["message"], str)
        assert (answer["code"] == 0) is answer["result"]
