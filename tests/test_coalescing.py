"""Concurrent reads sharing one statement (server.db.coalescing), on real threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Sequence

import pytest

from server.db.coalescing import Coalescer


class Table:
    """A keyed table whose reads can be held in flight; each read is one 'statement'."""

    def __init__(self) -> None:
        self.version = 0
        self.statements: list[tuple[str, ...]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.reading = threading.Event()
        self.fail_next = False
        self._lock = threading.Lock()

    def write(self) -> int:
        with self._lock:
            self.version += 1
            return self.version

    def read_many(self, keys: Sequence[str]) -> dict[str, int]:
        with self._lock:
            seen = self.version  # the statement's moment: when it begins
            self.statements.append(tuple(keys))
            fail, self.fail_next = self.fail_next, False
        self.reading.set()
        self.hold.wait(10)
        if fail:
            raise ConnectionError("the statement failed")
        return {key: seen for key in keys if key != "missing"}


def start(target: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def wait_until(condition: Callable[[], bool], seconds: float = 5) -> None:
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.005)


def in_flight(key: str) -> tuple[Table, Coalescer[str, int], threading.Thread]:
    """A table, its coalescer, and a call whose statement (reading key) is held in flight."""
    table = Table()
    shared: Coalescer[str, int] = Coalescer(table.read_many, "test")
    table.hold.clear()
    first = start(shared.read, key, 5)
    wait_until(table.reading.is_set)
    return table, shared, first


def test_calls_that_arrive_during_a_statement_share_the_next_one() -> None:
    table, shared, first = in_flight("a")
    results: dict[str, int | None] = {}
    keys = ["a", "b", "b", "c", "missing"]
    waiting = [
        start(lambda i=i, k=k: results.__setitem__(f"{k}{i}", shared.read(k, 5)))
        for i, k in enumerate(keys)
    ]
    time.sleep(0.1)  # every later call queued behind the statement in flight
    assert table.statements == [("a",)]
    table.hold.set()
    for thread in [first, *waiting]:
        thread.join(5)
    assert len(table.statements) == 2
    assert sorted(table.statements[1]) == ["a", "b", "c", "missing"]  # each key once
    assert results["missing4"] is None
    assert {results[f"{k}{i}"] for i, k in enumerate(keys) if k != "missing"} == {0}


def test_no_call_takes_a_row_read_before_it_asked() -> None:
    table = Table()
    shared: Coalescer[str, int] = Coalescer(table.read_many, "test")
    stale: list[tuple[int, int]] = []
    stop = time.monotonic() + 1.0

    def caller() -> None:
        while time.monotonic() < stop:
            asked = table.write()  # a change, then a read that must see it
            seen = shared.read("k", 5)
            assert seen is not None
            if seen < asked:
                stale.append((asked, seen))

    threads = [start(caller) for _ in range(8)]
    for thread in threads:
        thread.join(10)
    assert not stale
    calls = table.version
    assert len(table.statements) < calls  # and they did share statements


def test_a_failed_statement_is_only_its_readers_error() -> None:
    table, shared, blocker = in_flight("x")
    errors: list[BaseException] = []
    got: list[int | None] = []

    def caller(key: str) -> None:
        try:
            got.append(shared.read(key, 5))
        except ConnectionError as exc:
            errors.append(exc)

    callers = [start(caller, key) for key in ("b", "c", "d")]
    time.sleep(0.1)
    table.fail_next = True  # the statement the three share, once "x" is read
    table.hold.set()
    for thread in [blocker, *callers]:
        thread.join(5)
    # The shared statement failed once: the call that ran it has the error; the others
    # each read again on their own.
    assert len(errors) == 1 and len(got) == 2 and all(v is not None for v in got)


def test_a_caller_waits_no_longer_than_its_timeout() -> None:
    table, shared, first = in_flight("a")
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        shared.read("b", 0.2)
    assert 0.15 < time.monotonic() - began < 2
    late: list[int | None] = []
    after = start(lambda: late.append(shared.read("c", 5)))
    time.sleep(0.05)
    table.hold.set()
    for thread in (first, after):
        thread.join(5)
    assert late == [0]  # the calls behind it still got their turn
