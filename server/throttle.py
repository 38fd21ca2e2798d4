"""Bounds on what checking app secrets may cost: hash slots and per-caller failure budgets.

A secret is checked with scrypt: ~50 ms of CPU and 16 MiB at N=2^14. Anyone may send
a fresh wrong secret with every call, so without bounds a few callers keep every core
hashing and every serving thread waiting on a hash. Two bounds hold here, both for
checks that must hash (a secret verified before is remembered and never waits):

- HashSlots: at most ``slots`` hashes run at once in a process, at most as many checks
  wait for one, and none waits longer than ``wait_seconds``. Any other check is refused
  at once, so a flood holds at most 2 x slots serving threads and the rest keep serving.
  The hashes run on ``slots`` threads of their own: glibc keeps a thread's freed 16 MiB
  scrypt buffer in that thread's arena, so hashing on the serving threads would keep
  16 MiB per serving thread (+131 MiB for 8 of them, measured). Those threads are nicer
  (Linux), so while the serving threads are busy hashing gets about a tenth of the CPU
  one of them gets, bounding what a flood from many addresses burns. (SCHED_IDLE would
  spare serving even the scheduler's slice, but starve new callers' checks for seconds
  on a busy machine.)
- FailureBudget: a token bucket per caller (its peer address; an IPv6 /64 counts as
  one address): ``per_minute`` failed checks in a burst, then one every
  60 / ``per_minute`` seconds. A check takes a token before it hashes and gives it
  back if the secret matches, so only failures spend the budget. The table keeps the
  MAX_CALLERS callers seen last; one evicted starts afresh, which only costs a burst
  more, still within the slots.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
#: How much nicer than the serving threads the hash threads are (Linux: per thread).
HASH_NICENESS = 10


class SlotsBusy(Exception):
    """No hash slot came free in time."""


class HashSlots:
    """Runs hashes on ``slots`` threads of their own, with at most as many waiting, each for a
    bounded time."""

    def __init__(self, slots: int, wait_seconds: float) -> None:
        if slots < 1:
            raise ValueError("TASKNODE_AUTH_HASH_SLOTS must be at least 1")
        self.slots = slots
        self.wait_seconds = wait_seconds
        self._free = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._admitted = 0  # holding a slot or waiting for one
        self._threads = ThreadPoolExecutor(
            slots, thread_name_prefix="hash", initializer=_lower_priority
        )

    def run(self, work: Callable[[], T]) -> T:
        """work() on a hash thread once a slot is free; SlotsBusy if none came free in time."""
        if not self.acquire():
            raise SlotsBusy
        try:
            # A slot held means a hash thread is idle: this starts at once.
            return self._threads.submit(work).result()
        finally:
            self.release()

    def acquire(self) -> bool:
        """Take a slot, waiting at most wait_seconds; False (at once if the queue is full)
        when none came free. A True must be followed by one release()."""
        with self._lock:
            if self._admitted >= 2 * self.slots:
                return False
            self._admitted += 1
        if self._free.acquire(timeout=self.wait_seconds):
            return True
        with self._lock:
            self._admitted -= 1
        return False

    def release(self) -> None:
        self._free.release()
        with self._lock:
            self._admitted -= 1

    @property
    def admitted(self) -> int:
        """Checks holding a slot or waiting for one."""
        return self._admitted


class FailureBudget:
    """Token buckets of failed checks per caller, in a table of bounded size."""

    MAX_CALLERS = 4096

    def __init__(self, per_minute: int) -> None:
        """per_minute 0 puts no limit on a caller (the hash slots still hold)."""
        self.capacity = float(per_minute)
        self.rate = per_minute / 60
        #: caller -> (tokens, when counted), least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, caller: str) -> float:
        """Spend a token of caller's: 0 if there was one, else the seconds until there is."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(caller, now)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[caller] = (tokens - 1 if not wait else tokens, now)
            self._buckets.move_to_end(caller)
            if len(self._buckets) > self.MAX_CALLERS:
                self._buckets.popitem(last=False)
        return wait

    def give_back(self, caller: str) -> None:
        """Return the token a check took, since it did not fail."""
        if not self.rate:
            return
        now = time.monotonic()
        with self._lock:
            if caller in self._buckets:
                self._buckets[caller] = (min(self.capacity, self._tokens(caller, now) + 1), now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, caller: str, now: float) -> float:
        """caller's tokens at now (callers hold the lock)."""
        tokens, counted = self._buckets.get(caller, (self.capacity, now))
        return min(self.capacity, tokens + (now - counted) * self.rate)


def _lower_priority() -> None:
    """Make the calling thread nicer (Linux: a thread is a task with a nice value of its own;
    elsewhere this would renice the whole process, so it is left alone)."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICENESS)


def caller_of(peer: str) -> str:
    """The caller a gRPC peer name stands for: its address without the port, an IPv6
    address's /64 network (one host usually holds a whole /64), any other peer as is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6" and rest.startswith("["):
        host = rest[1:].partition("]")[0].partition("%")[0]
        try:
            return str(ipaddress.ip_network(f"{host}/64", strict=False))
        except ValueError:
            return host
    return peer
