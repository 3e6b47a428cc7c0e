"""The site worker asks its SuperNode rarely when idle and still takes a task that comes after a
long idle time within its idle ceiling (simulated time: no test here waits or times anything)."""

from __future__ import annotations

import pytest

from fedmeta.client import worker
from fedmeta.protocol.transport import Polling


class Site:
    """A SuperNode's Runtime API in simulated time: one task arrives at ``arrives_at``; the
    worker's waits advance the clock and it stops ``run_for`` seconds after the task was served."""

    def __init__(self, arrives_at: float, run_for: float = 30.0) -> None:
        self.now = 0.0
        self.arrives_at = arrives_at
        self.run_for = run_for
        self.asked = 0
        self.served_at: float | None = None
        self.asked_idle = 0  # asks up to the one that got the task
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def acquire(self) -> str | None:
        self.asked += 1
        if self.served_at is None and self.now >= self.arrives_at:
            return "token"
        return None

    def serve(self, token: str) -> None:
        assert token == "token"
        self.served_at = self.now
        self.asked_idle = self.asked

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return self.served_at is not None and self.now > self.served_at + self.run_for


def run(site: Site, polling: Polling) -> Site:
    polling.clock = site.clock
    worker.serve_tasks(site.acquire, site.serve, polling, site.wait)
    return site


def test_a_task_after_ten_idle_minutes_is_taken_within_the_idle_ceiling() -> None:
    arrives = 600.0 + 0.123
    site = run(Site(arrives), Polling.adaptive(busy_s=worker.BUSY_POLL_S, idle_s=worker.IDLE_POLL_S))
    assert site.served_at is not None
    assert arrives <= site.served_at <= arrives + worker.IDLE_POLL_S
    asked_idle = 1 + int(arrives // worker.IDLE_POLL_S) + 1  # at 0, 5, ..., 600, then 605: served
    assert worker.IDLE_POLL_S == 5.0 and asked_idle == 122
    assert site.asked_idle == asked_idle
    # after the task: quick again at once (20 ms, growing), at most 0.1 s while tasks may come
    after = [w for w in site.waits if w > 0][asked_idle - 1:]
    assert after[:4] == pytest.approx([0.02, 0.03, 0.045, 0.0675])
    assert max(after[:50]) == worker.BUSY_POLL_S


def test_control_arm_a_worker_that_never_backs_off_asks_fifty_times_as_often() -> None:
    """The same idle time with the busy ceiling as the only ceiling (what the worker did before:
    at most 0.1 s between asks): the task is taken sooner, within 0.1 s, for fifty times the
    asks (the SuperNode's wake-up, not modelled here, takes it at once in both)."""
    arrives = 600.0 + 0.123
    slow = run(Site(arrives), Polling.adaptive(busy_s=worker.BUSY_POLL_S, idle_s=worker.IDLE_POLL_S))
    fast = run(Site(arrives), Polling.up_to(worker.BUSY_POLL_S))
    assert fast.served_at is not None and arrives <= fast.served_at <= arrives + worker.BUSY_POLL_S
    assert slow.asked_idle == 122  # one ask each 5 s (the test above)
    assert fast.asked_idle >= 6000  # one each 0.1 s


def test_an_unreachable_supernode_is_asked_again_after_a_second() -> None:
    site = Site(arrives_at=5.0, run_for=0.0)
    failures = iter([True, True])

    def acquire() -> str | None:
        if next(failures, False):
            site.asked += 1
            raise ConnectionError("the SuperNode is restarting")
        return site.acquire()

    polling = Polling.adaptive(busy_s=worker.BUSY_POLL_S, idle_s=worker.IDLE_POLL_S)
    polling.clock = site.clock
    worker.serve_tasks(acquire, site.serve, polling, site.wait)
    assert [w for w in site.waits if w > 0][:2] == [worker.UNREACHABLE_WAIT_S] * 2
    assert site.served_at is not None and 5.0 <= site.served_at <= 5.0 + worker.IDLE_POLL_S


def test_the_supernode_wakes_its_worker_once_per_message_through_the_pipe() -> None:
    """The SuperNode's waits write one byte to the pipe when a message was stored for the
    worker (its first short wait after a poll), none while it waits for the reply; the worker's
    wait returns as soon as the byte is there (it is written before the wait: nothing is timed)
    and says it was woken; a long wait with nothing written is cut short only by the stop."""
    import os
    import threading

    from fedmeta.deploy import supernode

    r, w = os.pipe()
    try:
        slept: list[float] = []
        wait = supernode.waits(3.0, sleep=slept.append, wake=supernode.waker(w))
        wakeup = worker.Wakeup(threading.Event(), r)
        for _ in range(5):
            wait(3)  # idle polls of the SuperLink
        assert wakeup.wait(0.0) is False and not wakeup.woken()
        wait(0.5)  # a message was stored: the worker is woken
        wait(0.5)  # the node waits for the reply: no second byte
        assert wakeup.wait(600.0) is False and wakeup.woken()
        assert not wakeup.woken()  # once per byte
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
        wait(3)
        wait(0.5)  # the next message: woken again
        assert wakeup.wait(600.0) is False and wakeup.woken()
        wakeup.stop.set()
        os.write(w, b"!")  # what the site runner does when it stops
        assert wakeup.wait(600.0) is True
    finally:
        os.close(r)
        os.close(w)


def test_a_woken_worker_polls_quickly_at_once() -> None:
    """When the pipe says a message arrived but the task is not there yet, the next asks are
    20 ms apart (as after a task), not the idle ceiling."""
    site = Site(arrives_at=100.0, run_for=0.0)
    polling = Polling.adaptive(busy_s=worker.BUSY_POLL_S, idle_s=worker.IDLE_POLL_S)
    polling.clock = site.clock
    woke = iter([False] * 3 + [True])
    worker.serve_tasks(site.acquire, site.serve, polling, site.wait, woken=lambda: next(woke, False))
    waits = [w for w in site.waits if w > 0]
    assert waits[:4] == [worker.IDLE_POLL_S] * 4
    assert waits[4:7] == pytest.approx([0.02, 0.03, 0.045])
