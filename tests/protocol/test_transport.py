"""A deployed process retries a message part that has not arrived after 50 ms, not Flower's 1 s."""

from __future__ import annotations

import threading

import pytest
from flwr.supercore.inflatable import inflatable_utils as u

from fedmeta.protocol import transport


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
    assert transport.patch_points_present()
    transport.apply()
    assert u.pull_objects(["a"], _pull_after(3), max_concurrent_pulls=1) == {"a": b"content"}
    assert waits == pytest.approx([0.05, 0.1, 0.2])
    kw = u.pull_objects.__kwdefaults__
    assert kw["backoff_cap"] == 10 and kw["max_tries_per_object"] == 500
    assert u.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.05
