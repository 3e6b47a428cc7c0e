"""Collecting a round's replies on a deployment: a node the SuperLink reports unavailable is
missing under its own id (and so under its site's name), never a reply "from node 1"."""

from __future__ import annotations

from flwr.app import ConfigRecord, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.date import now

from fedmeta.server.exchange import Waiting, exchange


def _metadata(mid: str, src: int, dst: int, reply_to: str = "") -> Metadata:
    return Metadata(run_id=7, message_id=mid, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                    group_id="3", created_at=now().timestamp(), ttl=60.0, message_type="train")


class SuperLinkStandIn:
    """A SuperLink stand-in: node 11 answers; node 12 is dead, and the SuperLink answers for it
    with Flower's own 'node unavailable' error on the second pull."""

    delivers_by_push_pull = True  # as a deployment's grid does

    def __init__(self) -> None:
        self.pulls = 0
        self.sent: dict[str, Metadata] = {}

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{i}"
            self.sent[mid] = _metadata(mid, SUPERLINK_NODE_ID, m.metadata.dst_node_id)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        out = []
        for mid in ids:
            dst = self.sent[mid].dst_node_id
            if dst == 11:
                out.append(make_message(_metadata(f"r{mid}", 11, SUPERLINK_NODE_ID, reply_to=mid),
                                        content=RecordDict({"metrics": ConfigRecord({"ok": 1})})))
            elif self.pulls >= 2:
                out.append(create_message_error_unavailable_res_message(self.sent[mid], "node_unavail"))
        return out

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return [11, 12]  # the SuperLink still lists 12 as online: only its error tells


def test_a_node_the_superlink_reports_unavailable_is_missing_under_its_own_id() -> None:
    grid = SuperLinkStandIn()
    messages = [make_message(_metadata("", SUPERLINK_NODE_ID, dst), content=RecordDict()) for dst in (11, 12)]
    seen = []
    out = exchange(grid, messages, Waiting(timeout_s=30, quorum=2, poll_s=0.001), on_reply=seen.append)  # type: ignore[arg-type]
    assert [r.metadata.src_node_id for r in out.replies] == [11] and seen == out.replies
    assert out.missing == [12]
    assert "unavailable" in out.undelivered[12].lower()
    assert out.ended == "the SuperLink reported the remaining sites unavailable"
    assert out.seconds < 5  # not the round timeout


def test_a_deployment_s_grid_is_recognised_by_its_type_and_others_are_not() -> None:
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedmeta.server.exchange import _push_pull
    from fedmeta.server.local_grid import LocalGrid

    class Renamed(InMemoryGrid):  # a class name proves nothing
        pass

    Renamed.__name__ = "HttpGrid"
    assert _push_pull(HttpGrid.__new__(HttpGrid))
    assert not _push_pull(Renamed.__new__(Renamed))
    assert not _push_pull(InMemoryGrid.__new__(InMemoryGrid))
    assert not _push_pull(LocalGrid.__new__(LocalGrid))
    assert _push_pull(SuperLinkStandIn())
