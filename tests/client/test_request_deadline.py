"""A request's wall time at the site: past the policy's max_request_seconds the worker stops
computing and answers "request timeout"; a request whose task was abandoned stops too.

Each test times the same request without the ceiling (or the cancellation) as its control arm:
it really runs longer than the ceiling, so the stop is the ceiling's doing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

from fedmeta.client import worker as W
from fedmeta.client.app import site_of
from fedmeta.common import deadline
from fedmeta.common.config import load_config
from fedmeta.common.experiment import initial_parameters
from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import SiteErrorCode
from fedmeta.protocol.records import record_from_arrays
from fedmeta.sitecore.data import spec_of
from fedmeta.sitecore.policy import SitePolicy

NODE = {"source": "fed-heart", "partition-id": 0}  # Cleveland: 200 training patients
# compliant with the default policy's ceilings, and slow: 256 tasks of 100 inner steps, per task
SLOW_TRAIN = ["algorithm=reptile", "rounds=5", "inner.steps=100", "tasks.meta_batch=64",
              "tasks.meta_batches=4", "engine.impl=loop"]
SLOW_EVAL = ["algorithm=reptile", "rounds=5", "eval.adapt_steps=1000", "eval.bootstrap=0", "eval.folds=5",
             "eval.repeats=1"]


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    from fedmeta.client.app import app
    from fedmeta.server.local_grid import LocalGrid

    LocalGrid(app, [])


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={**NODE, "min-patients": 20}, state=RecordDict(),
                   run_config={})


def _message(overrides: list[str], phase: str, ttl: float | None = None) -> Message:
    cfg = load_config(None, overrides)
    theta = {k: np.zeros_like(v) for k, v in
             initial_parameters(cfg, spec_of(site_of(_context(), cfg))).items()}
    config = ConfigRecord({K.EXPERIMENT: cfg.to_json(), K.ROUND: 1, K.PHASE: phase})
    kind = MessageType.TRAIN if phase == K.TRAIN else MessageType.EVALUATE
    return Message(content=RecordDict({K.CONFIG: config, K.ARRAYS: record_from_arrays(theta)}),
                   message_type=kind, dst_node_id=1, ttl=ttl)


def _serve(overrides: list[str], phase: str, seconds: float, cancel_after: float | None = None,
           ttl: float | None = None) -> tuple[Message, float, list[tuple[str, dict]]]:
    audit: list[tuple[str, dict]] = []
    settings = W.WorkerSettings(runtime_address="127.0.0.1:1", secret=b"s" * 32, node_config=NODE,
                                policy=SitePolicy(max_request_seconds=seconds), version="0")
    worker = W.SiteWorker(settings, audit=lambda e, **f: audit.append((e, f)))
    site_of(_context(), load_config(None, overrides))  # the site's data loaded, as at a running site
    message = _message(overrides, phase, ttl)
    lost = threading.Event()
    if cancel_after is not None:
        threading.Timer(cancel_after, lost.set).start()
    t0 = time.monotonic()
    reply = worker._answer(message, _context(), run_id=1, secure_aggregation=False, cancelled=lost)
    return reply, time.monotonic() - t0, audit


@pytest.mark.slow  # about 25 s: the control arm runs each request in full
@pytest.mark.parametrize(("overrides", "phase"), [(SLOW_TRAIN, K.TRAIN), (SLOW_EVAL, K.EVALUATE)])
def test_a_request_past_the_wall_time_ceiling_is_stopped_and_answered_with_a_timeout(overrides, phase) -> None:
    full, full_s, _ = _serve(overrides, phase, seconds=3600)  # control: what the request costs
    assert not full.has_error() and full_s > 3.0, full_s
    reply, took, audit = _serve(overrides, phase, seconds=1.0)
    assert reply.has_error() and reply.error.code == SiteErrorCode.TIMEOUT
    assert reply.error.reason == "request timeout: past the site's max_request_seconds"
    assert 1.0 < took < 2.5 and took < full_s / 2, (took, full_s)  # stopped within one loop iteration
    assert audit[-1] == ("request_failed", {"run_id": 1, "round": 1, "phase": full.metadata.message_type,
                                            "algorithm": "reptile", "category": reply.error.reason})


def test_an_abandoned_task_stops_computing() -> None:
    """The heartbeat finds the SuperNode no longer knows the task: the loops stop at their next
    check and the reply says so (the SuperNode would refuse a reply anyway). The same request
    served in full takes 11 s or more (the control arm of the test above)."""
    reply, took, _ = _serve(SLOW_TRAIN, K.TRAIN, seconds=3600, cancel_after=0.5)
    assert reply.has_error() and reply.error.code == SiteErrorCode.CANCELLED
    assert 0.5 < took < 1.5, took


def test_a_request_whose_message_expired_stops_computing() -> None:
    """A message lives ``ttl`` seconds from its creation (a training round's: federation.timeout_s);
    a reply after that has no time left and is dropped, as it is once the run stopped. The site
    stops computing then, whatever its own ceiling; the same request in full takes 11 s or more."""
    reply, took, _ = _serve(SLOW_TRAIN, K.TRAIN, seconds=3600, ttl=1.0)
    assert reply.has_error() and reply.error.code == SiteErrorCode.CANCELLED
    assert took < 1.5, took


def test_a_lost_task_s_heartbeat_sets_the_cancel_event() -> None:
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse  # pylint: disable=E0611

    class Client:
        known = True

        def SendTaskHeartbeat(self, _request):  # noqa: N802 - Flower's method name
            return SendTaskHeartbeatResponse(success=self.known)

    client, lost = Client(), threading.Event()
    beat = W.task_heartbeat(client, lost)  # type: ignore[arg-type]
    assert beat() and not lost.is_set()
    client.known = False  # the SuperNode restarted, or the task ended
    assert beat() and lost.is_set()


def test_the_deadline_by_a_clock() -> None:
    now = [100.0]
    deadline.check()  # outside a request: nothing to check
    with deadline.within(5.0, clock=lambda: now[0]):
        now[0] = 105.0
        deadline.check()  # at the ceiling: still within
        now[0] = 105.001
        with pytest.raises(deadline.DeadlineExceeded, match="max_request_seconds = 5"):
            deadline.check()
    deadline.check()  # the request's ceiling ends with it
    with pytest.raises(ValueError, match="must be > 0 seconds"), deadline.within(0):
        pass
    wall = [1000.0]
    with deadline.within(None, expires=1010.0, wall=lambda: wall[0]):
        deadline.check()
        wall[0] = 1010.5
        with pytest.raises(deadline.RequestCancelled, match="message expired"):
            deadline.check()
    cancelled = threading.Event()
    with deadline.within(None, cancelled=cancelled):
        deadline.check()
        cancelled.set()
        with pytest.raises(deadline.RequestCancelled):
            deadline.check()
