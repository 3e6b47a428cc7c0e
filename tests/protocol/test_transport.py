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


def test_the_supernode_waits_quickly_for_its_worker_and_backs_off_when_idle(monkeypatch) -> None:
    """Flower's SuperNode sleeps 3 s between empty polls and 0.5 s while its worker computes;
    fedmeta's entry point maps them to the idle poll (growing to poll_s) and to 20 ms."""
    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal as sci

    from fedmeta.deploy import supernode

    # everything apply() sets in this process is put back by monkeypatch afterwards
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
