"""A request's wall-time ceiling and cancellation, checked cooperatively in the compute loops.

The site worker serves each request :func:`within` its policy's ``max_request_seconds``, the
expiry of the request's message (its ``created_at + ttl``: a reply after it has no time left to
live and is dropped, so the coordinator, or a run that stopped, no longer waits for it) and an
event that is set when the request's task is abandoned (the SuperNode no longer knows it). The
loops that can run long call :func:`check`, which raises :class:`DeadlineExceeded` past the
ceiling or :class:`RequestCancelled` past the expiry or once the event is set; the worker answers
with the matching code. Outside :func:`within` (a simulation, a test) :func:`check` does nothing.

Covered (each checks once per iteration): a training round's meta-batches (every task-based
algorithm draws its tasks through the check), the per-task loops of Reptile, MAML/FOMAML,
Meta-SGD and the ProtoNet/episodic engine, the inner loop's steps on the autograd path, FedAvg's
local SGD steps, the evaluation's adaptation steps (which fit every cross-validation fold at once),
its draws and its outcomes. Not covered: one vmapped or ``torch.compile``d meta-batch (a check
there would break the graph; its size is bounded by ``max_tasks`` and ``max_inner_steps``), the
bootstrap (a few matrix products, bounded by ``max_bootstrap``), the GLM's sums (one product) and
loading the site's data. A loop is stopped between iterations, so a request can run past the
ceiling by at most one iteration.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fedmeta.common.errors import FedmetaError

__all__ = ["DeadlineExceeded", "RequestCancelled", "RequestStopped", "check", "within"]


class RequestStopped(FedmetaError):
    """The site stopped computing a request before it finished."""


class DeadlineExceeded(RequestStopped):
    """A request ran past the site's wall-time ceiling."""


class RequestCancelled(RequestStopped):
    """A request's task was abandoned while it was being computed."""


@dataclass(frozen=True)
class _Deadline:
    at: float | None
    seconds: float | None
    cancelled: threading.Event | None
    clock: Callable[[], float]
    expires: float | None
    wall: Callable[[], float]


_CURRENT: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar("fedmeta_deadline", default=None)


@contextlib.contextmanager
def within(seconds: float | None, *, cancelled: threading.Event | None = None, expires: float | None = None,
           clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> Iterator[None]:
    """Run the block with a ceiling of ``seconds`` (None: none), the cancel event ``cancelled``
    and ``expires``, the Unix time after which its reply would be dropped (None: never)."""
    if seconds is not None and not seconds > 0:
        raise ValueError(f"a request's wall-time ceiling must be > 0 seconds, got {seconds}")
    at = clock() + seconds if seconds is not None else None
    token = _CURRENT.set(_Deadline(at, seconds, cancelled, clock, expires, wall))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def check() -> None:
    """Raise if the current request was cancelled or ran past its ceiling; else nothing."""
    d = _CURRENT.get()
    if d is None:
        return
    if d.cancelled is not None and d.cancelled.is_set():
        raise RequestCancelled("the request's task was abandoned (the SuperNode no longer knows it)")
    if d.expires is not None and d.wall() > d.expires:
        raise RequestCancelled("the request's message expired: its reply would be dropped")
    if d.at is not None and d.clock() > d.at:
        raise DeadlineExceeded(f"the request ran past this site's max_request_seconds = {d.seconds:g}")
