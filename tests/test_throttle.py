"""The bounds on hashing secrets: slots, per-caller failure budgets and who a caller is."""

from __future__ import annotations

import threading
import time

from server.throttle import FailureBudget
from server.throttle import HashSlots
from server.throttle import caller_of


def test_a_budget_holds_a_burst_then_refuses_until_it_refills() -> None:
    budget = FailureBudget(per_minute=2)
    assert budget.take("a") == budget.take("a") == 0
    assert 29 < budget.take("a") <= 30  # one token every 30 s
    budget.give_back("a")  # a check that matched spends nothing
    assert budget.take("a") == 0
    assert budget.take("b") == 0  # callers are counted apart


def test_a_budget_remembers_a_bounded_number_of_callers() -> None:
    budget = FailureBudget(per_minute=1)
    for n in range(FailureBudget.MAX_CALLERS + 1000):
        budget.take(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    assert len(budget) == FailureBudget.MAX_CALLERS


def test_no_budget_limits_nobody() -> None:
    budget = FailureBudget(per_minute=0)
    assert all(budget.take("a") == 0 for _ in range(100))
    assert len(budget) == 0


def test_slots_admit_as_many_waiters_as_holders_and_refuse_the_rest_at_once() -> None:
    slots = HashSlots(1, wait_seconds=30)
    assert slots.acquire()
    waiter: list[bool] = []
    thread = threading.Thread(target=lambda: waiter.append(slots.acquire()))
    thread.start()
    while slots.admitted < 2:  # the waiter is waiting
        time.sleep(0.01)
    started = time.monotonic()
    assert not slots.acquire()
    assert time.monotonic() - started < 5  # not the 30 s a waiter may wait
    slots.release()
    thread.join(10)
    assert waiter == [True]
    slots.release()
    assert slots.admitted == 0


def test_a_waiter_gives_up_after_the_wait() -> None:
    slots = HashSlots(1, wait_seconds=0.05)
    assert slots.acquire()
    assert not slots.acquire()
    slots.release()
    assert slots.acquire()


def test_a_caller_is_its_address_without_the_port() -> None:
    assert caller_of("ipv4:10.1.2.3:5000") == "10.1.2.3"
    assert caller_of("ipv6:[2001:db8:1:2:3::4]:5000") == "2001:db8:1:2::/64"
    assert caller_of("ipv6:[fe80::1%eth0]:5000") == "fe80::/64"
    assert caller_of("in-process") == "in-process"
    assert caller_of("unix:/tmp/socket") == "unix:/tmp/socket"
