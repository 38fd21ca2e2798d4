"""Building the gRPC server: services, interceptors, options, health and reflection."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from typing import Any
from typing import NoReturn

import grpc
from bksops.tasknode.v1 import task_node_pb2
from bksops.tasknode.v1 import task_node_pb2_grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2  # noqa: F401  (lets reflection resolve error details)
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import traces
from server.access import AccessLog
from server.auth import Authenticator
from server.auth import StoredTokenVerifier
from server.cache import DetailCache
from server.config import Config
from server.db.apps import AppStore
from server.db.bksops import BksopsStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.connection import open_read_only
from server.db.connection import open_replicas
from server.db.connection import reopen
from server.db.store import Store
from server.draining import CountingExecutor
from server.draining import Gate
from server.handlers.task_node import TaskNodeServicer
from server.interceptors import SERVICE_PREFIX
from server.interceptors import AuthInterceptor
from server.interceptors import HandlerRewriter
from server.interceptors import ServiceInterceptor
from server.nodes import Masker
from server.throttle import FailureBudget
from server.throttle import HashSlots
from server.tls import server_credentials

log = logging.getLogger(__name__)

#: Calls grpc-core may hold before Python takes them in (its defaults: 1,000, then
#: cancelling at random up to 3,000). Far above any load we refuse cleanly, and low
#: enough to bound the memory they hold (a few KiB each).
PENDING_CALLS_LIMIT = 20_000

#: Threads serving health and reflection, apart from the service's.
CONTROL_THREADS = 4

SERVICE_NAME = task_node_pb2.DESCRIPTOR.services_by_name["TaskNodeService"].full_name
#: The logger grpcio's core bindings write to, before any of our code sees a call.
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
#: What grpcio logs (at ERROR, with a traceback) for bytes it cannot decode as UTF-8.
_UNDECODABLE = "Invalid encoding on %s"


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
    workers: CountingExecutor
    gate: Gate
    #: The service's handlers by method path, interceptors applied: what in-process
    #: callers (the shim in this process, server.gateway.local) call.
    handlers: dict[str, grpc.RpcMethodHandler]
    #: Who calls: the watch streams check their callers again with it while they last.
    authenticator: Authenticator
    #: The service's servicer (its watch_addr is set once the watch server has a port).
    servicer: TaskNodeServicer

    def start(self) -> None:
        self.grpc_server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace: float, *alongside: Callable[[], None]) -> bool:
        """At once: health says NOT_SERVING and calls taken in from now on are refused
        UNAVAILABLE (server.draining). Meanwhile each of alongside (the shim's own stop)
        runs on a thread of its own. Wait, at most grace seconds, until alongside has
        returned and every call taken in before has finished; True if all did."""
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        self.gate.close()
        threads = [threading.Thread(target=stop, name="drain") for stop in alongside]
        for thread in threads:
            thread.start()
        for thread in threads:  # first: the shim's requests use our worker threads
            thread.join(max(0.0, deadline - time.monotonic()))
        drained = self.workers.wait_idle(deadline) and not any(t.is_alive() for t in threads)
        log.info(
            "drained %s; %d calls refused meanwhile",
            "every call" if drained else "what finished within the grace",
            self.gate.refused,
        )
        return drained

    def stop(self, grace: float | None) -> None:
        """Drain (see drain) for up to grace (None: none), then stop grpc-core, cutting
        what still runs, and release the store."""
        deadline = time.monotonic() + (grace or 0)
        self.drain(grace or 0)
        self.grpc_server.stop(max(0.0, deadline - time.monotonic()) if grace else None).wait()
        # A call cut off at the end of grace still runs in its thread (threads cannot be
        # killed); the database must outlive it, or it would use a closed connection.
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.access.stop()
        self.store.close()
        self.authenticator.apps.close()

    def drain_and_exit(self, grace: float, *alongside: Callable[[], None]) -> NoReturn:
        """What a serving process does on SIGTERM: drain (see drain), then end the process.

        grpc-core is not stopped: its shutdown would answer CANCELLED to calls still
        arriving (callers that have not yet seen a refusal). The process ends instead,
        the kernel closes the connections, and those callers see UNAVAILABLE. A call
        cut off at the end of the grace ends with the process.
        """
        drained = self.drain(grace, *alongside)
        self.access.stop()
        traces.shutdown()  # export the spans still batched: os._exit runs no atexit hook
        if drained:
            self.store.close()
            self.authenticator.apps.close()
        log.info("stopped")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class WithheldBytes(logging.Filter):
    """Keeps what callers send out of grpcio's log.

    grpcio logs a metadata value that is not UTF-8 whole, at ERROR with a traceback,
    before any of our code sees the call, and that value may hold an app secret. Its
    record is rewritten to one line that says what happened without the value (the
    call goes on, and server.auth refuses such credentials); bytes in any other
    record of grpcio's core are replaced by their length.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if not any(isinstance(arg, bytes) for arg in args):
            return True
        if record.msg == _UNDECODABLE:
            record.msg = "grpcio received a value that is not UTF-8: %s, withheld from the log"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        record.args = tuple(
            f"<{len(arg)} bytes>" if isinstance(arg, bytes) else arg for arg in args
        )
        return True


def withhold_received_bytes() -> None:
    """Install WithheldBytes on grpcio's core logger, once per process."""
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, WithheldBytes) for f in logger.filters):
        logger.addFilter(WithheldBytes())


def create_server(config: Config, reuse_port: bool = False) -> Server:
    """Open the store (creating its schema if needed) and build the server on config.grpc_addr,
    over TLS when config has a certificate (TLSError if its files will not do)."""
    withhold_received_bytes()
    credentials = server_credentials(config)
    timeout = config.store_timeout_seconds
    db = open_database(config.database_url, timeout)
    ensure_schema(db)
    replicas = open_replicas(db, config.database_replicas, timeout)
    # With replicas, credentials are read from the primary in sessions of their own
    # (AppStore), and the store reads the primary, its last resort, on a pool of its own.
    native = Store(reopen(db, timeout), timeout, replicas) if replicas else Store(db, timeout)
    store: Store = native
    if config.bksops_database_url:
        engine_db = open_read_only(config.bksops_database_url, timeout)
        engine_replicas = open_replicas(engine_db, config.bksops_database_replicas, timeout)
        trees = config.bksops_tree_cache_mb * 1024 * 1024
        store = BksopsStore(
            engine_db,
            native,
            timeout,
            engine_replicas,
            trees,
            config.bksops_catalog_refresh_seconds,
        )
    access = AccessLog()
    apps = AppStore(db, Store(db, timeout), native) if replicas else AppStore(db, native)
    authenticator = Authenticator(
        apps,
        StoredTokenVerifier(apps),
        config.auth_cache_seconds,
        HashSlots(config.auth_hash_slots, config.auth_hash_wait_seconds),
        FailureBudget(config.auth_failures_per_minute),
    )
    workers = CountingExecutor(max_workers=config.grpc_workers, thread_name_prefix="grpc")
    gate = Gate()
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
        # The gate decides on gRPC calls only; the shim's requests are admitted by HTTP.
        interceptors=[gate, *interceptors],
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
    gate.count_refusals_of(server)
    cache = DetailCache(config.reply_cache_mb * 1024 * 1024) if config.reply_cache_mb else None
    servicer = TaskNodeServicer(store, Masker(config.secret_keywords), cache, config.watch_listen())
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
    return Server(
        server,
        port,
        health_servicer,
        store,
        cache,
        access,
        workers,
        gate,
        handlers,
        authenticator,
        servicer,
    )


def method_path(method: MethodDescriptor) -> str:
    """The gRPC path of a method ("/package.Service/Method"), how calls name it."""
    return f"/{method.containing_service.full_name}/{method.name}"


def in_process_handlers(
    servicer: TaskNodeServicer, interceptors: list[grpc.ServerInterceptor]
) -> dict[str, grpc.RpcMethodHandler]:
    """TaskNodeService's unary handlers by method path, wrapped by interceptors as
    grpcio wraps them (the first outermost), taking a message (or its bytes) and
    returning a message; for a streaming method, the unary handler that opens it."""
    service = task_node_pb2.DESCRIPTOR.services_by_name["TaskNodeService"]
    handlers = {}
    for method in service.methods:
        path = method_path(method)
        # A stream's handler here is what opening it reads (server.watch.service).
        name = f"open_{_snake(method.name)}" if method.server_streaming else method.name
        plain: grpc.RpcMethodHandler = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
        )

        def innermost(details: grpc.HandlerCallDetails, plain: Any = plain) -> Any:
            return plain

        chain: Callable[[grpc.HandlerCallDetails], Any] = innermost
        for interceptor in reversed(interceptors):
            chain = partial(interceptor.intercept_service, chain)
        handlers[path] = chain(_CallDetails(path))
    return handlers


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class _CallDetails(grpc.HandlerCallDetails):
    """What an interceptor learns of a call before it runs: its method (and no metadata,
    which the interceptors read from the call's context)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class OnOwnThreads(HandlerRewriter):
    """Runs every method but TaskNodeService's (health, reflection) on threads of its own,
    grpcio's experimental_thread_pool, so that they answer while every serving thread
    waits on the store. A method that chose its threads already (health's Watch) keeps
    them; each moved handler is built once."""

    def __init__(self, threads: futures.ThreadPoolExecutor) -> None:
        super().__init__()
        self.threads = threads

    def _picks(self, handler: grpc.RpcMethodHandler, method: str) -> bool:
        return not method.startswith(SERVICE_PREFIX)

    def _rewrite(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is None or hasattr(behaviour, "experimental_thread_pool"):
                continue
            moved = partial(behaviour)
            moved.experimental_thread_pool = self.threads  # type: ignore[attr-defined]
            return handler._replace(**{kind: moved})  # type: ignore[attr-defined]
        return handler
