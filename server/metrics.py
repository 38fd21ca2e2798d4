"""Prometheus metrics: every metric the service exports is defined here, and served here.

The code that records a metric does so where it already keeps the fact: the service
interceptor (each call's code and time, beside its access line), the shim's ASGI app
(each request's route and status), the store's one read path, the two caches and the
refusals. A hot path records into label children it looked up once (``labels()``
costs a lock and a dict lookup per call).

A server with several worker processes (server.workers) uses prometheus_client's
multiprocess mode: the parent makes a new, empty directory for the run and names it
in PROMETHEUS_MULTIPROC_DIR before it starts a worker, each worker (a fresh
interpreter, so the variable is set before prometheus_client loads) writes its values
to files of its own there, and the parent serves the sum of every file on
``/metrics``. Counters of a worker that died stay in the sum; its gauges are dropped
(mark_process_dead), and the worker started in its place writes files of its own.
With one process, that process serves its own values.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Generic
from typing import TypeVar

import grpc
from prometheus_client import REGISTRY
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import multiprocess
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

M = TypeVar("M", Counter, Histogram)

#: What prometheus_client reads, when it loads, to write values to files (multiprocess mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Latency buckets in seconds: a cached reply takes ~0.3 ms, a cold one a few ms, a
#: credential check's scrypt ~50 ms, a call at its deadline seconds.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: A store query is usually well under a millisecond.
QUERY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)

GRPC_HANDLED = Counter(
    "tasknode_grpc_server_handled_total",
    "Calls of the service finished, by method and gRPC status code (calls the HTTP shim "
    "makes in-process included).",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "tasknode_grpc_server_handling_seconds",
    "Time serving a call of the service, from its handler's start to its answer.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge(
    "tasknode_grpc_server_calls_in_flight",
    "Calls of the service being served now.",
    ["grpc_service", "grpc_method"],
    multiprocess_mode="livesum",
)
HTTP_REQUESTS = Counter(
    "tasknode_http_requests_total",
    "HTTP requests answered by the shim, by method, route template and HTTP status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "tasknode_http_request_duration_seconds",
    "Time answering an HTTP request, from its head read to its answer sent.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "tasknode_http_requests_in_flight",
    "HTTP requests being answered now.",
    multiprocess_mode="livesum",
)
REFUSED = Counter(
    "tasknode_refused_calls_total",
    "Calls refused before they were served, by reason: overload (OVERLOADED, "
    "CONCURRENCY_LIMIT), shutdown (SHUTTING_DOWN) and authentication (the error's reason, "
    "CREDENTIAL_CHECKS_THROTTLED included).",
    ["reason"],
)
REPLY_CACHE_HITS = Counter(
    "tasknode_reply_cache_hits_total", "Replies served from the reply cache (server.cache)."
)
REPLY_CACHE_MISSES = Counter(
    "tasknode_reply_cache_misses_total",
    "Reply cache lookups that found no entry, or one built from an older stamp.",
)
CREDENTIAL_CACHE_HITS = Counter(
    "tasknode_credential_cache_hits_total",
    "Credential checks answered from the authenticator's cache (server.auth).",
)
CREDENTIAL_CACHE_MISSES = Counter(
    "tasknode_credential_cache_misses_total",
    "Credential checks that had to verify the credentials (absent, expired or lapsed entry).",
)
STORE_SECONDS = Histogram(
    "tasknode_store_query_duration_seconds",
    "Time of each store read, by query (its count is the number of queries run).",
    ["query"],
    buckets=QUERY_BUCKETS,
)
STORE_FAILURES = Counter(
    "tasknode_store_query_failures_total",
    "Store reads that failed (the database unreachable or refusing), by query.",
    ["query"],
)
SHARED_READS = Counter(
    "tasknode_store_shared_reads_total",
    "Store reads a call took from a statement another call ran for both, begun after it "
    "asked (server.db.coalescing), by query: statements saved.",
    ["query"],
)
WATCH_STREAMS = Gauge(
    "tasknode_watch_streams_open",
    "Watch streams (WatchTaskNode, WatchTask) open now, by method.",
    ["grpc_method"],
    multiprocess_mode="livesum",
)
STORE_CONNECTIONS = Gauge(
    "tasknode_store_connections_in_use",
    "Database connections held by calls now (checked out of the pool).",
    multiprocess_mode="livesum",
)


class _Children(Generic[M]):
    """A labelled metric's children by label values, looked up once each."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class MethodMetrics:
    """One gRPC method's metric children, looked up once: what a call records."""

    def __init__(self, method: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._labels = (service, name)
        self.seconds = GRPC_SECONDS.labels(service, name)
        self.in_flight = GRPC_IN_FLIGHT.labels(service, name)

    def handled(self, code: str) -> Counter:
        """The counter of this method's calls that ended with code (a StatusCode name)."""
        return _grpc_handled(*self._labels, code)


_grpc_handled = _Children(GRPC_HANDLED)
_http_requests = _Children(HTTP_REQUESTS)
_http_seconds = _Children(HTTP_SECONDS)
_store_seconds = _Children(STORE_SECONDS)
_store_failures = _Children(STORE_FAILURES)
_refused = _Children(REFUSED)
_shared_reads = _Children(SHARED_READS)


def http_answered(method: str, route: str, status: int, seconds: float) -> None:
    """Record one HTTP request answered on route (its template; "none" if none matched)."""
    _http_requests(method, route, str(status)).inc()
    _http_seconds(method, route).observe(seconds)


@contextmanager
def watch_stream(method: str) -> Iterator[None]:
    """Count a watch stream of method as open while inside."""
    gauge = WATCH_STREAMS.labels(method)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def store_read(query: str, seconds: float) -> None:
    """Record one store read of the named query."""
    _store_seconds(query).observe(seconds)


def store_failed(query: str) -> None:
    """Record one store read of the named query that failed."""
    _store_failures(query).inc()


def shared_read(query: str) -> None:
    """Record one read of the named query a call took from another call's statement."""
    _shared_reads(query).inc()


def refused(reason: str) -> None:
    """Record one call refused for reason (an ErrorInfo reason)."""
    _refused(reason).inc()


class BuildInfo(Collector):
    """tasknode_build_info: 1, labelled with the versions that serve (one sample whatever
    the number of processes, which all run the same code)."""

    def __init__(self) -> None:
        self.labels = {
            "version": _version(),
            "python_version": platform.python_version(),
            "grpcio_version": grpc.__version__,
        }

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "tasknode_build_info",
            "The service's version and the Python and grpcio versions it runs on.",
            labels=list(self.labels),
        )
        family.add_metric(list(self.labels.values()), 1)
        yield family


def _version() -> str:
    try:
        return metadata.version("tasknode")
    except metadata.PackageNotFoundError:
        return "unknown"


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A new, empty directory for this run's worker values, named in PROMETHEUS_MULTIPROC_DIR
    (which processes started from now on inherit) until the block ends, then removed."""
    path = tempfile.mkdtemp(prefix="tasknode-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def process_ended(pid: int) -> None:
    """Drop the live gauges (in flight, connections) of a worker process that ended; its
    counters and histograms stay in the sums."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, path)


def serve(addr: str, workers_dir: str | None = None) -> int:
    """Serve /metrics on addr (host:port; port 0 picks one) from a thread of this process:
    the sum of the workers' values in workers_dir, or else this process's own. Its port."""
    if workers_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=workers_dir)
    else:
        registry = REGISTRY
    registry.register(BuildInfo())
    host, port = addr.rsplit(":", 1)
    server, _ = start_http_server(int(port), host.strip("[]"), registry)
    return int(server.server_port)
