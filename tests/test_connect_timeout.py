"""A database server that takes connections but never answers fails a connect in bounded
time (CONNECT_TIMEOUT_SECONDS), instead of holding a serving thread for minutes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import peewee
import pytest

from server.db.connection import CONNECT_TIMEOUT_SECONDS
from server.db.connection import open_database


@contextmanager
def silent_server() -> Iterator[int]:
    """The port of a TCP server that accepts connections and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_a_silent_database_server_fails_the_connect_in_bounded_time(scheme: str) -> None:
    with silent_server() as port:
        db = open_database(f"{scheme}://root@127.0.0.1:{port}/test")
        started = time.monotonic()
        with pytest.raises(peewee.OperationalError):
            db.connect()
        waited = time.monotonic() - started
    assert CONNECT_TIMEOUT_SECONDS - 1 <= waited < CONNECT_TIMEOUT_SECONDS + 5
