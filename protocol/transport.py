"""How quickly a deployed process fetches a message's parts that have not arrived yet.

Flower 1.39 moves a message as a tree of objects: the sender announces the message, then pushes
its objects; the receiver pulls each object and, when one is not there yet, retries after
``PULL_INITIAL_BACKOFF`` = 1 s, then 2 s, 4 s … (capped at 10 s, at most 500 tries). On a
deployment a receiver often looks a few milliseconds too early, so a round paid a whole second
at each such hop: the SuperNode pulling the coordinator's message, the site worker pulling it
from the SuperNode, the ServerApp pulling each reply. :func:`apply` starts that backoff at
:data:`INITIAL_BACKOFF_S` instead (same cap, same number of tries, so a slow link still gets
minutes). Each fedmeta process that pulls calls it when it starts serving: the ServerApp
(:mod:`fedmeta.server.app`), the SuperNode entry point (:mod:`fedmeta.deploy.supernode`) and
the site worker (:mod:`fedmeta.client.worker`); importing this module changes nothing.
:func:`fedmeta.protocol.flower_compat.missing` names the setting if a Flower upgrade moves it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

INITIAL_BACKOFF_S = 0.05

#: The first wait after activity of the deployed processes' polls (see :class:`Polling`).
FAST_POLL_S = 0.02
#: How long after a message work counts as flowing: the polls stay at most at their busy
#: ceiling meanwhile, and back off towards their idle ceiling after (see :class:`Polling`).
BUSY_HOLD_S = 10.0


@dataclass
class Polling:
    """Waits between polls: short while work flows, backing off to a ceiling when idle.

    :meth:`active` (a task was served, a message arrived) sets the next wait to ``fast_s``; each
    :meth:`next_s` returns the current wait and grows the next one by ``growth``, up to
    ``busy_s`` for ``hold_s`` seconds after the last :meth:`active` (during a run the next
    round's message comes within a second of the last reply, while the poll is still quick) and
    up to ``slow_s`` after that: an idle process settles at ``slow_s`` within seconds of the hold's
    end, so its polls cost what a fixed ``slow_s`` poll costs. Before any activity the wait is
    ``slow_s``. ``busy_s`` None (the default) is ``slow_s``: no hold.

    With ``fast_s`` 0.02, ``busy_s`` 0.2, ``hold_s`` 10, ``slow_s`` 3 and ``growth`` 1.5 the waits
    after a message are 0.02, 0.03, 0.045, 0.0675, 0.101, 0.152, then 0.2 until 10 s have passed,
    then 0.3, 0.45, 0.675, 1.01, 1.52, 2.28, then 3 s: a message is picked up at most ``slow_s``
    after it arrives, and within ``busy_s`` during a run.
    """

    fast_s: float
    slow_s: float
    growth: float = 1.5
    busy_s: float | None = None
    hold_s: float = 0.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _next: float = field(init=False)
    _since: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        busy = self.slow_s if self.busy_s is None else self.busy_s
        if not 0 < self.fast_s <= busy <= self.slow_s or self.growth < 1 or self.hold_s < 0:
            raise ValueError("polling needs 0 < fast_s <= busy_s <= slow_s, growth >= 1 and hold_s >= 0, got "
                             f"fast_s={self.fast_s}, busy_s={self.busy_s}, slow_s={self.slow_s}, "
                             f"growth={self.growth}, hold_s={self.hold_s}")
        self._next = self.slow_s

    @classmethod
    def up_to(cls, slow_s: float) -> Polling:
        """Quick (:data:`FAST_POLL_S`, or ``slow_s`` if that is shorter) after activity, at most
        ``slow_s`` when idle."""
        return cls(min(FAST_POLL_S, slow_s), slow_s)

    @classmethod
    def adaptive(cls, *, busy_s: float, idle_s: float, hold_s: float = BUSY_HOLD_S) -> Polling:
        """Quick after activity (:data:`FAST_POLL_S`), at most ``busy_s`` for ``hold_s`` seconds
        after it, at most ``idle_s`` after that (each bounded by the ones after it)."""
        busy = min(busy_s, idle_s)
        return cls(min(FAST_POLL_S, busy), idle_s, busy_s=busy, hold_s=hold_s)

    def active(self) -> None:
        self._next = self.fast_s
        self._since = self.clock()

    def busy(self) -> bool:
        """Whether the last activity was less than ``hold_s`` ago."""
        return self._since is not None and self.clock() - self._since < self.hold_s

    def next_s(self) -> float:
        ceiling = self.busy_s if self.busy_s is not None and self.busy() else self.slow_s
        wait = min(self._next, ceiling)
        self._next = min(self.slow_s, wait * self.growth)
        return wait


def apply(initial_backoff_s: float = INITIAL_BACKOFF_S) -> None:
    """Start Flower's object-pull backoff at ``initial_backoff_s`` in this process (the patch
    point is :func:`fedmeta.protocol.flower_compat.quicken_object_pulls`)."""
    from fedmeta.protocol import flower_compat

    flower_compat.quicken_object_pulls(initial_backoff_s)
