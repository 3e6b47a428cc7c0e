"""Greeting the sites: who they are, how many training rows they declare, whether their data has
the consortium's layout.

The coordinator sends each new node a ``hello`` (a QUERY message carrying the experiment and the
layout θ was built for); the site answers with its name, its split sizes (counts only) and how
its own data compares with the layout (:mod:`fedmeta.sitecore.layout`). In a deployment the
node's name comes from the consortium registry (:mod:`fedmeta.server.identity`), not from its
answer, and a node whose key is not an active registry entry is never greeted. A site whose data
does not have the layout is excluded from the run, with the differences named. The declared
training rows later bound the weight a site's reply may claim.
"""

from __future__ import annotations

import json
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
from fedmeta.protocol.errors import one_line, refusal_reason
from fedmeta.protocol.records import count_in
from fedmeta.server.exchange import Waiting, exchange
from fedmeta.server.identity import NodeIdentity

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sites:
    """The sites the coordinator knows: node id -> site name, the training rows each declared,
    and the nodes excluded from the run (node id -> why)."""

    names: dict[int, str] = field(default_factory=dict)
    n_train: dict[int, int] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)

    def merged(self, other: Sites) -> Sites:
        """These sites plus ``other``'s; a site reconnecting under a new node id replaces its old
        one."""
        renamed = set(other.names.values())
        names = {n: s for n, s in self.names.items() if s not in renamed}
        n_train = {n: c for n, c in self.n_train.items() if n in names}
        return Sites(names | other.names, n_train | other.n_train, self.excluded | other.excluded)

    def keep(self, nodes: set[int]) -> Sites:
        """Only the sites whose node is in ``nodes`` (e.g. still admitted by the registry)."""
        return Sites({n: s for n, s in self.names.items() if n in nodes},
                     {n: c for n, c in self.n_train.items() if n in nodes}, dict(self.excluded))


def wait_for_nodes(grid: Grid, n: int, timeout_s: float,
                   admitted: Callable[[], NodeIdentity | None] | None = None) -> list[int]:
    """The usable node ids once at least ``n`` are online (admitted by the registry, in a
    deployment); an error naming how many came after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        identity = admitted() if admitted else None
        nodes = sorted(identity.admitted) if identity is not None else sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise FedmetaError(
                f"only {len(nodes)} registered site(s) connected within {timeout_s:.0f} s; need "
                f"{n} (federation.min_nodes)"
            )
        time.sleep(0.5)


def hello_messages(cfg: ExperimentConfig, nodes: list[int], layout: Mapping[str, list], *,
                   ttl: float | None = None) -> list[Message]:
    """A ``hello`` to each of ``nodes`` (living ``ttl`` seconds, default the round's timeout)."""
    config = ConfigRecord({K.PHASE: K.HELLO, K.EXPERIMENT: cfg.to_json(), K.LAYOUT: json.dumps(layout)})
    return [Message(content=RecordDict({K.CONFIG: config}), message_type=MessageType.QUERY,
                    dst_node_id=n, ttl=cfg.federation.timeout_s if ttl is None else ttl) for n in nodes]


def greet(grid: Grid, cfg: ExperimentConfig, nodes: list[int], layout: Mapping[str, list],
          progress: Progress, registered: Mapping[int, str] | None = None) -> Sites:
    """Greet ``nodes``; ``registered`` (deployment) names them, else their answers do."""
    if not nodes:
        return Sites()
    msgs = hello_messages(cfg, nodes, layout)
    log.info("greeting %d site(s)", len(msgs))  # the run's log: when the first message left
    outcome = exchange(grid, msgs, Waiting(timeout_s=cfg.federation.timeout_s, quorum=len(msgs)))
    return read_greetings(outcome.replies, progress, registered)


def read_greetings(replies: list[Message], progress: Progress,
                   registered: Mapping[int, str] | None = None) -> Sites:
    """The sites that answered a ``hello`` in ``replies``, and those excluded (with why)."""
    names: dict[int, str] = {}
    n_train: dict[int, int] = {}
    excluded: dict[int, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        label = (registered or {}).get(node, f"node {node}")
        if reply.has_error():
            why = refusal_reason(reply.error)
            excluded[node] = why
            progress(f"{label} declined the run: {why}")
            continue
        try:
            answered = str(reply.content[K.SITE]["name"])
            n_train[node] = count_in(reply.content.metric_records[K.METRICS], K.N_TRAIN)
            layout_ok = count_in(reply.content.metric_records[K.METRICS], K.LAYOUT_OK) == 1
            details = reply.content.config_records.get(K.LAYOUT)
        except (KeyError, ValueError) as e:
            excluded[node] = f"malformed greeting ({e})"
            log.warning("%s sent a malformed greeting (%s); excluded", label, e)
            continue
        name = registered[node] if registered is not None else answered
        if registered is not None and answered != name:
            # the site's own text never reaches the coordinator's logs: only the registry's name
            log.info("node %d's greeting names another site; the registry's name %r is used", node, name)
        if not layout_ok:
            why = "its data does not have the consortium's layout: " + one_line(str(
                details.get("describe", "") if details is not None else ""))
            excluded[node] = why[:200]
            progress(f"site {name} excluded: {why}")
            continue
        names[node] = name
    if registered is None:
        dupes = {s for s in names.values() if list(names.values()).count(s) > 1}
        if dupes:
            raise FedmetaError(f"two nodes claim the same site {sorted(dupes)[0]!r}; check node configs")
    if names:
        progress(f"{len(names)} site(s) joined: {', '.join(sorted(names.values()))}")
    return Sites(names, n_train, excluded)


def by_name(sites: Mapping[int, str]) -> list[int]:
    """Node ids ordered by site name (then id): the order replies are processed in."""
    return sorted(sites, key=lambda n: (sites[n], n))
