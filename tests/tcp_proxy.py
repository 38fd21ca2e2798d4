"""A TCP relay between the server and a database that a test can cut, blackhole and restore.

It stands in for a database restart or a network partition without touching the
shared database servers: ``cut()`` resets every relayed connection (both ends, at
once) and makes the relay reset every new one as soon as it is accepted;
``restore()`` relays again. ``blackhole()`` passes no byte either way while
keeping every connection open, and accepts new ones that never hear back; after
``heal()`` new connections relay normally, but the ones that were open during
the blackhole stay silent for good, as when a failover or a lost conntrack entry
leaves the client with connections nobody answers. Each relayed connection is
owned by one thread, which alone reads, writes and closes its two sockets, so
nothing is closed under a thread still using it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from types import TracebackType

#: How often idle threads look at the cut/stop flags, in seconds.
POLL = 0.02
#: No socket operation may block longer than this, in seconds.
IO_TIMEOUT = 10.0
#: SO_LINGER on, zero seconds: close() sends RST, as a crashed peer would.
ABORT = struct.pack("ii", 1, 0)


class TcpProxy:
    """Relays 127.0.0.1:<port> to upstream until stopped; see the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._generation = 0  # bumped by cut(); a relay of an older generation ends
        self._accepting = True
        self._stopping = False
        self._epoch = 0  # bumped by blackhole(); a relay of an older epoch passes nothing
        self._dark = False
        self._silent: list[socket.socket] = []  # accepted during a blackhole, never relayed
        self._relays: list[threading.Thread] = []
        #: Connections relayed so far (refused ones are not counted).
        self.accepted = 0
        #: Connections being relayed now, and the most ever relayed at once.
        self.live = 0
        self.peak = 0
        #: Reads from clients: one per request when a client waits for each answer.
        self.requests = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept")
        self._acceptor.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def cut(self) -> None:
        """Reset every relayed connection and refuse new ones; returns once all are gone."""
        with self._lock:
            self._accepting = False
            self._generation += 1
            relays = list(self._relays)
            silent, self._silent = self._silent, []
        for end in silent:
            _abort(end)
        for relay in relays:
            relay.join(IO_TIMEOUT)
        assert self.live == 0, "a relayed connection outlived the cut"

    def restore(self) -> None:
        """Relay new connections again."""
        with self._lock:
            self._accepting = True

    def blackhole(self) -> None:
        """Pass no byte on any open connection, now or later; accept new ones but never
        answer them (until heal())."""
        with self._lock:
            self._dark = True
            self._epoch += 1

    def heal(self) -> None:
        """Relay new connections again; those open during the blackhole stay silent."""
        with self._lock:
            self._dark = False

    def stop(self) -> None:
        """Cut everything, stop listening and join every thread."""
        self.cut()
        self._stopping = True
        self._acceptor.join(IO_TIMEOUT)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                accepting, generation, epoch = self._accepting, self._generation, self._epoch
                if accepting and self._dark:
                    self._silent.append(client)
                    continue
            if not accepting:
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
            except OSError:
                _abort(client)
                continue
            relay = threading.Thread(
                target=self._relay,
                args=(client, upstream, generation, epoch),
                name="proxy-relay",
            )
            with self._lock:
                self._relays = [r for r in self._relays if r.is_alive()]
                self._relays.append(relay)
                self.accepted += 1
                self.live += 1
                self.peak = max(self.peak, self.live)
            relay.start()

    def _relay(
        self, client: socket.socket, upstream: socket.socket, generation: int, epoch: int
    ) -> None:
        ends = [client, upstream]
        for end in ends:
            end.settimeout(IO_TIMEOUT)
        try:
            while self._generation == generation:
                if self._epoch != epoch:  # blackholed: held open, silent until cut
                    time.sleep(POLL)
                    continue
                readable, _, _ = select.select(ends, [], [], POLL)
                for end in readable:
                    data = end.recv(65536)
                    if not data:
                        return
                    if end is client:
                        with self._lock:
                            self.requests += 1
                    (upstream if end is client else client).sendall(data)
        except OSError:
            pass
        finally:
            for end in ends:
                _abort(end)
            with self._lock:
                self.live -= 1


def _abort(sock: socket.socket) -> None:
    """Close with a reset rather than an orderly shutdown."""
    with contextlib.suppress(OSError):  # already reset by the peer: closing is all that is left
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
    sock.close()
