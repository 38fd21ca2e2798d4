"""Building the gRPC server: services, interceptors, options, health and reflection."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from bksops.tasknode.v1 import task_node_pb2
from bksops.tasknode.v1 import task_node_pb2_grpc
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2  # noqa: F401  (lets reflection resolve error details)
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.access import AccessLog
from server.auth import Authenticator
from server.auth import StoredTokenVerifier
from server.cache import DetailCache
from server.config import Config
from server.db.apps import AppStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.store import Store
from server.handlers.task_node import TaskNodeServicer
from server.interceptors import SERVICE_PREFIX
from server.interceptors import AuthInterceptor
from server.interceptors import ServiceInterceptor
from server.nodes import Masker
from server.tls import server_credentials

log = logging.getLogger(__name__)

#: Calls grpc-core may hold before Python takes them in (its defaults: 1,000, then
#: cancelling at random up to 3,000). Far above any load we refuse cleanly, and low
#: enough to bound the memory they hold (a few KiB each).
PENDING_CALLS_LIMIT = 20_000

#: Threads serving health and reflection, apart from the service's.
CONTROL_THREADS = 4

SERVICE_NAME = task_node_pb2.DESCRIPTOR.services_by_name["TaskNodeService"].full_name


class CannotListen(OSError):
    """The gRPC address cannot be bound (in use, or not an address of this host)."""


@dataclass
class Server:
    """A built, not yet started, gRPC server and what it serves from."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    store: Store
    cache: DetailCache | None
    access: AccessLog
    workers: futures.ThreadPoolExecutor
    #: The service's handlers by method path, interceptors applied: what in-process
    #: callers (the shim in this process, server.gateway.local) call.
    handlers: dict[str, grpc.RpcMethodHandler]

    def start(self) -> None:
        self.grpc_server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within grace."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        # A call cut off at the end of grace still runs in its thread (threads cannot be
        # killed); the database must outlive it, or it would use a closed connection.
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.access.stop()
        self.store.close()


def create_server(config: Config, reuse_port: bool = False) -> Server:
    """Open the store (creating its schema if needed) and build the server on config.grpc_addr,
    over TLS when config has a certificate (TLSError if its files will not do)."""
    credentials = server_credentials(config)
    db = open_database(config.database_url, config.store_timeout_seconds)
    ensure_schema(db)
    store = Store(db, config.store_timeout_seconds)
    access = AccessLog()
    apps = AppStore(db, store)
    authenticator = Authenticator(apps, StoredTokenVerifier(apps), config.auth_cache_seconds)
    workers = futures.ThreadPoolExecutor(max_workers=config.grpc_workers, thread_name_prefix="grpc")
    # Health and reflection run here, never waiting behind calls stuck on the store.
    own_threads = futures.ThreadPoolExecutor(
        max_workers=CONTROL_THREADS, thread_name_prefix="grpc-control"
    )
    interceptors: list[grpc.ServerInterceptor] = [
        OnOwnThreads(own_threads),
        ServiceInterceptor(store, access),
        AuthInterceptor(authenticator),
    ]
    server = grpc.server(
        workers,
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_send_message_length", config.max_send_message_bytes),
            # Only workers share a port; a lone server must fail on a taken one.
            ("grpc.so_reuseport", int(reuse_port)),
            # grpc-core CANCELs calls beyond its queue limits before we see them; the
            # limit that counts is maximum_concurrent_rpcs, refused RESOURCE_EXHAUSTED.
            ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
            ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_LIMIT),
        ],
    )
    cache = DetailCache(config.reply_cache_mb * 1024 * 1024) if config.reply_cache_mb else None
    servicer = TaskNodeServicer(store, Masker(config.secret_keywords), cache)
    task_node_pb2_grpc.add_TaskNodeServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True, experimental_thread_pool=own_threads
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(config.grpc_addr)
        else:
            port = server.add_secure_port(config.grpc_addr, credentials)
    except RuntimeError:  # grpcio's word for a failed bind
        port = 0
    if port == 0:
        raise CannotListen(f"cannot listen on {config.grpc_addr}: is the address in use?")
    handlers = in_process_handlers(servicer, interceptors)
    return Server(server, port, health_servicer, store, cache, access, workers, handlers)


def method_path(method: MethodDescriptor) -> str:
    """The gRPC path of a method ("/package.Service/Method"), how calls name it."""
    return f"/{method.containing_service.full_name}/{method.name}"


def in_process_handlers(
    servicer: TaskNodeServicer, interceptors: list[grpc.ServerInterceptor]
) -> dict[str, grpc.RpcMethodHandler]:
    """TaskNodeService's unary handlers by method path, wrapped by interceptors as
    grpcio wraps them (the first outermost), taking and returning messages."""
    service = task_node_pb2.DESCRIPTOR.services_by_name["TaskNodeService"]
    handlers = {}
    for method in service.methods:
        path = method_path(method)
        plain: grpc.RpcMethodHandler = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name)
        )

        def innermost(details: grpc.HandlerCallDetails, plain: Any = plain) -> Any:
            return plain

        chain: Callable[[grpc.HandlerCallDetails], Any] = innermost
        for interceptor in reversed(interceptors):
            chain = partial(interceptor.intercept_service, chain)
        handlers[path] = chain(_CallDetails(path))
    return handlers


class _CallDetails(grpc.HandlerCallDetails):
    """What an interceptor learns of a call before it runs: its method (and no metadata,
    which the interceptors read from the call's context)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class OnOwnThreads(grpc.ServerInterceptor):
    """Runs every method but TaskNodeService's (health, reflection) on threads of its own,
    grpcio's experimental_thread_pool, so that they answer while every serving thread
    waits on the store. A method that chose its threads already (health's Watch) keeps
    them; each moved handler is built once."""

    def __init__(self, threads: futures.ThreadPoolExecutor) -> None:
        self.threads = threads
        self._moved: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(SERVICE_PREFIX):
            return handler
        known = self._moved.get(method)
        if known is None or known[0] is not handler:
            known = (handler, self._move(handler))
            self._moved[method] = known
        return known[1]

    def _move(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is None or hasattr(behaviour, "experimental_thread_pool"):
                continue
            moved = partial(behaviour)
            moved.experimental_thread_pool = self.threads  # type: ignore[attr-defined]
            return handler._replace(**{kind: moved})  # type: ignore[attr-defined]
        return handler
