"""How quickly a deployed process fetches a message's parts that have not arrived yet.

Flower 1.39 moves a message as a tree of objects: the sender announces the message, then pushes
its objects; the receiver pulls each object and, when one is not there yet, retries after
``PULL_INITIAL_BACKOFF`` = 1 s, then 2 s, 4 s … (capped at 10 s, at most 500 tries). On a
deployment a receiver often looks a few milliseconds too early, so a round paid a whole second
at each such hop: the SuperNode pulling the coordinator's message, the site worker pulling it
from the SuperNode, the ServerApp pulling each reply. :func:`apply` starts that backoff at
:data:`INITIAL_BACKOFF_S` instead (same cap, same number of tries, so a slow link still gets
minutes). Each fedmeta process that pulls calls it: the ServerApp (:mod:`fedmeta.server.app`),
the SuperNode entry point (:mod:`fedmeta.deploy.supernode`) and the site worker
(:mod:`fedmeta.client.worker`). :func:`patch_points_present` fails loudly if a Flower upgrade
moves the setting.
"""

from __future__ import annotations

INITIAL_BACKOFF_S = 0.05


def _pullers() -> tuple:  # type: ignore[type-arg]
    from flwr.supercore.inflatable import inflatable_utils

    return inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree


def patch_points_present() -> bool:
    """Whether the pinned Flower still takes the backoff as a keyword default of its pullers."""
    return all("initial_backoff" in (fn.__kwdefaults__ or {}) for fn in _pullers())


def apply(initial_backoff_s: float = INITIAL_BACKOFF_S) -> None:
    """Start Flower's object-pull backoff at ``initial_backoff_s`` in this process."""
    for fn in _pullers():
        fn.__kwdefaults__["initial_backoff"] = float(initial_backoff_s)
