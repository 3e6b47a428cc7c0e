"""An in-process Flower :class:`~flwr.serverapp.Grid`: the ServerApp and the sites' ClientApp in one
process, without Ray.

Every message is serialised to Flower's protobuf form and back on its way to a site and on its way
back, so what the ClientApp receives and what the coordinator gets are exactly what would cross the
network. Used by ``fedmeta simulate --backend local``, the benchmarks (many seeds and methods,
where Ray's 10 s start per run would dominate) and the tests. Fault injection: a site can be made
to drop out (no reply) from a given round on, or to have its reply tampered with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.serverapp import Grid

from fedmeta.protocol import flower_compat
from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import classify, reason
from fedmeta.protocol.records import count_in

log = logging.getLogger(__name__)

Tamper = Callable[[Message], Message]


def _simulated(node_config: dict[str, Any]) -> dict[str, Any]:
    """A simulated node's config: the simulation's patient floor unless the caller set one."""
    return {K.MIN_PATIENTS: K.SIMULATED_FLOOR, **node_config}


def _roundtrip(msg: Message) -> Message:
    return serde.message_from_proto(serde.message_to_proto(msg))


class LocalGrid(Grid):
    """Routes messages to ClientApps held in this process, one :class:`Context` per node."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], *, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run_id = run_id
        flower_compat.set_task_identity(run_id=run_id, task_id=0, node_id=0)
        self.nodes: dict[int, Context] = {}
        for i, node_config in enumerate(node_configs):
            node_id = 1000 + i
            self.nodes[node_id] = Context(
                run_id=run_id, node_id=node_id, node_config=_simulated(node_config),
                state=RecordDict(), run_config={},
            )
        self.run_id = run_id
        self.dropped: dict[int, int] = {}  # node id -> from which server round it stops answering
        self.tampers: dict[int, Tamper] = {}
        self.sent: list[Message] = []  # every message a site sent (after serialisation)
        self.record_sent = False

    def add_node(self, node_config: dict[str, Any]) -> int:
        """Connect another site (e.g. one that joins after the run started); returns its node id."""
        node_id = 1000 + len(self.nodes)
        self.nodes[node_id] = Context(run_id=self.run_id, node_id=node_id, node_config=_simulated(node_config),
                                      state=RecordDict(), run_config={})
        return node_id

    # -- fault injection ---------------------------------------------------------------------------
    def drop(self, node_id: int, from_round: int) -> None:
        self.dropped[node_id] = from_round

    def tamper(self, node_id: int, fn: Tamper) -> None:
        self.tampers[node_id] = fn

    # -- Grid interface -----------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run_id = int(getattr(run, "run_id", run))

    @property
    def run(self) -> Any:
        raise NotImplementedError("LocalGrid has no Run object")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid delivers with send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid delivers with send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            if node_id not in self.nodes:
                raise ValueError(f"message for unknown node {node_id}")
            server_round = self._round_of(msg)
            if node_id in self.dropped and server_round >= self.dropped[node_id]:
                log.info("node %d dropped out (round %d): no reply", node_id, server_round)
                continue
            delivered = _roundtrip(msg)
            flower_compat.set_task_identity(node_id=node_id)
            t = time.monotonic()
            try:
                reply = self.client_app(delivered, self.nodes[node_id])
            except Exception as e:  # noqa: BLE001 - a failing site becomes an error reply, as at a site
                log.warning("node %d raised %s: %s", node_id, type(e).__name__, e)
                code = classify(e)  # what a deployed site's worker sends: a code, never the text
                reply = Message(Error(code=int(code), reason=reason(code, e)), reply_to=delivered)
            finally:
                flower_compat.set_task_identity(node_id=0)
            if reply.metadata.src_node_id != node_id:  # set by Flower from reply_to; keep it honest
                flower_compat.set_reply_source(reply, node_id)
            if node_id in self.tampers:
                reply = self.tampers[node_id](reply)
            reply = _roundtrip(reply)
            if self.record_sent:
                self.sent.append(reply)
            log.debug("node %d answered in %.3f s", node_id, time.monotonic() - t)
            replies.append(reply)
        return replies

    @staticmethod
    def _round_of(msg: Message) -> int:
        if msg.has_content() and K.CONFIG in msg.content.config_records:
            config = msg.content.config_records[K.CONFIG]
            return count_in(config, K.ROUND) if K.ROUND in config else 0
        return 0
