"""ForwardSlots: a FIFO semaphore with a queue timeout, and no slot ever leaks."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from proxy.errors import QueueTimeout
from proxy.shaping import ForwardSlots, Release

LONG = 60.0            # a queue timeout no test reaches


async def until(condition: Callable[[], bool], steps: int = 10_000) -> None:
    """Yield to the loop until `condition` holds (bounded by loop steps, not wall time)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def settle(steps: int = 20) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


def acquirer(slots: ForwardSlots, order: list[str], name: str,
             hold: asyncio.Event | None = None) -> Callable[[], Coroutine[Any, Any, None]]:
    async def run() -> None:
        release = await slots.acquire()
        order.append(name)
        try:
            if hold is not None:
                await hold.wait()
        finally:
            release()
    return run


async def test_never_more_than_capacity_in_use_under_many_acquirers() -> None:
    slots = ForwardSlots(capacity=3, queue_timeout=LONG)
    active = 0
    most = 0

    async def worker() -> None:
        nonlocal active, most
        release = await slots.acquire()
        active += 1
        most = max(most, active)
        assert slots.in_use <= slots.capacity
        for _ in range(3):
            await asyncio.sleep(0)
        active -= 1
        release()

    await asyncio.gather(*(worker() for _ in range(50)))
    assert most == 3
    assert slots.peak == 3
    assert slots.in_use == 0
    assert slots.waiting == 0 and not slots.waiters


async def test_waiters_are_served_first_come_first_served() -> None:
    slots = ForwardSlots(capacity=1, queue_timeout=LONG)
    holder = await slots.acquire()
    order: list[str] = []
    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(acquirer(slots, order, f"w{i}")()))
        await until(lambda: slots.waiting == len(tasks))       # queued in this order
    holder()
    await asyncio.gather(*tasks)
    assert order == [f"w{i}" for i in range(10)]
    assert slots.in_use == 0


async def test_newcomer_cannot_overtake_waiting_queue() -> None:
    slots = ForwardSlots(capacity=1, queue_timeout=LONG)
    holder = await slots.acquire()
    order: list[str] = []
    hold_first = asyncio.Event()
    first = asyncio.create_task(acquirer(slots, order, "queued", hold_first)())
    await until(lambda: slots.waiting == 1)
    holder()                                   # the slot is handed to "queued" ...
    newcomer = asyncio.create_task(acquirer(slots, order, "newcomer")())  # ... before it runs
    await until(lambda: order == ["queued"])
    await settle()
    assert order == ["queued"]                 # the newcomer is waiting behind it
    assert slots.in_use == 1 and slots.waiting == 1
    hold_first.set()
    await asyncio.gather(first, newcomer)
    assert order == ["queued", "newcomer"]
    assert slots.in_use == 0


async def test_newcomer_queues_when_slots_free_but_handoff_pending() -> None:
    slots = ForwardSlots(capacity=2, queue_timeout=LONG)
    a, b = await slots.acquire(), await slots.acquire()
    order: list[str] = []
    waiter = asyncio.create_task(acquirer(slots, order, "waiter")())
    await until(lambda: slots.waiting == 1)
    a()
    # the freed slot belongs to the waiter: in_use stays at capacity
    assert slots.in_use == 2
    late = asyncio.create_task(acquirer(slots, order, "late")())
    await asyncio.gather(waiter, late)
    assert order == ["waiter", "late"]
    b()
    assert slots.in_use == 0


async def test_queue_timeout_raises_with_retry_after_and_leaks_nothing() -> None:
    slots = ForwardSlots(capacity=1, queue_timeout=0.05)
    holder = await slots.acquire()
    with pytest.raises(QueueTimeout) as info:
        await slots.acquire()
    assert info.value.status == 503
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert slots.in_use == 1
    assert not slots.waiters and slots.waiting == 0
    holder()
    assert slots.in_use == 0
    again = await slots.acquire()                # the slot is usable again at once
    assert slots.in_use == 1
    again()
    assert slots.in_use == 0


async def test_cancelled_waiter_leaves_no_leak() -> None:
    slots = ForwardSlots(capacity=1, queue_timeout=LONG)
    holder = await slots.acquire()
    task = asyncio.create_task(slots.acquire())
    await until(lambda: slots.waiting == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not slots.waiters and slots.waiting == 0
    holder()
    assert slots.in_use == 0
    release = await slots.acquire()
    release()
    assert slots.in_use == 0


async def test_double_release_does_not_free_two_slots() -> None:
    slots = ForwardSlots(capacity=2, queue_timeout=0.05)
    first, _second = await slots.acquire(), await slots.acquire()
    first()
    first()
    assert slots.in_use == 1
    _third = await slots.acquire()
    assert slots.in_use == 2
    with pytest.raises(QueueTimeout):            # still only two slots
        await slots.acquire()
    assert slots.in_use == 2


async def test_double_release_hands_only_one_slot_to_waiters() -> None:
    slots = ForwardSlots(capacity=1, queue_timeout=LONG)
    holder = await slots.acquire()
    order: list[str] = []
    gate = asyncio.Event()
    a = asyncio.create_task(acquirer(slots, order, "a", gate)())
    await until(lambda: slots.waiting == 1)
    b = asyncio.create_task(acquirer(slots, order, "b", gate)())
    await until(lambda: slots.waiting == 2)
    holder()
    holder()
    await until(lambda: order == ["a"])
    await settle()
    assert order == ["a"]                        # b still waits: one slot, one holder
    assert slots.in_use == 1 and slots.waiting == 1
    gate.set()
    await asyncio.gather(a, b)
    assert order == ["a", "b"]
    assert slots.in_use == 0


async def test_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    slots = ForwardSlots(capacity=1, queue_timeout=LONG)
    holder = await slots.acquire()
    doomed = asyncio.create_task(slots.acquire())
    await until(lambda: slots.waiting == 1)
    order: list[str] = []
    behind = asyncio.create_task(acquirer(slots, order, "behind")())
    await until(lambda: slots.waiting == 2)
    # in the same loop step: the waiter is cancelled and the holder hands it the slot
    doomed.cancel()
    holder()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(behind, 10)           # hang guard only
    assert order == ["behind"]
    assert slots.in_use == 0
    assert not slots.waiters


async def test_waiter_timing_out_as_it_is_handed_a_slot_passes_it_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic race: the loop's clock is frozen and then jumped past both the queue
    timeout and a release scheduled just after it, so the timeout fires first and the slot
    is handed over in the same loop iteration, before the waiter has given up."""
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    timeout = 5.0
    slots = ForwardSlots(capacity=1, queue_timeout=timeout)
    holder = await slots.acquire()
    start = now[0]
    doomed = asyncio.create_task(slots.acquire())
    await until(lambda: slots.waiting == 1)      # its timeout is armed at start + timeout
    loop.call_at(start + timeout * 1.5, holder)  # due just after the timeout, same iteration
    now[0] = start + timeout * 2
    with pytest.raises(QueueTimeout):
        await doomed
    monkeypatch.undo()
    assert not slots.waiters
    assert slots.in_use == 0, "the slot handed to a waiter that timed out leaked"
    release = await asyncio.wait_for(slots.acquire(), 10)
    release()
    assert slots.in_use == 0


async def test_release_returned_after_timeout_race_is_not_double_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Same race with a second waiter queued: the slot goes to it, exactly once."""
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    timeout = 5.0
    slots = ForwardSlots(capacity=1, queue_timeout=timeout)
    holder = await slots.acquire()
    start = now[0]
    doomed = asyncio.create_task(slots.acquire())
    await until(lambda: slots.waiting == 1)
    now[0] = start + 1.0                         # the next waiter's timeout is later
    got: list[Release] = []

    async def behind() -> None:
        got.append(await slots.acquire())

    task = asyncio.create_task(behind())
    await until(lambda: slots.waiting == 2)
    loop.call_at(start + timeout + 0.25, holder)
    now[0] = start + timeout + 0.5               # doomed's timeout and the release are due,
                                                 # behind's (start + 1 + timeout) is not
    with pytest.raises(QueueTimeout):
        await doomed
    await until(lambda: bool(got))
    monkeypatch.undo()
    await task
    assert slots.in_use == 1 and not slots.waiters
    got[0]()
    assert slots.in_use == 0


async def test_on_wait_is_called_only_when_the_caller_must_queue() -> None:
    slots = ForwardSlots(capacity=1, queue_timeout=LONG)
    calls: list[str] = []
    holder = await slots.acquire(lambda: calls.append("first"))
    assert calls == []                           # a free slot: no waiting, no call
    task = asyncio.create_task(slots.acquire(lambda: calls.append("queued")))
    await until(lambda: slots.waiting == 1)
    assert calls == ["queued"]
    holder()
    (await task)()
    assert slots.in_use == 0
