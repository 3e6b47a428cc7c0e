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

Both are plain attribute changes on the pinned Flower version, checked by
:func:`patch_points_present` (and by a test), so an upgrade that moves them fails loudly.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from types import SimpleNamespace

POLL_ENV = "FEDMETA_SUPERNODE_POLL_S"
HEARTBEAT_S = 10


def patch_points_present() -> bool:
    """Whether the pinned Flower still has the waits this module sets."""
    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    return ("time.sleep(3)" in source and hasattr(connection, "HEARTBEAT_DEFAULT_INTERVAL")
            and hasattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"))


def apply(poll_s: float) -> None:
    """Set the SuperNode's idle poll (at most ``poll_s``: :class:`~fedmeta.protocol.transport.
    Polling`, quick right after a message), its waits for the worker's reply (quick: they only
    look at the node's own memory), its heartbeat to :data:`HEARTBEAT_S` and its object pulls'
    first retry to :data:`fedmeta.protocol.transport.INITIAL_BACKOFF_S`."""
    from fedmeta.protocol import transport

    transport.apply()
    from flwr.client.grpc_rere_client import connection
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal

    if not patch_points_present():
        raise RuntimeError("this Flower version no longer has the SuperNode waits fedmeta sets; "
                           "pin flwr 1.39.0 or update fedmeta.deploy.supernode")
    interval = max(HEARTBEAT_S, constant.HEARTBEAT_MIN_INTERVAL)
    connection.HEARTBEAT_DEFAULT_INTERVAL = interval  # type: ignore[attr-defined]
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval  # type: ignore[attr-defined]

    idle = transport.Polling.up_to(poll_s)

    def sleep(seconds: float) -> None:
        if seconds >= 1.0:  # Flower's idle poll (3 s) between two PullMessages to the SuperLink
            time.sleep(idle.next_s())
        else:  # 0.5 s: waiting for the worker's reply, or for its objects, in the node's memory
            idle.active()
            time.sleep(min(seconds, transport.FAST_POLL_S))

    start_client_internal.time = SimpleNamespace(  # type: ignore[assignment]
        sleep=sleep, time=time.time, monotonic=time.monotonic, perf_counter=time.perf_counter)


def main() -> None:
    poll_s = float(os.environ.get(POLL_ENV, "0.5"))
    apply(poll_s)
    from flwr.common.logger import update_console_handler

    # the SuperNode's output goes to the site's log file: timestamps, no colour codes
    update_console_handler(timestamps=True, colored=False)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *sys.argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
