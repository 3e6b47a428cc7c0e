"""``python -m fedmeta.deploy.supernode ARGS``: Flower's ``flower-supernode``, with its waits set.

Flower 1.39's SuperNode asks the SuperLink for work every 3 s when idle (a hard-coded
``time.sleep(3)`` in ``flwr.supernode.start_client_internal``) and announces a 30 s heartbeat,
so a crashed hospital is noticed only after a minute and cannot rejoin before. This entry point
runs the same ``flower-supernode`` after setting

- the poll for work to 20 ms right after a message, growing by half each empty poll, to at most
  :data:`BUSY_POLL_S` while work flows (:data:`fedmeta.protocol.transport.BUSY_HOLD_S` after the
  last message) and at most ``$FEDMETA_SUPERNODE_POLL_S`` seconds (default :data:`IDLE_POLL_S`,
  Flower's own) once the node is idle (:class:`fedmeta.protocol.transport.Polling`), and the 0.5 s
  waits for the worker's reply to 20 ms (they read the node's own memory),
- a byte written to ``$FEDMETA_SUPERNODE_WAKE_FD`` (a pipe to the site worker, from ``fedmeta
  site start``) as soon as a message for the worker is stored, so that the worker, which backs
  off too when idle, takes it at once, and
- the node heartbeat to Flower's shortest allowed interval (10 s: the SuperLink marks a silent
  node offline after 20 s), and
- the idle wake-ups of its Runtime API's HTTP server (uvicorn's) to once a second instead of ten
  times (:func:`fedmeta.protocol.flower_compat.slow_http_ticks`).

The waits and the heartbeat are patch points of :mod:`fedmeta.protocol.flower_compat`, which
names them if a Flower upgrade moves them (and a test fails).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

POLL_ENV = "FEDMETA_SUPERNODE_POLL_S"
#: A pipe's write end (a file descriptor number) the node writes a byte to when it took a
#: message for its worker, so that the worker asks for it at once instead of at its next poll.
WAKE_ENV = "FEDMETA_SUPERNODE_WAKE_FD"
HEARTBEAT_S = 10
#: The longest wait between two polls of the SuperLink while work flows (a run's rounds), and
#: when the node is idle (unless ``$FEDMETA_SUPERNODE_POLL_S`` says otherwise: ``poll_interval_s``
#: of the node file).
BUSY_POLL_S, IDLE_POLL_S = 0.2, 3.0
#: How often the HTTP server of the node's Runtime API wakes when nothing happens (uvicorn: 0.1 s).
HTTP_TICK_S = 1.0


def waits(poll_s: float, *, sleep: Callable[[float], None] | None = None,
          clock: Callable[[], float] = time.monotonic,
          wake: Callable[[], None] | None = None) -> Callable[[float], None]:
    """What the SuperNode's ``time.sleep(seconds)`` does instead: Flower's idle poll (3 s)
    becomes the next wait of a :class:`~fedmeta.protocol.transport.Polling` (at most ``poll_s``
    when idle), and its sub-second waits (for the worker's reply, in the node's own memory)
    count as activity and last at most 20 ms. The first of those after a poll means the node
    has just stored a message for its worker: ``wake()`` is called then (:func:`waker`)."""
    from fedmeta.protocol import transport

    polling = transport.Polling.adaptive(busy_s=BUSY_POLL_S, idle_s=poll_s)
    polling.clock = clock
    sleep = sleep if sleep is not None else time.sleep
    polled = True  # the last wait was between two polls of the SuperLink

    def wait(seconds: float) -> None:
        nonlocal polled
        if seconds >= 1.0:  # Flower's idle poll (3 s) between two PullMessages to the SuperLink
            polled = True
            sleep(polling.next_s())
        else:  # 0.5 s: waiting for the worker's reply, or for its objects, in the node's memory
            if polled and wake is not None:
                wake()
            polled = False
            polling.active()
            sleep(min(seconds, transport.FAST_POLL_S))

    return wait


def waker(fd: int) -> Callable[[], None]:
    """Write one byte to the pipe ``fd`` (made non-blocking: a full pipe already holds a wake-up;
    a closed one, a worker gone, is not the node's concern)."""
    os.set_blocking(fd, False)

    def wake() -> None:
        try:
            os.write(fd, b"!")
        except OSError:
            pass

    return wake


def apply(poll_s: float, wake_fd: int | None = None) -> None:
    """Set the SuperNode's polls (:func:`waits`, at most ``poll_s`` when idle, waking its worker
    through the pipe ``wake_fd`` when given), its heartbeat to :data:`HEARTBEAT_S`, its HTTP
    server's tick to :data:`HTTP_TICK_S` and its object pulls' first retry to
    :data:`fedmeta.protocol.transport.INITIAL_BACKOFF_S`."""
    from fedmeta.protocol import flower_compat, transport

    transport.apply()
    flower_compat.slow_http_ticks(HTTP_TICK_S)
    wake = waker(wake_fd) if wake_fd is not None else None
    flower_compat.set_supernode_waits(idle_sleep=waits(poll_s, wake=wake), heartbeat_s=HEARTBEAT_S)


def main() -> None:
    poll_s = float(os.environ.get(POLL_ENV, str(IDLE_POLL_S)))
    wake_fd = os.environ.pop(WAKE_ENV, "")
    apply(poll_s, int(wake_fd) if wake_fd.isdigit() else None)
    from fedmeta.protocol import flower_compat

    sys.argv = ["flower-supernode", *sys.argv[1:]]
    flower_compat.run_supernode()


if __name__ == "__main__":
    main()
