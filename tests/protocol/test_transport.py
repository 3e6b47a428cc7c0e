"""A deployed process retries a message part that has not arrived after 50 ms, not Flower's 1 s."""

from __future__ import annotations

import threading

import pytest
from flwr.supercore.inflatable import inflatable_utils as u

from fedmeta.protocol import flower_compat, transport


@pytest.fixture
def waits(monkeypatch):  # type: ignore[no-untyped-def]
    """The retry waits ``pull_objects`` asks for (its jitter pinned to 0), without sleeping."""
    seen: list[float] = []

    class Recording(threading.Event):
        def wait(self, timeout=None):  # type: ignore[no-untyped-def]
            if timeout is not None:
                seen.append(timeout)
            return self.is_set()

    monkeypatch.setattr(u.threading, "Event", Recording)
    monkeypatch.setattr(u.random, "uniform", lambda a, b: 0.0)
    saved = {fn: dict(fn.__kwdefaults__) for fn in (u.pull_objects, u.pull_and_inflate_object_from_tree)}
    yield seen
    for fn, kw in saved.items():
        fn.__kwdefaults__.clear()
        fn.__kwdefaults__.update(kw)


def _pull_after(unavailable: int):  # type: ignore[no-untyped-def]
    """An object that is missing for the first ``unavailable`` tries, then there."""
    tries = [0]

    def pull(object_id: str) -> bytes:
        tries[0] += 1
        if tries[0] <= unavailable:
            raise u.ObjectUnavailableError(object_id)
        return b"content"

    return pull


def test_flower_alone_waits_a_second_then_two(waits):  # type: ignore[no-untyped-def]
    from flwr.supercore.constant import PULL_INITIAL_BACKOFF

    u.pull_objects.__kwdefaults__["initial_backoff"] = PULL_INITIAL_BACKOFF  # as before any apply()
    assert u.pull_objects(["a"], _pull_after(2), max_concurrent_pulls=1) == {"a": b"content"}
    assert waits == [1.0, 2.0]


def test_after_apply_the_first_retry_comes_after_50_ms_and_the_cap_and_tries_stay(waits):  # type: ignore[no-untyped-def]
    assert not flower_compat.missing()
    transport.apply()
    assert u.pull_objects(["a"], _pull_after(3), max_concurrent_pulls=1) == {"a": b"content"}
    assert waits == pytest.approx([0.05, 0.1, 0.2])
    kw = u.pull_objects.__kwdefaults__
    assert kw["backoff_cap"] == 10 and kw["max_tries_per_object"] == 500
    assert u.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.05


def test_polling_is_quick_after_activity_and_settles_at_the_idle_interval() -> None:
    p = transport.Polling(0.02, 0.5)
    assert [p.next_s() for _ in range(2)] == [0.5, 0.5]  # idle until something happens
    p.active()
    waits = [p.next_s() for _ in range(12)]
    assert waits[:4] == pytest.approx([0.02, 0.03, 0.045, 0.0675])
    assert all(b >= a for a, b in zip(waits, waits[1:], strict=False)) and waits[-1] == 0.5
    assert sum(waits[:9]) < 1.5  # a message within ~1 s of the last is picked up quickly
    for bad in ((0.0, 1.0), (0.5, 0.1)):
        with pytest.raises(ValueError, match="fast_s"):
            transport.Polling(*bad)
    with pytest.raises(ValueError, match="busy_s"):
        transport.Polling(0.02, 1.0, busy_s=2.0)


class Clock:
    """A clock the test moves: ``sleep`` advances it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_backoff_schedule_holds_while_work_flows_then_grows_to_the_idle_ceiling() -> None:
    """The schedule against a hand computation: 20 ms after a message, x1.5 each empty poll, at
    most 0.2 s for 10 s after the message, then x1.5 again up to 3 s; a new message starts
    it over at once."""
    clock = Clock()
    p = transport.Polling.adaptive(busy_s=0.2, idle_s=3.0, hold_s=10.0)
    p.clock = clock
    assert (p.fast_s, p.busy_s, p.slow_s) == (0.02, 0.2, 3.0)
    assert p.next_s() == 3.0 and not p.busy()  # idle since it started
    clock.now = 100.0
    p.active()
    waits = []
    while clock.now < 30.0 + 100.0:
        waits.append(p.next_s())
        clock.sleep(waits[-1])
    # by hand: 0.02, 0.03, 0.045, 0.0675, 0.10125, 0.151875 (sum 0.416), then 0.2 s while
    # less than 10 s have passed: at 0.416 + 0.2 k, k = 0..47 (the last at 9.816 s)
    by_hand = [0.02, 0.03, 0.045, 0.0675, 0.10125, 0.151875] + [0.2] * 48
    # then from 10.016 s: 0.3, 0.45, 0.675, 1.0125, 1.51875, 2.278125, then 3 s each
    by_hand += [0.3, 0.45, 0.675, 1.0125, 1.51875, 2.278125]
    assert waits[:len(by_hand)] == pytest.approx(by_hand)
    assert waits[len(by_hand):] == pytest.approx([3.0] * (len(waits) - len(by_hand)))
    assert sum(by_hand) == pytest.approx(16.25)  # the idle ceiling is reached 16.25 s after the message
    p.active()  # a message after the back-off: quick again at once
    assert p.next_s() == 0.02 and p.busy()


def test_without_a_hold_polling_is_the_earlier_schedule() -> None:
    """``up_to`` (no busy ceiling, no hold) is what every poll did before: x1.5 up to ``slow_s``."""
    clock = Clock()
    p = transport.Polling.up_to(0.5)
    p.clock = clock
    p.active()
    clock.now = 1000.0  # time alone changes nothing without a hold
    assert [p.next_s() for _ in range(4)] == pytest.approx([0.02, 0.03, 0.045, 0.0675])


def test_the_supernode_waits_quickly_for_its_worker_and_backs_off_when_idle(monkeypatch) -> None:
    """Flower's SuperNode sleeps 3 s between empty polls and 0.5 s while its worker computes;
    fedmeta's entry point maps them to the idle poll (growing to poll_s) and to 20 ms."""
    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal as sci
    from uvicorn.server import Server

    from fedmeta.deploy import supernode

    # everything apply() sets in this process is put back by monkeypatch afterwards
    monkeypatch.setattr(Server, "main_loop", Server.main_loop)
    monkeypatch.setattr(transport, "apply", lambda *a, **k: None)
    monkeypatch.setattr(sci, "time", sci.time)
    for module in (connection, heartbeat):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    supernode.apply(0.5)
    for seconds in (3, 3, 0.5, 3, 3, 3):
        sci.time.sleep(seconds)
    assert slept == pytest.approx([0.5, 0.5, transport.FAST_POLL_S, 0.02, 0.03, 0.045])


def _idle_then_one_message(wait, *, arrives_at: float, clock: Clock, until: float) -> tuple[float, int]:
    """Flower's SuperNode loop (``start_client_internal``: an empty poll sleeps 3 s; a pulled
    message is handed to the worker, whose reply it waits for with 0.5 s sleeps) driven against
    ``clock``: one message arrives at ``arrives_at``. Returns (when it was pulled, polls before)."""
    polls, pulled = 0, None
    while clock.now < until:
        if pulled is None and clock.now >= arrives_at:
            pulled = clock.now
            for _ in range(3):  # the worker computes; the node looks in its memory meanwhile
                wait(0.5)
            continue
        if pulled is None:
            polls += 1
        wait(3)
    assert pulled is not None
    return pulled, polls


def test_an_idle_supernode_picks_up_a_message_within_its_idle_ceiling() -> None:
    """After ten idle minutes a message is pulled at most ``poll_s`` (3 s) after it arrived,
    with about one poll every 3 s meanwhile. Control arm: a node that never backs off (Flower's
    3 s wait mapped to 0.2 s, the ceiling while work flows) picks it up within 0.2 s but polls
    15 times as often."""
    from fedmeta.deploy import supernode

    arrives = 600.0 + 1.234
    clock = Clock()
    pulled, polls = _idle_then_one_message(supernode.waits(3.0, sleep=clock.sleep, clock=clock),
                                           arrives_at=arrives, clock=clock, until=arrives + 30)
    assert arrives <= pulled <= arrives + 3.0
    assert polls == 201  # a first poll at 0, then one each 3 s (ceil(601.234 / 3))
    after = clock.slept[polls:]
    assert after[:6] == pytest.approx([0.02] * 3 + [0.02, 0.03, 0.045])  # quick again at once
    control = Clock()
    pulled_c, polls_c = _idle_then_one_message(
        supernode.waits(supernode.BUSY_POLL_S, sleep=control.sleep, clock=control),
        arrives_at=arrives, clock=control, until=arrives + 30)
    assert arrives <= pulled_c <= arrives + supernode.BUSY_POLL_S
    assert polls_c >= 15 * polls - 15


def test_the_http_apis_tick_once_a_second_and_still_serve_and_stop(monkeypatch) -> None:
    """uvicorn's idle loop (Flower's HTTP APIs) wakes every 0.1 s; after ``slow_http_ticks`` it
    wakes once a second (counted in on_tick's tenths) and still serves requests and stops."""
    import asyncio
    import socket
    import threading

    import httpx
    import uvicorn
    from uvicorn.server import Server

    monkeypatch.setattr(Server, "main_loop", Server.main_loop)
    flower_compat.slow_http_ticks(1.0)
    ticks: list[int] = []
    on_tick = Server.on_tick

    async def counting(self, counter):  # type: ignore[no-untyped-def]
        ticks.append(counter)
        return await on_tick(self, counter)

    monkeypatch.setattr(Server, "on_tick", counting)
    slept: list[float] = []
    sleep = asyncio.sleep

    async def recording(seconds, *args):  # type: ignore[no-untyped-def]
        slept.append(seconds)
        return await sleep(seconds, *args)

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app=app, host="127.0.0.1", port=port, log_level="error"))
    monkeypatch.setattr(asyncio, "sleep", recording)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.05)
    assert httpx.get(f"http://127.0.0.1:{port}/").text == "ok"
    server.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert slept[0] == 1.0  # the idle loop (its shutdown still waits 0.1 s for open connections)
    assert ticks[:2] == [0, 10]  # each tick is ten tenths: the Date header is refreshed at each
