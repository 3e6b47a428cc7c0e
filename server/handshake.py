"""Greeting the sites: which node is which hospital, and how many training rows it declares.

The coordinator sends every connected node it does not know yet a ``hello`` (a QUERY message
carrying the experiment); each site answers with its name and split sizes (counts only). The
declared training rows later bound the weight a site's reply may claim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.errors import FedmetaError
from fedmeta.protocol import keys as K
from fedmeta.protocol.records import count_in

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sites:
    """The sites the coordinator knows: node id -> site name, and the training rows each
    declared at the handshake."""

    names: dict[int, str] = field(default_factory=dict)
    n_train: dict[int, int] = field(default_factory=dict)

    def merged(self, other: Sites) -> Sites:
        """These sites plus ``other``'s; a site reconnecting under a new node id replaces its old
        one."""
        renamed = set(other.names.values())
        names = {n: s for n, s in self.names.items() if s not in renamed}
        n_train = {n: c for n, c in self.n_train.items() if n in names}
        return Sites(names | other.names, n_train | other.n_train)


def wait_for_nodes(grid: Grid, n: int, timeout_s: float) -> list[int]:
    """The connected node ids once at least ``n`` are connected; an error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise FedmetaError(
                f"only {len(nodes)} site(s) connected within {timeout_s:.0f} s; need {n} "
                "(federation.min_nodes)"
            )
        time.sleep(1.0)


def handshake(grid: Grid, cfg: ExperimentConfig, expected: int, progress: Progress,
              known: Sites | None = None) -> Sites:
    """Greet every connected node not in ``known``; returns all the sites known afterwards.
    With ``known`` it does not wait for more nodes to connect."""
    known = known or Sites()
    nodes = (wait_for_nodes(grid, expected, cfg.federation.timeout_s) if not known.names
             else sorted(n for n in grid.get_node_ids() if n not in known.names))
    if known.names and not nodes:
        return known
    content = RecordDict({K.CONFIG: ConfigRecord({K.PHASE: K.HELLO, K.EXPERIMENT: cfg.to_json()})})
    msgs = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    names: dict[int, str] = {}
    n_train: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=cfg.federation.timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed the handshake: %s", node, reply.error.reason)
            continue
        names[node] = str(reply.content[K.SITE]["name"])
        try:
            n_train[node] = count_in(reply.content[K.METRICS], K.N_TRAIN)
        except (KeyError, ValueError) as e:
            log.warning("node %d sent a malformed handshake (%s); not admitted", node, e)
            names.pop(node, None)
    dupes = {s for s in names.values() if list(names.values()).count(s) > 1}
    if dupes:
        raise FedmetaError(f"two nodes claim the same site {sorted(dupes)[0]!r}; check node configs")
    if names:
        progress(f"{len(names)} site(s) joined: {', '.join(sorted(names.values()))}")
    return known.merged(Sites(names, n_train))


def by_name(sites: Mapping[int, str]) -> list[int]:
    """Node ids ordered by site name (then id): the order replies are processed in."""
    return sorted(sites, key=lambda n: (sites[n], n))
