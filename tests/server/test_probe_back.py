"""A site that missed a round is greeted again without making any round wait: on a deployment the
greeting is pushed, and its answer is collected at a later round. A dead node the SuperLink still
lists as online (its heartbeat not lapsed yet) used to cost every round in that window the
greeting's whole timeout (5 s each, measured with ``fedmeta bench hosts``)."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.date import now

from fedmeta.protocol import flower_compat
from fedmeta.protocol import keys as K


def _metadata(mid: str, src: int, dst: int, reply_to: str = "", ttl: float = 60.0) -> Metadata:
    return Metadata(run_id=7, message_id=mid, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                    group_id="0", created_at=now().timestamp(), ttl=ttl, message_type="query")


class Deployment:
    """Nodes 11 and 12 online at the SuperLink; 12 is dead and never answers; 11 answers once
    ``alive`` is set."""

    delivers_by_push_pull = True

    def __init__(self) -> None:
        self.alive = False
        self.sent: dict[str, tuple[int, float]] = {}  # message id -> (node, ttl)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for m in messages:
            mid = f"m{len(self.sent)}"
            self.sent[mid] = (m.metadata.dst_node_id, m.metadata.ttl)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        out = []
        for mid in ids:
            if self.sent[mid][0] == 11 and self.alive:
                content = RecordDict({K.SITE: ConfigRecord({"name": "a"}),
                                      K.METRICS: MetricRecord({K.N_TRAIN: 50, K.LAYOUT_OK: 1})})
                out.append(make_message(_metadata(f"r{mid}", 11, SUPERLINK_NODE_ID, reply_to=mid), content=content))
        return out

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return [11, 12]


def test_an_unresponsive_site_is_greeted_without_waiting_and_back_once_it_answers(tmp_path: Path) -> None:
    from fedmeta.common.config import load_config
    from fedmeta.server.driver import PROBE_TTL_S, _Run
    from fedmeta.server.runfolder import RunFolder

    flower_compat.set_task_identity(run_id=7, task_id=0, node_id=0)  # as in the ServerApp
    grid = Deployment()
    said: list[str] = []
    run = _Run(grid, load_config(None, ["algorithm=reptile"]), RunFolder(tmp_path), said.append)  # type: ignore[arg-type]
    run.unresponsive = {11, 12}
    registered = {11: "a", 12: "b"}
    t0 = time.monotonic()
    run.probe([11, 12], registered)
    run.probe([11, 12], registered)  # one greeting per node at a time
    assert time.monotonic() - t0 < 1.0  # nothing waited for
    assert sorted(n for n, _ in grid.sent.values()) == [11, 12]
    assert all(ttl == PROBE_TTL_S for _, ttl in grid.sent.values())
    assert run.unresponsive == {11, 12} and said == []
    grid.alive = True
    run.probe([11, 12], registered)
    assert run.unresponsive == {12} and any("is back" in s for s in said)
    assert len(grid.sent) == 2  # 12's greeting is still alive: no second one
