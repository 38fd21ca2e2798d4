"""Draining a server: refusing calls that come after SIGTERM, and knowing when the rest are done.

grpcio's own graceful stop (grpc.Server.stop(grace)) shuts grpc-core down at once:
core then cancels every call it has taken off the wire but not yet handed to
Python, and every call that reaches it afterwards, so callers see CANCELLED, a
code they must not retry. Draining therefore happens in front of it: the Gate
refuses the service's calls taken in after drain began with UNAVAILABLE (which
callers retry elsewhere), calls taken in before run on, and the CountingExecutor
says when the server's threads hold no more work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from server import errors
from server import metrics
from server.interceptors import SERVICE_PREFIX
from server.interceptors import to_status

#: How often wait_idle looks at the work in flight.
POLL_SECONDS = 0.01
#: The refusal reason of calls beyond grpcio's maximum_concurrent_rpcs (which grpcio
#: answers RESOURCE_EXHAUSTED with no ErrorInfo, hence no reason of server.errors).
CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"
log = logging.getLogger(__name__)


def _never() -> bool:
    return False


class CountingExecutor(futures.ThreadPoolExecutor):
    """A thread pool that knows whether it holds work (queued or running)."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._in_flight = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._lock:
            self._in_flight += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, future: futures.Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1

    def in_flight(self) -> int:
        """Work submitted and not finished."""
        return self._in_flight

    def wait_idle(self, deadline: float) -> bool:
        """Wait until no work is queued or running, or until deadline (time.monotonic());
        True if idle."""
        while self.in_flight() > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True


class Gate(grpc.ServerInterceptor):
    """Outermost interceptor: once closed, the service's calls taken in get UNAVAILABLE.

    grpcio asks interceptors for a call's handler on the thread that takes calls in,
    before it queues the call for a worker thread, so whether a call was taken in
    before or after close() is decided here, once. Health and reflection pass, so
    that health can say NOT_SERVING while the server drains.
    """

    def __init__(self) -> None:
        self._closed = threading.Event()
        self.refused = 0
        self._refusal: grpc.RpcMethodHandler = grpc.unary_unary_rpc_method_handler(self._refuse)
        self._beyond_limit: Callable[[], bool] = _never

    def close(self) -> None:
        self._closed.set()

    def count_refusals_of(self, server: grpc.Server) -> None:
        """Count (tasknode_refused_calls_total, CONCURRENCY_LIMIT) the calls server's own
        maximum_concurrent_rpcs refuses. grpcio refuses them after asking the interceptors
        for the handler, without telling them; it decides under a lock it holds while it
        asks, on a count that cannot change meanwhile, so the Gate reads the same count
        and comes to the same decision. The count is grpcio's private state: if a grpcio
        release no longer has it, these refusals go uncounted (and are logged once here)."""
        state: Any = getattr(server, "_state", None)
        if not hasattr(state, "active_rpc_count") or not hasattr(state, "maximum_concurrent_rpcs"):
            log.warning("this grpcio does not show its call count: its refusals go uncounted")
            return
        if state.maximum_concurrent_rpcs is not None:
            self._beyond_limit = lambda: state.active_rpc_count >= state.maximum_concurrent_rpcs

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        ours = handler_call_details.method.startswith(SERVICE_PREFIX)
        if self._closed.is_set() and ours:
            self.refused += 1  # only grpcio's one take-in thread counts
            metrics.refused(errors.ShuttingDown.reason)
            return self._refusal
        if ours and self._beyond_limit():
            metrics.refused(CONCURRENCY_LIMIT)
        return continuation(handler_call_details)

    @staticmethod
    def _refuse(request: bytes, context: grpc.ServicerContext) -> None:
        context.abort_with_status(
            to_status(errors.ShuttingDown("the server is shutting down; retry another server"))
        )
