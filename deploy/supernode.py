"""``python -m fedmeta.deploy.supernode ARGS``: Flower's ``flower-supernode``, with its waits set.

Flower 1.39's SuperNode asks the SuperLink for work every 3 s when idle (a hard-coded
``time.sleep(3)`` in ``flwr.supernode.start_client_internal``) and announces a 30 s heartbeat,
so a crashed hospital is noticed only after a minute and cannot rejoin before. This entry point
runs the same ``flower-supernode`` after setting

- the idle poll to at most ``$FEDMETA_SUPERNODE_POLL_S`` seconds (default 0.5), 20 ms right after
  a message and growing by half each idle poll, and the 0.5 s waits for the worker's reply to
  20 ms (they read the node's own memory), and
- the node heartbeat to Flower's shortest allowed interval (10 s: the SuperLink marks a silent
  node offline after 20 s).

Both are patch points of :mod:`fedmeta.protocol.flower_compat`, which names them if a Flower
upgrade moves them (and a test fails).
"""

from __future__ import annotations

import os
import sys
import time

POLL_ENV = "FEDMETA_SUPERNODE_POLL_S"
HEARTBEAT_S = 10


def apply(poll_s: float) -> None:
    """Set the SuperNode's idle poll (at most ``poll_s``: :class:`~fedmeta.protocol.transport.
    Polling`, quick right after a message), its waits for the worker's reply (quick: they only
    look at the node's own memory), its heartbeat to :data:`HEARTBEAT_S` and its object pulls'
    first retry to :data:`fedmeta.protocol.transport.INITIAL_BACKOFF_S`."""
    from fedmeta.protocol import flower_compat, transport

    transport.apply()
    idle = transport.Polling.up_to(poll_s)

    def sleep(seconds: float) -> None:
        if seconds >= 1.0:  # Flower's idle poll (3 s) between two PullMessages to the SuperLink
            time.sleep(idle.next_s())
        else:  # 0.5 s: waiting for the worker's reply, or for its objects, in the node's memory
            idle.active()
            time.sleep(min(seconds, transport.FAST_POLL_S))

    flower_compat.set_supernode_waits(idle_sleep=sleep, heartbeat_s=HEARTBEAT_S)


def main() -> None:
    poll_s = float(os.environ.get(POLL_ENV, "0.5"))
    apply(poll_s)
    from fedmeta.protocol import flower_compat

    sys.argv = ["flower-supernode", *sys.argv[1:]]
    flower_compat.run_supernode()


if __name__ == "__main__":
    main()
