"""The watch streams' server: WatchTaskNode and WatchTask on a grpc.aio server.

grpcio's sync server holds a thread for every open stream, so 10,000 idle streams
would need 10,000 threads. The streams are therefore served by a grpc.aio server of
their own (config.watch_listen()), on one event loop thread per process: an idle stream
is a coroutine waiting on its Mailbox (server.watch.hub), a few KiB. The unary RPCs
stay on the sync server, unchanged, and this server refuses them (UNIMPLEMENTED).

Opening a stream is exactly a unary call: the same interceptors (credentials, store
session, error statuses, access log, metrics) run the servicer's open_* method on the
sync server's worker threads (server.app.in_process_handlers), so a stream gets the
request fields, auth and errors GetTaskNodeDetail has. Afterwards the stream only
waits on its mailbox, and writes what the Hub put there, or a heartbeat.

A stream's caller is checked again every config.auth_cache_seconds while it lasts (one
check for all the streams opened with the same credentials for the same business), so
a revoked app, a rotated secret or a withdrawn grant ends its streams (UNAUTHENTICATED,
PERMISSION_DENIED) within twice that time, as it refuses its unary calls within once.

Bounds: config.watch_max_streams streams per process (RESOURCE_EXHAUSTED beyond);
one pending message per stream whatever its reader does (hub.Mailbox); on drain every
stream ends UNAVAILABLE (SHUTTING_DOWN) with its last resume token in the ErrorInfo,
to resume on another process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2
from grpc_reflection.v1alpha import reflection

from server import errors
from server import metrics
from server.app import PENDING_CALLS_LIMIT
from server.app import SERVICE_NAME
from server.app import CannotListen
from server.app import Server
from server.config import Config
from server.gateway.local import STATUS_DETAILS_KEY
from server.gateway.local import Aborted
from server.gateway.local import LocalContext
from server.interceptors import rich_status
from server.listing import summary
from server.nodes import Masker
from server.nodes import authorize
from server.tls import server_credentials
from server.watch import tokens
from server.watch.hub import Hub
from server.watch.hub import Mailbox

log = logging.getLogger(__name__)
_SERVICE = pb.DESCRIPTOR.services_by_name["TaskNodeService"]
OPEN_NODE = f"/{_SERVICE.full_name}/WatchTaskNode"
OPEN_TASK = f"/{_SERVICE.full_name}/WatchTask"
#: Seconds an opening read may take when the stream has no deadline.
OPEN_SECONDS = 30.0
#: The collector's youngest-generation threshold in a process that serves watch streams
#: (Python's default is 700): see WatchServer.start.
GC_YOUNG = 50_000


@dataclass(frozen=True)
class Grant:
    """What a stream's caller was let in with: checked again while the stream lasts."""

    #: The call's text metadata, credentials included: never shown (repr=False).
    metadata: tuple[tuple[str, str], ...] = field(repr=False)
    peer: str
    biz_id: int
    by_project_id: bool


#: Errors that mean the caller may no longer watch; any other failure of a check
#: (the store down, checks throttled) leaves the streams open until the next one.
_REFUSALS = (errors.Unauthenticated, errors.PermissionDenied)


class WatchServicer:
    """The two streaming methods; see the module docstring."""

    def __init__(self, server: Server, config: Config, hub: Hub) -> None:
        self.handlers = server.handlers
        self.executor: futures.Executor = server.workers
        self.store = server.store
        self.authenticator = server.authenticator
        self.recheck_seconds = config.auth_cache_seconds
        self.grants: dict[Mailbox, Grant] = {}
        self.hub = hub
        self.limit = config.watch_max_streams
        self.heartbeat = config.watch_heartbeat_seconds
        self.open = 0
        self.draining = asyncio.Event()
        self.mailboxes: set[Mailbox] = set()

    async def WatchTaskNode(
        self, request: pb.WatchTaskNodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTaskNodeResponse | bytes]:
        await self._admit(context)
        with metrics.watch_stream("WatchTaskNode"), self._counted():
            query, detail = await self._opened(OPEN_NODE, request, context)
            scope = tokens.scope_of("node", query)
            mailbox = Mailbox(scope)
            self.grants[mailbox] = _grant(context, query.biz_id, query.by_project_id)
            etag = ""
            if request.resume_token:
                etag = await _checked(context, tokens.read_node_token, request.resume_token, scope)
            if detail.etag != etag:
                mailbox.put_detail(detail, tokens.node_token(scope, detail.etag))
            else:
                mailbox.token = request.resume_token
            self.hub.watch_node(query, mailbox, detail.etag)
            try:
                async for _ in self._waiting(mailbox, context):
                    if mailbox.detail is not None:
                        shown, wire = mailbox.detail, mailbox.wire
                        mailbox.detail = mailbox.wire = None
                        yield wire or pb.WatchTaskNodeResponse(
                            detail=shown, resume_token=mailbox.token
                        )
                    else:
                        yield pb.WatchTaskNodeResponse(
                            heartbeat_time=_now(), resume_token=mailbox.token
                        )
            finally:
                self._leave(query.task_id, mailbox)

    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTaskResponse]:
        await self._admit(context)
        with metrics.watch_stream("WatchTask"), self._counted():
            opened = await self._opened(OPEN_TASK, request, context)
            task_id = opened.task_id
            scope = tokens.scope_of("task", task_id)
            seen: frozenset[bytes] = frozenset()
            if request.resume_token:
                seen = await _checked(context, tokens.read_task_token, request.resume_token, scope)
            mailbox = Mailbox(scope)
            self.grants[mailbox] = _grant(context, opened.biz_id, opened.by_project_id)
            mailbox.token = request.resume_token
            self.hub.watch_task(task_id, mailbox, seen)
            try:
                async for _ in self._waiting(mailbox, context):
                    if mailbox.nodes:
                        rows, mailbox.nodes = list(mailbox.nodes.values()), {}
                        yield pb.WatchTaskResponse(
                            nodes=[summary(row) for row in rows], resume_token=mailbox.token
                        )
                    else:
                        yield pb.WatchTaskResponse(
                            heartbeat_time=_now(), resume_token=mailbox.token
                        )
            finally:
                self._leave(task_id, mailbox)

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining.is_set():
            await _abort(context, errors.ShuttingDown("the server is shutting down; retry another"))
        if self.open >= self.limit:
            metrics.refused(errors.TooManyStreams.reason)
            await _abort(
                context,
                errors.TooManyStreams(
                    f"this server process has {self.limit} watch streams open; retry later",
                    {"limit": str(self.limit)},
                ),
            )

    @contextmanager
    def _counted(self) -> Iterator[None]:
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1

    def _leave(self, task_id: int, mailbox: Mailbox) -> None:
        self.mailboxes.discard(mailbox)
        self.grants.pop(mailbox, None)
        self.hub.forget(task_id, mailbox)

    async def _opened(self, path: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """What the open_* handler returns, run as a unary call of path would be."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + (OPEN_SECONDS if remaining is None else remaining)
        local = LocalContext(_text_metadata(context), deadline, context.peer())
        behaviour: Any = self.handlers[path].unary_unary
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, behaviour, request, local)
        except Aborted as exc:
            await _abort_status(context, exc.status)

    async def _waiting(
        self, mailbox: Mailbox, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Once per message to write: a pending one, or a heartbeat when none came for
        a heartbeat interval; ends the call with the error the hub or a drain put."""
        self.mailboxes.add(mailbox)
        while True:
            if self.draining.is_set():
                await _abort(
                    context,
                    errors.ShuttingDown(
                        "the server is shutting down; resume on another with resume_token",
                        {"resumeToken": mailbox.token},
                    ),
                )
            if mailbox.error is not None:
                await _abort(context, mailbox.error)
            if mailbox.pending() or mailbox.beat:
                mailbox.beat = False
                mailbox.written = time.monotonic()
                yield None
                continue
            mailbox.event.clear()
            await mailbox.event.wait()

    async def beat(self) -> None:
        """Ask each stream quiet for a heartbeat interval for a heartbeat: one timer for
        every stream, so that writing a message sets and cancels no timer of its own."""
        period = min(1.0, self.heartbeat / 4)
        while True:
            await asyncio.sleep(period)
            quiet = time.monotonic() - self.heartbeat
            for mailbox in self.mailboxes:
                if mailbox.written <= quiet and not mailbox.beat:
                    mailbox.beat = True
                    mailbox.event.set()

    async def recheck(self) -> None:
        """Every recheck_seconds, check each distinct grant of the open streams again
        (on a worker thread: a check may read the store) and end the streams of those
        refused with the refusal."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.recheck_seconds)
            streams: dict[Grant, list[Mailbox]] = {}
            for mailbox, grant in self.grants.items():
                streams.setdefault(grant, []).append(mailbox)
            if not streams:
                continue
            refused = await loop.run_in_executor(self.executor, self._refusals, list(streams))
            for grant, refusal in refused.items():
                for mailbox in streams[grant]:
                    mailbox.put_error(refusal)

    def _refusals(self, grants: list[Grant]) -> dict[Grant, errors.ServiceError]:
        """The grants no longer good, each with why: what a unary call with the same
        credentials for the same business would be refused with now."""
        refused: dict[Grant, errors.ServiceError] = {}
        for grant in grants:
            try:
                with self.store.session(time.monotonic() + OPEN_SECONDS):
                    principal = self.authenticator.authenticate(grant.metadata, grant.peer)
                    authorize(self.store, grant.biz_id, grant.by_project_id, principal)
            except _REFUSALS as exc:
                refused[grant] = type(exc)(exc.message, exc.metadata)
            except errors.ServiceError as exc:
                log.warning("watch streams' caller check: %s; trying again later", exc.message)
        return refused

    def drain(self) -> None:
        """End every stream (see _waiting) and refuse new ones; on the loop's thread."""
        self.draining.set()
        for mailbox in list(self.mailboxes):
            mailbox.event.set()


def _text_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """A call's metadata as credentials are read from it: binary (-bin) values are no
    credentials, so only text ones are handed on."""
    return tuple(
        (key, value) for key, value in context.invocation_metadata() or () if isinstance(value, str)
    )


def _grant(context: grpc.aio.ServicerContext, biz_id: int, by_project_id: bool) -> Grant:
    return Grant(_text_metadata(context), context.peer(), biz_id, by_project_id)


async def _checked(context: grpc.aio.ServicerContext, read: Any, token: str, scope: str) -> Any:
    """What read makes of a resume token; the call ends INVALID_ARGUMENT if it is bad."""
    try:
        return read(token, scope)
    except errors.ServiceError as exc:
        await _abort(context, exc)


async def _abort(context: grpc.aio.ServicerContext, exc: errors.ServiceError) -> None:
    await _abort_status(context, rich_status(exc))


async def _abort_status(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    await context.abort(
        grpc.StatusCode(_CODES[status.code]),
        status.message,
        trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
    )


_CODES = {code.value[0]: code.value for code in grpc.StatusCode}


def _wire(message: bytes | Message) -> bytes:
    """A message's bytes; a message the Hub serialized once for all its streams is bytes."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _now() -> Timestamp:
    now = Timestamp()
    now.GetCurrentTime()
    return now


class WatchServer:
    """The grpc.aio server of the watch streams and its Hub, on a thread and loop of their own."""

    def __init__(self, config: Config, server: Server, reuse_port: bool = False) -> None:
        self.config = config
        self.server = server
        self.reuse_port = reuse_port
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, name="watch", daemon=True)
        self.hub = Hub(
            server.store,
            Masker(config.secret_keywords),
            server.cache,
            config.watch_interval,
            self.loop,
        )
        self.servicer = WatchServicer(server, config, self.hub)
        self._aio: grpc.aio.Server | None = None
        #: The servicer's timers for every stream: heartbeats and caller checks.
        self._chores: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Serve, and make the cyclic garbage collector run less often in this process:
        with 10^4 streams open, each a few long-lived coroutines and futures, every
        collection of the older generations walks all of them, and at Python's default
        threshold that was a tenth of the process's time while changes fanned out (the
        server's CPU a message delivered fell from ~116 to ~70 µs in bench.watch's
        one-node step at 10^4 streams). Memory freed by reference counting, which is
        nearly all, is unaffected."""
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        self._thread.start()
        self.port = self._call(self._start())
        self.hub.start()

    async def _start(self) -> int:
        aio = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", int(self.reuse_port)),
                ("grpc.max_send_message_length", self.config.max_send_message_bytes),
                ("grpc.max_receive_message_length", self.config.max_receive_message_bytes),
                # grpc-core CANCELs calls beyond 1,000 waiting to be taken in (at random up
                # to 3,000): thousands of streams opening at once would lose some so.
                ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
                ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_LIMIT),
            ]
        )
        streams: dict[str, grpc.RpcMethodHandler] = {
            "WatchTaskNode": grpc.unary_stream_rpc_method_handler(
                self.servicer.WatchTaskNode,
                request_deserializer=pb.WatchTaskNodeRequest.FromString,
                response_serializer=_wire,
            ),
            "WatchTask": grpc.unary_stream_rpc_method_handler(
                self.servicer.WatchTask,
                request_deserializer=pb.WatchTaskRequest.FromString,
                response_serializer=_wire,
            ),
        }
        # Only the streams: the unary methods are the sync server's (UNIMPLEMENTED here).
        aio.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, streams),))
        # grpcurl finds the streams' messages here too, with no .proto at hand.
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), aio)
        credentials = server_credentials(self.config)
        try:
            if credentials is None:
                port = aio.add_insecure_port(self.config.watch_listen())
            else:
                port = aio.add_secure_port(self.config.watch_listen(), credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise CannotListen(f"cannot listen on {self.config.watch_listen()}: is it in use?")
        await aio.start()
        self._aio = aio
        loop = asyncio.get_running_loop()
        self._chores = [
            loop.create_task(self.servicer.beat()),
            loop.create_task(self.servicer.recheck()),
        ]
        return port

    def stop(self, grace: float | None = None) -> None:
        """End every stream with a status to resume from, then stop the server."""
        aio, self._aio = self._aio, None
        if aio is None:  # stopped already
            return
        self._call(self._stop(aio, self.config.shutdown_grace_seconds if grace is None else grace))
        self.hub.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()

    async def _stop(self, aio: grpc.aio.Server, grace: float) -> None:
        self.servicer.drain()
        await aio.stop(grace)
        for chore in self._chores:
            chore.cancel()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


def serve_watch(config: Config, server: Server, reuse_port: bool = False) -> WatchServer | None:
    """The watch server on config.watch_listen() beside server, started; None if off."""
    if not config.watch_listen():
        return None
    watch = WatchServer(config, server, reuse_port)
    watch.start()
    # The unary server's WATCH_ON_WATCH_ADDR names the address taken, not a port 0 asked for.
    server.servicer.watch_addr = f"{config.watch_listen().rsplit(':', 1)[0]}:{watch.port}"
    return watch
