"""Serving gRPC (and the HTTP/JSON shim) from several processes on one port, one per core.

Python runs one thread at a time per process, so a server uses every core only
with a process per core. Each worker is a fresh interpreter (spawned, not forked:
gRPC must not be forked once it runs) with its own gRPC server and database pool,
bound to the same address with SO_REUSEPORT, so the kernel spreads connections
over them; each is pinned to its own core, which measured ~1.9x faster than
letting the scheduler move the server's threads between cores
(../shared/reference/perf-baseline.md). The parent only starts, watches and
stops the workers: a worker that dies is started again; SIGTERM is passed on, and
each worker drains its calls in flight (server.app.Server.drain_and_exit). The
parent also serves the workers' metrics, summed (server.metrics).

With ``http``, each worker also serves the shim on the shared HTTP port, calling
its own gRPC handlers in-process (server.gateway.local); and each serves the watch
streams (server.watch) on the shared watch port, with a Hub of its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

from server import logs
from server import metrics
from server import traces
from server.app import CannotListen
from server.config import Config

log = logging.getLogger("tasknode.workers")
PR_SET_PDEATHSIG = 1
_spawn = multiprocessing.get_context("spawn")


def worker_count(config: Config) -> int:
    """How many processes config asks for: grpc_processes, or one per usable core."""
    if config.grpc_processes > 0:
        return config.grpc_processes
    return len(os.sched_getaffinity(0)) or 1


class Workers:
    """gRPC worker processes sharing config.grpc_addr."""

    def __init__(self, config: Config, count: int, http: bool = False) -> None:
        self.count = count
        self.http = http and bool(config.http_addr)
        self.cores = sorted(os.sched_getaffinity(0))
        self._reserved: list[socket.socket] = []
        self.port = self._reserve_port(config.grpc_addr)
        self.config = dataclasses.replace(config, grpc_addr=_with_port(config.grpc_addr, self.port))
        self.watch_port = 0
        watch_addr = config.watch_listen()
        if watch_addr:
            self.watch_port = self._reserve_port(watch_addr)
            self.config = dataclasses.replace(
                self.config, watch_addr=_with_port(watch_addr, self.watch_port)
            )
        self.http_port = 0
        if self.http:
            self.http_port = self._reserve_port(config.http_addr)
            self.config = dataclasses.replace(
                self.config, http_addr=_with_port(config.http_addr, self.http_port)
            )
        self._ready: Queue[Any] = _spawn.Queue()
        self._processes: list[BaseProcess | None] = [None] * count
        self._stopping = False

    def start(self, timeout: float = 60) -> None:
        """Start every worker and wait until each serves (or raise)."""
        for index in range(self.count):
            self._spawn(index)
        deadline = time.monotonic() + timeout
        for _ in range(self.count):
            message = self._ready.get(timeout=max(0.1, deadline - time.monotonic()))
            if message != "ready":
                self.stop(0)
                raise CannotListen(f"a gRPC worker could not start: {message}")
        for reserved in self._reserved:
            reserved.close()
        self._reserved.clear()

    def watch(self) -> None:
        """Until stop(): start again any worker that died."""
        while not self._stopping:
            for index, process in enumerate(self._processes):
                if process is not None and not process.is_alive() and not self._stopping:
                    log.error(
                        "gRPC worker %d exited with %s; starting it again", index, process.exitcode
                    )
                    if process.pid is not None:
                        metrics.process_ended(process.pid)
                    self._spawn(index)
            time.sleep(0.5)

    def stop(self, grace: float) -> None:
        """Pass SIGTERM on (each worker drains for up to grace) and wait for them."""
        self._stopping = True
        alive = [p for p in self._processes if p is not None and p.is_alive()]
        for process in alive:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        for process in alive:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            if process.pid is not None:
                metrics.process_ended(process.pid)

    def _spawn(self, index: int) -> None:
        core = self.cores[index % len(self.cores)] if self.config.pin_processes else None
        process = _spawn.Process(
            target=_run_worker,
            args=(self.config, index, core, self._ready, self.http),
            name=f"tasknode-grpc-{index}",
            daemon=True,
        )
        process.start()
        self._processes[index] = process

    def _reserve_port(self, addr: str) -> int:
        """The port to share; for port 0, a free one held (SO_REUSEPORT) until all serve."""
        host, port = addr.rsplit(":", 1)
        if int(port):
            return int(port)
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        reserved = socket.socket(family, socket.SOCK_STREAM)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host.strip("[]"), 0))
        self._reserved.append(reserved)
        return int(reserved.getsockname()[1])


def _with_port(addr: str, port: int) -> str:
    return f"{addr.rsplit(':', 1)[0]}:{port}"


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when its parent dies, however it dies: a killed
    parent must not leave workers holding the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot tie worker lifetime to the parent on this system")


def _run_worker(
    config: Config, index: int, core: int | None, ready: Queue[Any], http: bool
) -> None:
    """A worker process: pin, serve on the shared port(s), drain on SIGTERM."""
    from server.app import create_server  # imported here: a fresh interpreter
    from server.gateway.local import serve_shim
    from server.watch.service import serve_watch

    logs.configure(config, worker=index)
    traces.configure(config)  # here, in the process that serves: its own provider and thread
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    _die_with_parent()
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        server = create_server(config, reuse_port=True)
        server.start()
        watch = serve_watch(config, server, reuse_port=True)
        shim = serve_shim(config, server, reuse_port=True) if http else None
    except Exception as exc:
        ready.put(f"worker {index}: {exc}")
        raise SystemExit(2) from exc

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    ready.put("ready")
    stopping.wait()
    log.info("got SIGTERM: draining for up to %.0fs", config.shutdown_grace_seconds)
    alongside = [*([shim.stop] if shim else []), *([watch.stop] if watch else [])]
    server.drain_and_exit(config.shutdown_grace_seconds, *alongside)
