"""Traces (server.traces): a span per call and per HTTP request, the store's queries as their
children, a caller's traceparent continued over gRPC and HTTP, the legacy envelope's
trace_id the trace's own id, nothing recorded when tracing is off, and no secret in any span.

Spans are read with the SDK's InMemorySpanExporter, the real SDK behind it; the OTLP
exporter is checked against a real OTLP/gRPC receiver, from `serve`'s worker processes.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any
from typing import cast

import grpc
import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span
from opentelemetry.trace import SpanKind
from opentelemetry.trace import StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server import traces
from server.app import Server
from server.cli import DEMO_APP
from server.config import Config
from server.db.apps import AppStore
from server.db.connection import open_database
from server.gateway.local import LocalBackend
from tests.conftest import ALL_APP
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.gateway.conftest import running_shim
from tests.processes import start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
GET_DETAIL = "bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"
ESB_V2 = "/api/c/compapi/v2/sops/get_task_node_detail/"
SEED_PARAMS = {
    "bk_biz_id": "2",
    "task_id": "10",
    "node_id": "node0df0431f8f553925af01a94854bd",
    "subprocess_stack": '["nodeaaa0ce51d2143aa9b0dbc27cb7df"]',
    "component_code": "job_fast_execute_script",
}
HEX32 = re.compile(r"[0-9a-f]{32}")


class KeptExporter(InMemorySpanExporter):
    """An in-memory exporter that keeps taking spans after its provider shut down, so that
    a span exported by a provider that should be gone would still show up here."""

    def shutdown(self) -> None:
        """Not stopped: see the class."""


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every trace sampled, spans kept in memory; off after."""
    exporter = InMemorySpanExporter()
    traces.configure(Config(), exporter)
    yield exporter
    traces.shutdown()


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def children_of(span: ReadableSpan, found: list[ReadableSpan]) -> list[ReadableSpan]:
    assert span.context is not None
    return [s for s in found if s.parent is not None and s.parent.span_id == span.context.span_id]


def one(found: list[ReadableSpan], name: str) -> ReadableSpan:
    named = [s for s in found if s.name == name]
    assert len(named) == 1, [s.name for s in found]
    return named[0]


def test_a_call_is_a_server_span_continuing_the_callers_trace_with_its_queries_as_children(
    spans: InMemorySpanExporter, channel: grpc.Channel, demo_config: Config
) -> None:
    stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
    stub.GetTaskNodeDetail(seed_request(), metadata=[("traceparent", TRACEPARENT)], timeout=10)
    found = list(spans.get_finished_spans())
    call = one(found, GET_DETAIL)
    assert call.kind == SpanKind.SERVER
    assert hex_trace(call) == TRACE_ID
    assert call.parent is not None and call.parent.is_remote
    assert format(call.parent.span_id, "016x") == PARENT_ID
    assert call.attributes is not None
    assert dict(call.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "bksops.tasknode.v1.TaskNodeService",
        "rpc.method": "GetTaskNodeDetail",
        "rpc.grpc.status_code": 0,
    }
    queries = children_of(call, found)
    assert len(queries) == len(found) - 1  # every other span is one of the call's queries
    # The credential lookups, then the reply's own reads (server.db.store).
    assert {"store credentials", "store stamp", "store node", "store attempts"} <= {
        q.name for q in queries
    }
    system = demo_config.database_url.split(":", 1)[0]
    for query in queries:
        assert query.kind == SpanKind.CLIENT and hex_trace(query) == TRACE_ID
        assert query.attributes is not None
        assert dict(query.attributes) == {
            "db.system.name": system,
            "tasknode.store.query": query.name.removeprefix("store "),
        }

    spans.clear()
    stub.GetTaskNodeDetail(seed_request(), timeout=10)  # no traceparent: a trace of its own
    fresh = one(list(spans.get_finished_spans()), GET_DETAIL)
    assert fresh.parent is None and hex_trace(fresh) not in (TRACE_ID, "0" * 32)


def test_a_failed_call_is_an_error_only_when_it_is_the_servers(
    spans: InMemorySpanExporter, channel: grpc.Channel
) -> None:
    stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetTaskNodeDetail(seed_request(node_id="nodenothere"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    call = one(list(spans.get_finished_spans()), GET_DETAIL)
    assert call.attributes is not None
    assert call.attributes["rpc.grpc.status_code"] == missing.value.code().value[0]
    assert call.status.status_code == StatusCode.UNSET  # the caller's mistake
    assert not call.events  # no exception recorded for an abort

    spans.clear()
    with pytest.raises(grpc.RpcError) as late:
        stub.GetTaskNodeDetail(seed_request(), timeout=0.000001)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Served, if at all, after the deadline passed: the call is an error; the queries it
    # may have run before it noticed are its own children.
    for span in spans.get_finished_spans():
        if span.name == GET_DETAIL:
            assert span.status.status_code == StatusCode.ERROR
        else:
            assert span.name.startswith("store ") and span.parent is not None, span.name


@pytest.fixture(params=["channel", "in-process"])
def shim_url(
    request: pytest.FixtureRequest, demo_config: Config, server: Server, grpc_address: str
) -> Iterator[str]:
    """The shim in front of the demo server, over a channel and in-process."""
    target: Any = grpc_address
    if request.param == "in-process":
        target = LocalBackend(server.handlers, server.workers)
    with running_shim(demo_config, target) as http:
        yield http.url


def test_an_http_request_is_the_parent_of_its_call_and_the_envelope_shows_the_trace_id(
    spans: InMemorySpanExporter, shim_url: str
) -> None:
    params = {**SEED_PARAMS, **DEMO_APP}
    with httpx.Client(base_url=shim_url, timeout=10) as http:
        traced = http.get(ESB_V2, params=params, headers={"traceparent": TRACEPARENT})
        assert traced.json()["result"] is True, traced.text
        assert traced.json()["trace_id"] == TRACE_ID == traced.headers["sops-trace-id"]
        found = list(spans.get_finished_spans())
        request = one(found, f"GET {ESB_V2}")
        assert request.kind == SpanKind.SERVER and hex_trace(request) == TRACE_ID
        assert request.parent is not None and format(request.parent.span_id, "016x") == PARENT_ID
        assert request.attributes is not None
        assert dict(request.attributes) == {
            "http.request.method": "GET",
            "http.route": ESB_V2,
            "http.response.status_code": 200,
        }
        (call,) = children_of(request, found)
        assert call.name == GET_DETAIL and hex_trace(call) == TRACE_ID
        assert {q.name for q in children_of(call, found)} >= {"store credentials", "store node"}

        spans.clear()
        fresh = http.get(ESB_V2, params=params)
        envelope_id = fresh.json()["trace_id"]
        found = list(spans.get_finished_spans())
        request = one(found, f"GET {ESB_V2}")
        assert request.parent is None
        assert envelope_id == hex_trace(request) == fresh.headers["sops-trace-id"]
        assert envelope_id != TRACE_ID and HEX32.fullmatch(envelope_id)
        assert [hex_trace(s) for s in children_of(request, found)] == [envelope_id]

        spans.clear()
        missing = http.get("/no/such/route", headers={"traceparent": TRACEPARENT})
        assert missing.status_code == 404 and missing.json()["trace_id"] == TRACE_ID
        (only,) = spans.get_finished_spans()
        assert only.name == "GET" and only.attributes is not None
        assert only.attributes["http.response.status_code"] == 404


def test_with_tracing_off_there_are_no_spans_and_the_envelope_still_shows_the_trace_id(
    shim_url: str, channel: grpc.Channel
) -> None:
    exporter = KeptExporter()
    traces.configure(Config(), exporter)
    stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
    params = {**SEED_PARAMS, **DEMO_APP}
    with httpx.Client(base_url=shim_url, timeout=10) as http:
        http.get(ESB_V2, params=params)
        stub.GetTaskNodeDetail(seed_request(), timeout=10)
        assert len(exporter.get_finished_spans()) > 2  # it would see spans of any tracer of ours
        exporter.clear()

        traces.configure(Config(traces_exporter="none"))
        assert traces.tracer() is None
        traced = http.get(ESB_V2, params=params, headers={"traceparent": TRACEPARENT})
        fresh = [http.get(ESB_V2, params=params).json()["trace_id"] for _ in range(2)]
        stub.GetTaskNodeDetail(seed_request(), metadata=[("traceparent", TRACEPARENT)], timeout=10)
    assert exporter.get_finished_spans() == ()
    assert traced.json()["result"] is True and traced.json()["trace_id"] == TRACE_ID
    assert all(HEX32.fullmatch(t) for t in fresh) and fresh[0] != fresh[1]


def test_access_lines_and_log_lines_carry_the_spans_trace_id(
    spans: InMemorySpanExporter,
    server: Server,
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
    with caplog.at_level(logging.INFO, logger="tasknode.access"):
        stub.GetTaskNodeDetail(seed_request(), timeout=10)
        server.access.flush()
    call = one(list(spans.get_finished_spans()), GET_DETAIL)
    lines = [fields for r in caplog.records for _, _, fields in cast(Any, r.msg).entries()]
    assert [line["trace_id"] for line in lines] == [hex_trace(call)]

    tracer = traces.tracer()
    assert tracer is not None
    with tracer.start_as_current_span("outer") as outer:
        assert traces.current_trace_id() == traces.id_of(outer)
        assert json.loads(logging_line("inside"))["trace_id"] == traces.id_of(outer)
    assert json.loads(logging_line("outside"))["trace_id"] is None


def logging_line(message: str) -> str:
    from server.logs import JsonFormatter

    return JsonFormatter().format(
        logging.LogRecord("tasknode", logging.INFO, __file__, 1, message, (), None)
    )


TOKEN = "tok-7b1e0f6e9c2d4a58b3f1"
WRONG_SECRET = "wrong-secret-4f9a2c7d1e"


@pytest.fixture
def token(demo_config: Config) -> str:
    """TOKEN, a bk_token of user ops, in the demo database (before the server opens it)."""
    db = open_database(demo_config.database_url)
    with db.connection_context():
        AppStore(db).issue_token("ops", 3600, token=TOKEN)
    return TOKEN


def test_no_span_holds_a_secret_or_a_token(
    token: str, spans: InMemorySpanExporter, shim_url: str, channel: grpc.Channel
) -> None:
    secrets = (ALL_APP["bk_app_secret"], TOKEN, WRONG_SECRET)
    with_token = {"bk_app_code": ALL_APP["bk_app_code"], "bk_app_secret": ALL_APP["bk_app_secret"]}
    with_token["bk_token"] = TOKEN
    wrong = {**ALL_APP, "bk_app_secret": WRONG_SECRET}
    for credentials in (ALL_APP, with_token, wrong):
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel, credentials))
        try:
            stub.GetTaskNodeDetail(seed_request(), timeout=10)
        except grpc.RpcError as error:
            assert credentials is wrong, error
    with httpx.Client(base_url=shim_url, timeout=10) as http:
        for credentials in (ALL_APP, with_token, wrong):
            answer = http.get(ESB_V2, params={**SEED_PARAMS, **credentials})
            assert answer.json()["result"] is (credentials is not wrong), answer.text
            http.get(f"{ESB_V2}{credentials['bk_app_secret']}", params=credentials)
            http.post(ESB_V2, json={**SEED_PARAMS, **credentials})
            headers = {"x-bkapi-authorization": json.dumps(credentials)}
            http.get(ESB_V2, params=SEED_PARAMS, headers=headers)
    found = spans.get_finished_spans()
    assert len(found) > 20
    shown = json.dumps([json.loads(span.to_json()) for span in found])
    for secret in secrets:
        assert secret not in shown


def test_a_traceparent_reads_as_opentelemetrys_own_propagator_reads_it() -> None:
    assert traces.trace_id_of(TRACEPARENT) == TRACE_ID
    assert traces.trace_id_of(f"  {TRACEPARENT} ") == TRACE_ID
    assert traces.trace_id_of(f"01-{TRACE_ID}-{PARENT_ID}-01-more") == TRACE_ID
    for bad in (
        None,
        "",
        f"{TRACEPARENT}-more",  # version 00 has exactly four fields
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{'0' * 32}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
        "x" * 300,
    ):
        assert traces.trace_id_of(bad) is None, bad


HEX = "0123456789abcdef"
_parts = st.tuples(
    st.sampled_from(["00", "01", "cc", "ff", "0", "0g"]),
    st.one_of(st.text(HEX, min_size=32, max_size=32), st.just("0" * 32), st.text(HEX, max_size=33)),
    st.one_of(st.text(HEX, min_size=16, max_size=16), st.just("0" * 16), st.text(HEX, max_size=17)),
    st.sampled_from(["00", "01", "ff", "1", "zz"]),
    st.sampled_from(["", "-", "-x y", "-00", " ", "  \t"]),
    st.sampled_from(["", " ", "\t "]),
)
_traceparents = st.one_of(
    _parts.map(lambda p: f"{p[5]}{p[0]}-{p[1]}-{p[2]}-{p[3]}{p[4]}"),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
)


@settings(max_examples=400, deadline=None)
@given(_traceparents)
def test_any_traceparent_reads_as_the_propagator_reads_it(traceparent: str) -> None:
    extracted = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    theirs = None
    for value in extracted.values():
        context = cast(Span, value).get_span_context()
        theirs = format(context.trace_id, "032x")
    assert traces.trace_id_of(traceparent) == theirs


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.got = threading.Event()

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        self.got.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Each span sent, with its resource's attributes."""
        found: list[tuple[dict[str, Any], Any]] = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope.spans)
        return found


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    receiving = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiving, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiving, port
    server.stop(None)


def test_serve_exports_over_otlp_from_every_worker_process(
    tmp_path: Path, receiver: tuple[Receiver, int]
) -> None:
    receiving, port = receiver
    env = {
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'tasknode.db'}",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "",
        "TASKNODE_GRPC_PROCESSES": "2",
        "TASKNODE_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "tasknode-under-test",
    }
    process, found = start_server(
        ["serve", "--demo"], env, re.compile(r"serving \S+ on 127\.0\.0\.1:(\d+)")
    )
    assert process.stdout is not None
    try:
        sent = set()
        # One connection per call: the kernel spreads them over both workers.
        for index in range(12):
            trace_id = f"{index + 1:032x}"
            with grpc.insecure_channel(f"127.0.0.1:{found.group(1)}") as channel:
                stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
                parent = [("traceparent", f"00-{trace_id}-{PARENT_ID}-01")]
                stub.GetTaskNodeDetail(seed_request(), metadata=parent, timeout=10)
            sent.add(trace_id)
        process.send_signal(signal.SIGTERM)  # the workers export what they batched, then exit
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()
    exported = receiving.spans()
    calls = [(resource, span) for resource, span in exported if span.name == GET_DETAIL]
    assert {span.trace_id.hex() for _, span in calls} == sent
    assert {resource["service.name"] for resource, _ in exported} == {"tasknode-under-test"}
    assert any(span.name == "store node" for _, span in exported)


def test_a_trace_setting_it_does_not_know_stops_the_start() -> None:
    with pytest.raises(SystemExit, match="TASKNODE_TRACES_EXPORTER: 'jaeger' is not one of"):
        traces.configure(Config(traces_exporter="jaeger"))
    with pytest.raises(SystemExit, match=r"TASKNODE_TRACES_SAMPLE_RATIO: 1\.5 is not between"):
        traces.configure(Config(traces_sample_ratio=1.5))
    assert traces.tracer() is None


def test_sampling_off_records_only_what_callers_sampled(
    channel: grpc.Channel, shim_url: str
) -> None:
    exporter = InMemorySpanExporter()
    traces.configure(Config(traces_sample_ratio=0), exporter)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    params = {**SEED_PARAMS, **DEMO_APP}
    try:
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
        stub.GetTaskNodeDetail(seed_request(), timeout=10)
        stub.GetTaskNodeDetail(seed_request(), metadata=[("traceparent", unsampled)], timeout=10)
        with httpx.Client(base_url=shim_url, timeout=10) as http:
            fresh = http.get(ESB_V2, params=params).json()["trace_id"]
            passed = http.get(ESB_V2, params=params, headers={"traceparent": unsampled})
            assert exporter.get_finished_spans() == ()
            assert HEX32.fullmatch(fresh) and passed.json()["trace_id"] == TRACE_ID

            stub.GetTaskNodeDetail(
                seed_request(), metadata=[("traceparent", TRACEPARENT)], timeout=10
            )
            called = list(exporter.get_finished_spans())
            assert {hex_trace(s) for s in called} == {TRACE_ID}
            assert len(children_of(one(called, GET_DETAIL), called)) == len(called) - 1
            exporter.clear()
            http.get(ESB_V2, params=params, headers={"traceparent": TRACEPARENT})
        requested = list(exporter.get_finished_spans())
        assert {hex_trace(s) for s in requested} == {TRACE_ID}
        (call,) = children_of(one(requested, f"GET {ESB_V2}"), requested)
        assert children_of(call, requested)
    finally:
        traces.shutdown()
