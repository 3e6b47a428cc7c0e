"""Sending a round's messages and collecting the replies, without waiting for the dead.

Flower's ``Grid.send_and_receive`` polls every 3 s and waits for every reply until its timeout.
:func:`exchange` pushes the messages, polls for replies every ``poll_s`` and stops waiting when

- every node replied, or
- the nodes still owing a reply are offline (the SuperLink's view, from their heartbeats), or
- at least ``quorum`` replied and the others have had ``straggler_factor`` times as long as the
  quorum took (at least ``min_grace_s``), or
- ``timeout_s`` passed.

Messages are built with the round's timeout as their TTL (:mod:`fedmeta.server.strategy`), so
a site that comes back late does not work through stale rounds.

A reply counts only when it comes from the node the message was addressed to. Flower's SuperLink
itself answers for a node it has found unavailable, or for a message that expired: an error whose
sender is the SuperLink (node 1). That node did not reply; it is reported missing, under its own
id (and so under its site's name), with the SuperLink's reason. An in-process grid
(``LocalGrid``, Ray simulation's grid) answers directly through ``send_and_receive``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from fedmeta.protocol import flower_compat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Waiting:
    """How long a round waits: the hard cap, the quorum and the straggler allowance."""

    timeout_s: float
    quorum: int
    straggler_factor: float = 3.0
    min_grace_s: float = 5.0
    poll_s: float = 0.05


@dataclass
class Outcome:
    """The replies, the nodes that never answered and why the wait ended."""

    replies: list[Message] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    ended: str = "all replied"
    seconds: float = 0.0
    undelivered: dict[int, str] = field(default_factory=dict)  # node -> the SuperLink's reason


def _push_pull(grid: Grid) -> bool:
    """Whether ``grid`` delivers by push/pull, where nodes can be slow or gone (a deployment's
    grid, or one that says it behaves like one), rather than directly (the simulation's and the
    in-process grid)."""
    declared = getattr(grid, "delivers_by_push_pull", None)
    if isinstance(declared, bool):
        return declared
    return flower_compat.is_deployed_grid(grid)


def _from_addressees(messages: Sequence[Message], replies: list[Message]) -> list[Message]:
    """The replies sent by nodes that were sent a message (others are logged and dropped)."""
    addressed = {m.metadata.dst_node_id for m in messages}
    kept = []
    for r in replies:
        if r.metadata.src_node_id in addressed:
            kept.append(r)
        else:
            log.warning("dropped a reply from node %d, which was sent nothing (%s)", r.metadata.src_node_id,
                        r.error.reason if r.has_error() else "content")
    return kept


def exchange(grid: Grid, messages: Sequence[Message], waiting: Waiting,
             on_reply: Callable[[Message], None] | None = None) -> Outcome:
    """Send ``messages`` and collect replies as described in the module docstring;
    ``on_reply`` is called with each reply as it arrives (progress)."""
    from fedmeta.server.local_grid import LocalGrid

    t0 = time.monotonic()
    if not messages:
        return Outcome()
    if not _push_pull(grid):
        replies = []
        # an in-process grid answers one message at a time anyway: report each as it comes
        batches = [[m] for m in messages] if isinstance(grid, LocalGrid) and on_reply is not None else [messages]
        for batch in batches:
            for reply in _from_addressees(batch, list(grid.send_and_receive(list(batch), timeout=waiting.timeout_s))):
                replies.append(reply)
                if on_reply is not None:
                    on_reply(reply)
        answered = {m.metadata.src_node_id for m in replies}
        missing = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered]
        return Outcome(replies, missing, "all replied" if not missing else "timeout",
                       time.monotonic() - t0)
    ids = list(grid.push_messages(messages))
    pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
    out = Outcome()
    quorum_at: float | None = None
    last_liveness = 0.0
    online: set[int] = set(pending.values())
    while pending:
        now = time.monotonic()
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.metadata.src_node_id != node:  # the SuperLink answering for the node
                why = (reply.error.reason or "an error") if reply.has_error() else \
                    f"a reply sent by node {reply.metadata.src_node_id}"
                out.undelivered[node] = why[:200]
                log.warning("node %d did not reply: %s", node, out.undelivered[node])
                continue
            out.replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        if not pending:
            break
        elapsed = time.monotonic() - t0
        if quorum_at is None and len(out.replies) >= waiting.quorum:
            quorum_at = elapsed
        if now - last_liveness >= 1.0:
            online = set(grid.get_node_ids())
            last_liveness = now
        if all(node not in online for node in pending.values()):
            out.ended = "the remaining sites went offline"
            break
        if quorum_at is not None and elapsed >= max(waiting.min_grace_s,
                                                   waiting.straggler_factor * quorum_at):
            out.ended = "stragglers left behind"
            break
        if elapsed >= waiting.timeout_s:
            out.ended = "timeout"
            break
        time.sleep(waiting.poll_s)
    if out.undelivered and not pending:
        out.ended = "the SuperLink reported the remaining sites unavailable"
    out.missing = sorted({*pending.values(), *out.undelivered})
    out.seconds = time.monotonic() - t0
    if out.missing:
        log.warning("no reply from nodes %s (%s after %.1f s)", out.missing, out.ended, out.seconds)
    return out
