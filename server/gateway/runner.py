"""Running the shim: uvicorn (httptools, uvloop) on a thread of its own.

On its own thread so that the main thread keeps the signal handlers and the gRPC
server; on SIGTERM both drain at once (server.app.Server.drain).
The socket is bound here, before the thread starts, so a bad or busy address fails
in the caller, and port 0 gives a known port. With a certificate it serves HTTPS; the
caller has checked the files (server.tls), since uvicorn reads them on its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import socket
import threading

import uvicorn

from server.app import CannotListen
from server.config import Config
from server.gateway.app import App
from server.gateway.client import Caller
from server.gateway.protocol import Limits
from server.gateway.protocol import connection_class
from server.tls import KeyPair
from server.tls import server_key_pair

log = logging.getLogger(__name__)

#: Seconds start() waits for uvicorn to come up.
START_TIMEOUT = 10.0
#: Open files a process needs besides its HTTP connections: gRPC's, the database's, logs.
OTHER_FILES = 256


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that says when its start-up is over, however it went."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()

    def refuse_new(self) -> None:
        """On the loop: stop accepting connections, close idle ones, and let busy ones
        close after their response; what uvicorn's shutdown does first, but at once
        rather than at its next 0.1 s tick."""
        for server in getattr(self, "servers", ()):
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()


class HttpServer:
    """The shim on ``addr`` (host:port; port 0 picks a free one), over TLS with ``tls``."""

    def __init__(
        self,
        app: App,
        addr: str,
        grace: float = 10.0,
        tls: KeyPair | None = None,
        reuse_port: bool = False,
        limits: Limits | None = None,
    ) -> None:
        self.scheme = "http" if tls is None else "https"
        self.socket = bind(addr, reuse_port)
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            app,
            loop="uvloop",
            http=connection_class(limits or Limits.of(Config())),
            ws="none",
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=math.ceil(grace),
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
        )
        self._server = _Uvicorn(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.socket]}, name="http", daemon=True
        )

    @property
    def url(self) -> str:
        return url(self.scheme, self.host, self.port)

    def start(self) -> None:
        """Serve; return once uvicorn is up (RuntimeError if it could not come up)."""
        self._thread.start()
        if not self._server.ready.wait(START_TIMEOUT) or not self._server.started:
            self.stop()
            raise RuntimeError(f"the HTTP server on {self.url} did not start")

    def stop(self) -> None:
        """Stop taking connections at once, let requests in flight finish (up to grace),
        close."""
        loop = self._server.loop
        if loop is not None:
            # A closed loop (RuntimeError) means uvicorn has stopped already.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._server.refuse_new)
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join()
        self.socket.close()


def start_shim(
    config: Config, target: str | Caller, reuse_port: bool = False, watch_target: str = ""
) -> HttpServer:
    """The shim on config.http_addr, with config's certificate if any, calling the service
    at target (a gRPC address, or a Caller) and the watch streams at watch_target (by
    default config's watch address), started."""
    raise_open_files_limit(config.max_http_connections + OTHER_FILES)
    http = HttpServer(
        App(config, target, watch_target=watch_target),
        config.http_addr,
        config.shutdown_grace_seconds,
        server_key_pair(config),
        reuse_port,
        Limits.of(config),
    )
    http.start()
    return http


def raise_open_files_limit(needed: int) -> None:
    """Raise this process's soft limit of open files to its hard limit, so that a flood
    of HTTP connections meets the shim's cap, not the limit (which would leave gRPC
    unable to accept); warn if even the hard limit is below needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open files limit (%d) is below the HTTP connection cap plus %d: a flood of"
            " connections may leave gRPC unable to accept",
            soft,
            OTHER_FILES,
        )


def url(scheme: str, host: str, port: int) -> str:
    """scheme://host:port, an IPv6 host in brackets."""
    host = host.strip("[]")
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def bind(addr: str, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port ("[::1]:8080" for IPv6); CannotListen if not.
    With reuse_port, worker processes share the port (see server.workers)."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise CannotListen(f"cannot listen on {addr!r}: expected host:port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CannotListen(f"cannot listen on {addr}: {exc.strerror or exc}") from exc
    return sock
