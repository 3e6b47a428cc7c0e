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

from dataclasses import dataclass, field

INITIAL_BACKOFF_S = 0.05

#: The first wait after activity of the deployed processes' polls (see :class:`Polling`).
FAST_POLL_S = 0.02


@dataclass
class Polling:
    """Waits between polls that are short while a run is active and long when idle.

    :meth:`active` (a task was served, a message arrived) sets the next wait to ``fast_s``; each
    :meth:`next_s` returns the current wait and grows the next one by ``growth``, up to
    ``slow_s``. During a run the next round's message comes within a second of the last reply,
    while the poll is still quick; an idle site settles at ``slow_s`` within a few seconds, so
    polling costs no more CPU than a fixed ``slow_s`` poll when nothing happens.
    """

    fast_s: float
    slow_s: float
    growth: float = 1.5
    _next: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.fast_s <= self.slow_s or self.growth < 1:
            raise ValueError("polling needs 0 < fast_s <= slow_s and growth >= 1, got "
                             f"fast_s={self.fast_s}, slow_s={self.slow_s}, growth={self.growth}")
        self._next = self.slow_s

    @classmethod
    def up_to(cls, slow_s: float) -> Polling:
        """Quick (:data:`FAST_POLL_S`, or ``slow_s`` if that is shorter) after activity, at most
        ``slow_s`` when idle."""
        return cls(min(FAST_POLL_S, slow_s), slow_s)

    def active(self) -> None:
        self._next = self.fast_s

    def next_s(self) -> float:
        wait = self._next
        self._next = min(self.slow_s, wait * self.growth)
        return wait


def apply(initial_backoff_s: float = INITIAL_BACKOFF_S) -> None:
    """Start Flower's object-pull backoff at ``initial_backoff_s`` in this process (the patch
    point is :func:`fedmeta.protocol.flower_compat.quicken_object_pulls`)."""
    from fedmeta.protocol import flower_compat

    flower_compat.quicken_object_pulls(initial_backoff_s)
