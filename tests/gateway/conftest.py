"""Fixtures: the HTTP shim on a real socket, in front of the real gRPC server, and its client."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from server.app import Server
from server.app import create_server
from server.cli import load_demo_if_empty
from server.config import Config
from server.gateway.app import App
from server.gateway.client import Caller
from server.gateway.local import LocalBackend
from server.gateway.protocol import Limits
from server.gateway.runner import HttpServer
from server.traces import trace_id_of
from server.watch.service import serve_watch

#: The seed document's credentials: the demo database's app and token.
SEED_APP = {"bk_app_code": "esb_test", "bk_app_secret": "xxx", "bk_token": "xxx"}
#: A W3C traceparent, whose trace id is the trace_id of the answer: it keeps golden files
#: free of random ids.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
HEX32 = re.compile(r"[0-9a-f]{32}")


@contextmanager
def running_shim(
    config: Config, target: str | Caller, watch_target: str = ""
) -> Iterator[HttpServer]:
    """The shim on a free port of 127.0.0.1, calling gRPC at target (or through a Caller),
    and the watch streams at watch_target; stopped on exit."""
    app = App(config, target, watch_target=watch_target)
    http = HttpServer(app, "127.0.0.1:0", grace=1, limits=Limits.of(config))
    http.start()
    try:
        yield http
    finally:
        http.stop()


@pytest.fixture
def seed_app(server: Server) -> dict[str, str]:
    """SEED_APP: the demo app (esb_test, secret xxx, granted business 2) with its bk_token xxx."""
    return SEED_APP


@pytest.fixture(params=["channel", "in-process"])
def shim(
    request: pytest.FixtureRequest,
    demo_config: Config,
    server: Server,
    grpc_address: str,
    seed_app: dict[str, str],
) -> Iterator[str]:
    """The base URL of the shim in front of the demo server (which knows SEED_APP too),
    calling it over a gRPC channel (`make gateway`) or in-process (`make run`): every
    test of the shim holds for both."""
    target: str | Caller = grpc_address
    if request.param == "in-process":
        target = LocalBackend(server.handlers, server.workers)
    with running_shim(demo_config, target) as http:
        yield http.url


@pytest.fixture
def http(shim: str) -> Iterator[httpx.Client]:
    """An HTTP client of the shim, sending nothing it is not told to."""
    with httpx.Client(base_url=shim, timeout=10) as client:
        yield client


@pytest.fixture
def sqlite_shim(sqlite_config: Config) -> Iterator[str]:
    """The shim in front of a demo server on SQLite alone, for tests that are about HTTP only."""
    with demo_shim(sqlite_config) as http:
        yield http.url


@contextmanager
def demo_shim(config: Config) -> Iterator[HttpServer]:
    """The shim with config's limits in front of a demo server on config's database."""
    load_demo_if_empty(config)
    server = create_server(config)
    server.start()
    watch = serve_watch(dataclasses.replace(config, watch_addr="127.0.0.1:0"), server)
    assert watch is not None
    try:
        with running_shim(config, f"127.0.0.1:{server.port}", f"127.0.0.1:{watch.port}") as http:
            yield http
    finally:
        watch.stop(0)
        server.stop(None)


def exchange(response: httpx.Response) -> dict[str, Any]:
    """A request and its response as a golden file keeps them: random ids replaced.

    Checks on the way that every response carries its ids, in the headers and (legacy
    envelope) in the body, and that they agree.
    """
    request = response.request
    request_id = response.headers["x-bkapi-request-id"]
    trace_id = response.headers["sops-trace-id"]
    assert HEX32.fullmatch(request_id), request_id
    continued = trace_id_of(request.headers.get("traceparent"))
    assert trace_id == continued if continued else HEX32.fullmatch(trace_id), trace_id
    body = response.json()
    if isinstance(body, dict) and "request_id" in body:
        assert (body["request_id"], body["trace_id"]) == (request_id, trace_id)
        body["request_id"] = "<request_id>"
    sent: dict[str, Any] = {"method": request.method, "url": str(request.url.raw_path, "ascii")}
    if len(request.content) > 1000:
        sent["body"] = f"{request.content[:40]!r}... ({len(request.content)} bytes)"
    elif request.content:
        try:
            parsed = json.loads(request.content)
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")  # no half surrogate pairs
            sent["json"] = parsed
        except ValueError:
            sent["body"] = request.content.decode("utf-8", "replace")
    shown = {"x-bkapi-authorization", "traceparent", "content-type"}
    sent["headers"] = {k: v for k, v in request.headers.items() if k in shown}
    received = {
        k: v
        for k, v in response.headers.items()
        if k in {"content-type", "sops-trace-id", "allow", "www-authenticate"}
        or k.startswith("x-bkapi-error")
    }
    return {
        "request": sent,
        "response": {"status": response.status_code, "headers": received, "body": body},
    }


def without_live_times(value: Any) -> Any:
    """value, with the elapsed time of running nodes (it grows with the clock) replaced."""
    if isinstance(value, list):
        return [without_live_times(item) for item in value]
    if not isinstance(value, dict):
        return value
    running = value.get("state") in ("RUNNING", "NODE_STATE_RUNNING")
    return {
        key: "<grows while running>"
        if running and key in ("elapsed_time", "elapsedSeconds")
        else without_live_times(item)
        for key, item in value.items()
    }
