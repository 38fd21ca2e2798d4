"""Routes and requests without a server: templates, HttpRule routes, proto request building."""

from __future__ import annotations

import functools
import json

import pytest
from google.api import annotations_pb2
from google.api import http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import json_format
from google.protobuf.descriptor import ServiceDescriptor

from server import errors
from server.gateway import canonical
from server.gateway.requests import Request
from server.gateway.routes import APIGW
from server.gateway.routes import CANONICAL
from server.gateway.routes import ESB
from server.gateway.routes import GET_TASK_NODE_DETAIL
from server.gateway.routes import Router
from server.gateway.routes import Template
from server.gateway.routes import _rule_route
from server.gateway.routes import canonical_routes
from server.gateway.routes import legacy_routes

F = descriptor_pb2.FieldDescriptorProto


@functools.cache
def things_service() -> ServiceDescriptor:
    """An annotated service this project does not have, to test what its proto does not use:
    a body, additional bindings, a custom method, a variable over several segments."""
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/gateway/things.proto",
        package="things.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    inner = file.message_type.add(name="Inner")
    inner.field.add(name="note", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    thing = file.message_type.add(name="Thing")
    for number, (name, kind, label) in enumerate(
        [
            ("shelf", F.TYPE_STRING, F.LABEL_OPTIONAL),
            ("count", F.TYPE_INT64, F.LABEL_OPTIONAL),
            ("tags", F.TYPE_STRING, F.LABEL_REPEATED),
            ("fresh", F.TYPE_BOOL, F.LABEL_OPTIONAL),
            ("ratio", F.TYPE_DOUBLE, F.LABEL_OPTIONAL),
        ],
        start=1,
    ):
        thing.field.add(name=name, number=number, type=kind, label=label)
    thing.field.add(
        name="inner_part",
        number=6,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".things.v1.Inner",
        json_name="innerPart",
    )
    service = file.service.add(name="Things")
    create = service.method.add(
        name="CreateThing", input_type=".things.v1.Thing", output_type=".things.v1.Thing"
    )
    rule = create.options.Extensions[annotations_pb2.http]
    rule.post = "/v1/{shelf=shelves/*}/things"
    rule.body = "*"
    rule.additional_bindings.add(put="/v1/things/{shelf}", body="inner_part")
    rule.additional_bindings.add(
        custom=http_pb2.CustomHttpPattern(kind="MOVE", path="/v1/things/{shelf}:move")
    )
    get = service.method.add(
        name="GetThing", input_type=".things.v1.Thing", output_type=".things.v1.Thing"
    )
    get.options.Extensions[annotations_pb2.http].get = "/v1/shelves/{shelf}/thing"
    service.method.add(  # no HttpRule: no route
        name="Hidden", input_type=".things.v1.Thing", output_type=".things.v1.Thing"
    )
    pool = descriptor_pool.Default()
    return pool.AddSerializedFile(file.SerializeToString()).services_by_name["Things"]


def request(path_vars: dict[str, str], query: bytes = b"", body: bytes = b"") -> Request:
    return Request("GET", "/", query, {}, "-", "-", "0" * 32, "0" * 32, body, path_vars)


def test_templates_match_raw_paths() -> None:
    template = Template.parse("/v1/{name=shelves/*}/books/{book.id}:read")
    assert template.variables == ("name", "book.id")
    assert template.match("/v1/shelves/s%2F1/books/7:read") == {
        "name": "shelves/s%2F1",
        "book.id": "7",
    }
    assert template.match("/v1/shelves/s/1/books/7:read") is None
    assert template.match("/v1/shelves/s/books/7") is None
    anything = Template.parse("/files/{path=**}")
    assert anything.match("/files/a/b/c") == {"path": "a/b/c"}
    assert Template.parse("/a/*/c/").match("/a/b/c") == {}


def test_trailing_slashes_are_optional() -> None:
    template = Template.parse("/get_task_node_detail/{task_id}/{bk_biz_id}/")
    assert template.match("/get_task_node_detail/10/2") == {"task_id": "10", "bk_biz_id": "2"}
    assert template.match("/get_task_node_detail/10/2/") == {"task_id": "10", "bk_biz_id": "2"}


@pytest.mark.parametrize("text", ["v1/x", "/v1/{x", "/v1/{1x}", "/v1/a*b", "/v1//x", "/v1/{a={b}}"])
def test_bad_templates_are_refused_at_start_up(text: str) -> None:
    with pytest.raises(ValueError, match="path template"):
        Template.parse(text)


def test_the_canonical_route_comes_from_the_http_rule() -> None:
    rule = GET_TASK_NODE_DETAIL.GetOptions().Extensions[annotations_pb2.http]
    routes = canonical_routes()
    batch_get = GET_TASK_NODE_DETAIL.containing_service.methods_by_name["BatchGetTaskNodeDetails"]
    list_nodes = GET_TASK_NODE_DETAIL.containing_service.methods_by_name["ListTaskNodes"]
    assert [(r.method, r.template.text, r.kind, r.rpc, r.body) for r in routes] == [
        ("GET", rule.get, CANONICAL, GET_TASK_NODE_DETAIL, ""),
        ("POST", "/v1/nodes:batchGet", CANONICAL, batch_get, "*"),
        ("GET", "/v1/businesses/{bk_biz_id}/tasks/{task_id}/nodes", CANONICAL, list_nodes, ""),
        (
            "GET",
            "/v1/businesses/{node.bk_biz_id}/tasks/{node.task_id}/nodes/{node.node_id}:watch",
            CANONICAL,
            GET_TASK_NODE_DETAIL.containing_service.methods_by_name["WatchTaskNode"],
            "",
        ),
        (
            "GET",
            "/v1/businesses/{bk_biz_id}/tasks/{task_id}:watch",
            CANONICAL,
            GET_TASK_NODE_DETAIL.containing_service.methods_by_name["WatchTask"],
            "",
        ),
    ]
    assert rule.get == "/v1/businesses/{bk_biz_id}/tasks/{task_id}/nodes/{node_id}"


def test_every_binding_of_every_annotated_method_is_a_route() -> None:
    routes = canonical_routes([things_service()])
    assert [(r.method, r.template.text, r.rpc.name, r.body) for r in routes] == [
        ("POST", "/v1/{shelf=shelves/*}/things", "CreateThing", "*"),
        ("PUT", "/v1/things/{shelf}", "CreateThing", "inner_part"),
        ("MOVE", "/v1/things/{shelf}:move", "CreateThing", ""),
        ("GET", "/v1/shelves/{shelf}/thing", "GetThing", ""),
    ]


def test_the_legacy_routes_and_the_prefix() -> None:
    routes = legacy_routes("/prod/")
    assert [(r.method, r.template.text, r.kind) for r in routes] == [
        ("GET", "/api/c/compapi/v2/sops/get_task_node_detail/", ESB),
        ("POST", "/api/c/compapi/v2/sops/get_task_node_detail/", ESB),
        ("GET", "/api/c/compapi/sops/get_task_node_detail/", ESB),
        ("POST", "/api/c/compapi/sops/get_task_node_detail/", ESB),
        ("GET", "/prod/get_task_node_detail/{task_id}/{bk_biz_id}/", APIGW),
    ]


def test_the_router_says_why_it_has_no_route() -> None:
    router = Router([*legacy_routes(), *canonical_routes()])
    route, found = router.match("GET", "/get_task_node_detail/1%30/%E4%B8%AD/")
    assert (route.kind, found) == (APIGW, {"task_id": "10", "bk_biz_id": "中"})
    with pytest.raises(errors.MethodNotAllowed) as refused:
        router.match("DELETE", "/api/c/compapi/sops/get_task_node_detail")
    assert refused.value.metadata == {"allow": "GET, POST"}
    with pytest.raises(errors.RouteNotFound):
        router.match("GET", "/v1/businesses/2")
    assert [router.kind_for(p) for p in ("/v1/x", "/api/x", "/get_task_node_detail", "/")] == [
        CANONICAL,
        ESB,
        APIGW,
        ESB,
    ]


def test_a_body_star_rule_reads_the_body_and_the_path_wins() -> None:
    route = canonical_routes([things_service()])[0]
    body = json.dumps({"shelf": "ignored", "count": "5", "tags": ["a"], "unknown": 1}).encode()
    message = canonical.build_request(route, request({"shelf": "shelves/s1"}, b"count=9", body))
    assert json_format.MessageToDict(message) == {
        "shelf": "shelves/s1",
        "count": "5",
        "tags": ["a"],
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "the request body must be a JSON object, not an array"),
        (b"{", "the request body is not valid JSON"),
        (b'{"count": {}}', "Failed to parse count field"),
    ],
)
def test_a_bad_body_is_an_invalid_argument(body: bytes, message: str) -> None:
    route = canonical_routes([things_service()])[0]
    with pytest.raises(errors.InvalidArgument, match=message):
        canonical.build_request(route, request({"shelf": "shelves/s"}, b"", body))


def test_an_empty_body_is_an_empty_message() -> None:
    for route in canonical_routes([things_service()])[:2]:
        message = canonical.build_request(route, request({"shelf": "shelves/s"}))
        assert json_format.MessageToDict(message) == {"shelf": "shelves/s"}


def test_a_body_field_rule_reads_that_field_from_the_body() -> None:
    route = canonical_routes([things_service()])[1]
    message = canonical.build_request(route, request({"shelf": "s"}, b"count=2", b'{"note": "n"}'))
    assert json_format.MessageToDict(message) == {
        "shelf": "s",
        "count": "2",
        "innerPart": {"note": "n"},
    }


def test_query_parameters_fill_the_other_fields() -> None:
    route = canonical_routes([things_service()])[3]
    query = b"count=-3&tags=a&tags=b&fresh=true&ratio=0.5&innerPart.note=x&shelf=no&nope=1"
    message = canonical.build_request(route, request({"shelf": "s"}, query))
    assert json_format.MessageToDict(message) == {
        "shelf": "s",
        "count": "-3",
        "tags": ["a", "b"],
        "fresh": True,
        "ratio": 0.5,
        "innerPart": {"note": "x"},
    }


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (b"fresh=maybe", "fresh must be true or false, not 'maybe'"),
        (b"count=1.5", "count must be an integer, not '1.5'"),
        (b"count=1&count=2", "count is given 2 times; it takes one value"),
        (b"ratio=lots", "Failed to parse ratio field"),
        (b"count=99999999999999999999", "Failed to parse count field"),
    ],
)
def test_bad_query_values_are_invalid_arguments(query: bytes, message: str) -> None:
    route = canonical_routes([things_service()])[3]
    with pytest.raises(errors.InvalidArgument, match=message):
        canonical.build_request(route, request({"shelf": "s"}, query))


def test_rules_naming_no_field_are_refused_at_start_up() -> None:
    method = things_service().methods_by_name["GetThing"]
    rule = descriptor_pb2.MethodOptions()
    rule.Extensions[annotations_pb2.http].get = "/v1/{nothing}"
    with pytest.raises(ValueError, match="not a field path"):
        _rule_route(method, rule.Extensions[annotations_pb2.http])


def test_a_verb_route_wins_over_a_variable_that_would_take_its_segment() -> None:
    route, found = Router(canonical_routes()).match(
        "GET", "/v1/businesses/2/tasks/11/nodes/node1:watch"
    )
    assert route.rpc.name == "WatchTaskNode"
    assert found == {"node.bk_biz_id": "2", "node.task_id": "11", "node.node_id": "node1"}
