"""The shim's HTTP/1.1 connections: uvicorn's httptools protocol, with limits.

llhttp has no limit of its own on a request's head, and httptools grows a header it
has not seen the end of by copying it (a 300 MB header cost 114 s of CPU and 370 MiB).
So the bytes of a head are counted here before the parser is fed them, and a request
line or head over its limit is refused (414, 431) as soon as the read that crosses the
limit arrives. To count exactly, the parser is fed in pieces that never run past the
end of a request (see _piece_end): the next request's head then starts at a piece.

A request must arrive whole within a time (408), as must the first byte of the first
one; idle keep-alive connections are uvicorn's (timeout_keep_alive). A process holds
at most so many connections and closes the rest at once.

A refusal (these, and bytes that are not HTTP) is sent after the answers to the
requests before it on the connection (pipelining), in the JSON envelope, and the
connection is closed; nothing after it is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any
from typing import ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.server import ServerState

from server.config import Config
from server.gateway.app import NOT_HTTP
from server.gateway.app import unreadable

#: A request ends only right after a blank line (its head's, or its chunked body's) or
#: after its Content-Length body.
BLANK_LINE = b"\r\n\r\n"
#: Seconds between two warnings that the connection cap is reached.
WARN_EVERY = 10.0
_warned = -WARN_EVERY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one HTTP connection may send, and how many may be open (per process)."""

    request_line: int
    head: int
    request_seconds: float
    connections: int

    @classmethod
    def of(cls, config: Config) -> Limits:
        """config's limits (Config() has the defaults)."""
        return cls(
            config.max_request_line_bytes,
            config.max_header_bytes,
            config.http_request_timeout_seconds,
            config.max_http_connections,
        )


class Connection(HttpToolsProtocol):
    """One HTTP/1.1 connection of the shim (uvicorn makes one per accepted socket)."""

    limits: ClassVar[Limits] = Limits.of(Config())

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        #: Reading a request's head (else its body); bytes of that head so far, and of
        #: its request line (None once that has ended).
        self._reading_head = True
        self._head = 0
        self._line: int | None = 0
        #: Body bytes still to come, if the body has a Content-Length.
        self._body_left: int | None = None
        #: The last bytes fed, to find a blank line split between two reads.
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        #: The answer to send, once the requests before it are answered, before closing.
        self._refusal: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.connections:
            transport.close()  # at once: no buffer, no timer
            _warn_of_cap(self.limits.connections)
            return
        self._start_timer()  # for its first byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        start = 0
        while start < len(data) and self._refusal is None and not self.transport.is_closing():
            end = self._piece_end(data, start)
            if self._reading_head:
                if self._timer is None:
                    self._start_timer()
                refusal = self._count_head(data, start, end)
                if refusal is not None:
                    self._refuse(*refusal)
                    return
            elif self._body_left is not None:
                self._body_left -= end - start
            piece = data if start == 0 and end == len(data) else memoryview(data)[start:end]
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError:
                self._refuse(400, NOT_HTTP)
                return
            if end - start >= 3:
                self._tail = data[end - 3 : end]
            else:
                self._tail = (self._tail + data[start:end])[-3:]
            start = end

    def _piece_end(self, data: bytes, start: int) -> int:
        """Where the piece of data from start ends: at the end of a Content-Length body,
        else right after the next blank line, else at the end of data."""
        if not self._reading_head and self._body_left is not None:
            return min(len(data), start + max(1, self._body_left))
        if start == 0 and self._tail:
            at = (self._tail + data[:3]).find(BLANK_LINE)
            if at != -1:
                return at + len(BLANK_LINE) - len(self._tail)
        at = data.find(BLANK_LINE, start)
        return len(data) if at == -1 else at + len(BLANK_LINE)

    def _count_head(self, data: bytes, start: int, end: int) -> tuple[int, str] | None:
        """Add data[start:end], bytes of a head, to its counts: the refusal if a limit is
        crossed."""
        if self._line is not None:
            at = start
            if self._line == 0 and data[start] in b"\r\n":  # llhttp skips these
                at = end - len(data[start:end].lstrip(b"\r\n"))
            breaks = [i for i in (data.find(b"\r", at, end), data.find(b"\n", at, end)) if i >= 0]
            self._line += (min(breaks) if breaks else end) - at
            if self._line > self.limits.request_line:
                limit = self.limits.request_line
                return 414, f"the request line is longer than {limit} bytes"
            if breaks:
                self._line = None
        self._head += end - start
        if self._head > self.limits.head:
            return 431, f"the request line and headers are larger than {self.limits.head} bytes"
        return None

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._body_left = _content_length(self.headers)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head, self._head, self._line, self._body_left = True, 0, 0, None
        self._stop_timer()

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)
        super().on_response_complete()  # starts the next pipelined request, if any
        if self._refusal is not None and not queued and not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self._close()

    def _start_timer(self) -> None:
        self._timer = self.loop.call_later(self.limits.request_seconds, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        """The request (or the first byte of the connection) did not come in time: 408 if
        any of it came, else just close."""
        self._timer = None
        if self.transport.is_closing():
            return
        if self._head or not self._reading_head:
            limit = self.limits.request_seconds
            self._refuse(408, f"the request did not arrive within {limit:g} seconds")
        else:
            self._refuse(None, "")

    def _refuse(self, status: int | None, message: str) -> None:
        """Answer status in the envelope (None: nothing) once the requests before are
        answered, then close; read nothing more."""
        if self._refusal is not None:
            return
        self._stop_timer()
        self.flow.pause_reading()
        self._refusal = b"" if status is None else _response(status, message, self)
        if status is not None:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            log.info("refused HTTP from %s with %d: %s", client, status, message)
        cycle: RequestResponseCycle | None = self.cycle
        in_flight = bool(self.pipeline) or (cycle is not None and not cycle.response_complete)
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            # The refused request itself, its body unread: it is never answered.
            if self.pipeline and self.pipeline[0][0] is cycle:
                self.pipeline.popleft()  # queued behind one still running
            else:
                cycle.disconnected = True  # running: its app reads that the client left
                cycle.message_event.set()
                in_flight = False
        if not in_flight:
            self._close()

    def _close(self) -> None:
        """Send the refusal (unless a response is half sent) and close."""
        cycle = self.cycle
        if self._refusal and not (cycle and cycle.response_started and not cycle.response_complete):
            self.transport.write(self._refusal)
        self.transport.close()


def connection_class(limits: Limits) -> type[Connection]:
    """Connection with limits, for uvicorn to instantiate."""

    class Limited(Connection):
        pass

    Limited.limits = limits
    return Limited


def _warn_of_cap(cap: int) -> None:
    """Log that connections are being refused, at most once every WARN_EVERY seconds."""
    global _warned
    now = time.monotonic()
    if now - _warned >= WARN_EVERY:
        _warned = now
        log.warning("%d HTTP connections are open: closing new ones at once", cap)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's length if a Content-Length gives it (llhttp has checked the number and
    refused it beside Transfer-Encoding); None for a chunked body."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            return None
    return length


def _response(status: int, message: str, connection: Connection) -> bytes:
    """A whole HTTP response refusing the request: the envelope, then close."""
    response = unreadable(status, message)
    head = [STATUS_LINE[status]]
    for name, value in (*connection.server_state.default_headers, *response.headers):
        head += [name, b": ", value, b"\r\n"]
    return b"".join([*head, b"connection: close\r\n\r\n", response.body])
