"""The hospital's site worker: the only process that computes for the federation at a site.

The hospital's SuperNode runs in Flower's ``process`` isolation: it launches nothing. This worker
(started by ``fedmeta site start`` beside it) takes each task from the SuperNode's Runtime API
(``AcquireTask``, signed with a secret only the two share), and for each one

1. checks the run's app bundle (:func:`fedmeta.protocol.app.check_bundle`): anything but the
   fedmeta app this hospital installed and pinned is refused before any data is read, answered
   with the code "app refused", and written to the site's own audit log;
2. parses the request once (:func:`fedmeta.protocol.request.parse_request`): a message with
   records or entries its phase does not carry, or with more than one experiment, is refused
   as a bad request before any data is read;
3. checks that parsed request against the site's policy
   (:func:`fedmeta.sitecore.policy.check_request`);
4. answers that same parsed request with the *installed* fedmeta handlers
   (:mod:`fedmeta.client.app`), in this process, so torch is imported once and the site's data
   stays loaded between rounds and runs;
5. replies only with what the handlers return, or, on any failure, a fixed code and a short
   category (:mod:`fedmeta.protocol.errors`); the full message stays in the site's log.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import MessageType

from fedmeta.client.app import answer
from fedmeta.common import deadline
from fedmeta.protocol import keys as K
from fedmeta.protocol.app import check_bundle
from fedmeta.protocol.errors import SiteErrorCode, classify, reason
from fedmeta.protocol.flower_compat import (
    SUPEREXEC_PROTECTED_METHODS,
    AcquireTaskRequest,
    HeartbeatSender,
    RetryInvoker,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SendTaskHeartbeatRequest,
    SubStatus,
    SuperExecAuthHttpInterceptor,
    TaskType,
    exponential,
    pull_task_input,
    push_message,
    push_task_output,
)
from fedmeta.protocol.request import SiteRequest, parse_request
from fedmeta.protocol.transport import Polling
from fedmeta.sitecore.ledger import RequestLedger
from fedmeta.sitecore.policy import SitePolicy, check_request

log = logging.getLogger(__name__)


Audit = Callable[..., object]

#: How long one task's calls keep retrying while the SuperNode does not answer (``fedmeta site
#: start`` is restarting it); then the task is abandoned and the worker takes the next one.
TASK_RETRY_S = 30.0
_RETRY_STATUS = frozenset({503, 504})
#: The longest wait between two asks for a task while a run's tasks come (within
#: :data:`fedmeta.protocol.transport.BUSY_HOLD_S` of the last one), and once the site is idle.
#: The SuperNode wakes the worker when a message arrives (:class:`Wakeup`), so the idle ceiling
#: bounds the wait only if that wake-up is lost.
BUSY_POLL_S, IDLE_POLL_S = 0.1, 5.0
#: The wait before asking again when the SuperNode does not answer (it is (re)starting).
UNREACHABLE_WAIT_S = 1.0


def retry_invoker(max_time: float | None) -> RetryInvoker:
    """Retries for the worker's calls to its SuperNode: connection errors and 503/504 are retried
    (growing waits, at most ``max_time`` seconds; ``0`` means one try); any other answer, such as
    401 for the token of a task an earlier SuperNode handed out, ends the call with its error.

    Flower's own HTTP retry policy (``make_simple_http_retry_invoker``) is made for a one-task
    ClientApp process: on a 401 it sends SIGINT to its own process. In the site worker, that
    process is ``fedmeta site start``, which would stop whenever a SuperNode restarted under a
    task in flight.
    """
    import httpx

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in _RETRY_STATUS
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=1 if max_time == 0 else None,
        max_time=None if max_time == 0 else max_time,
        should_giveup=give_up,
    )


def task_heartbeat(client: RuntimeHttpClient, lost: threading.Event | None = None) -> Callable[[], bool]:
    """A task's heartbeat to the SuperNode that never signals the process (Flower's sends
    SIGINT when the SuperNode no longer knows the task); a lost task is logged and ``lost`` is
    set, so that the request's loops stop computing a reply nobody will take
    (:mod:`fedmeta.common.deadline`)."""
    import httpx

    request = SendTaskHeartbeatRequest()
    warned = threading.Event()

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        if not res.success and not warned.is_set():
            warned.set()
            if lost is not None:
                lost.set()
            log.warning("the SuperNode no longer knows the task in progress (it restarted, or "
                        "the task ended); its work is abandoned")
        return True

    return beat


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker needs: the Runtime API address, the shared secret, the site's node
    config (its data), policy and pinned version, and where refusals are written."""

    runtime_address: str
    secret: bytes
    node_config: Mapping[str, str | int]
    policy: SitePolicy
    version: str
    #: the longest wait between two asks for a task once idle (:data:`IDLE_POLL_S`); at most
    #: :data:`BUSY_POLL_S` while tasks come
    poll_s: float = IDLE_POLL_S
    #: where the site counts what it served (its disclosure budget); None: in memory
    ledger_path: Path | None = None
    #: the read end of the pipe the SuperNode writes to when a message arrived (:class:`Wakeup`);
    #: the worker closes it when it stops
    wake_fd: int | None = None


class Wakeup:
    """The worker's waits between two asks for a task: until ``seconds`` have passed, the worker
    is stopped, or (given ``fd``, a pipe's read end) its SuperNode wrote to the pipe: it has just
    stored a message for the worker (:func:`fedmeta.deploy.supernode.waker`)."""

    def __init__(self, stop: threading.Event, fd: int | None = None) -> None:
        self.stop = stop
        self.fd = fd
        self._woken = False
        if fd is not None:
            os.set_blocking(fd, False)

    def wait(self, seconds: float) -> bool:
        """Wait; True once stopped."""
        if self.fd is None or seconds <= 0:
            return self.stop.wait(seconds)
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if ready:
            self._woken = self._drain() or self._woken
        return self.stop.is_set()

    def woken(self) -> bool:
        """Whether the SuperNode wrote since the last call."""
        woken, self._woken = self._woken, False
        return woken

    def _drain(self) -> bool:
        assert self.fd is not None
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False


class SiteWorker:
    """Serves the SuperNode's tasks with the installed fedmeta ClientApp until :meth:`stop`."""

    def __init__(self, settings: WorkerSettings, audit: Audit) -> None:
        self.settings = settings
        self.audit = audit
        self._stop = threading.Event()
        self._app: ClientApp | None = None
        self.ledger = RequestLedger(settings.ledger_path)
        self.served = 0
        self.refused = 0

    def stop(self) -> None:
        """Stop after the task in progress (at once when waiting with no ``wake_fd``, else at the
        next wake-up: whoever holds the pipe's write end writes to it)."""
        self._stop.set()

    def _client(self, *interceptors: Any, retry_s: float | None) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.settings.runtime_address, insecure=True, root_certificates=None,
            interceptors=list(interceptors), retry_invoker=retry_invoker(retry_s),
        )

    def _secagg_app(self) -> ClientApp:
        if self._app is None:
            from fedmeta.client.secagg_app import make_app

            self._app = make_app()
        return self._app

    def warm_up(self) -> None:
        """Import what the first task would, while the SuperNode is still connecting: the
        handlers and torch's compiler package, which ``torch.func.grad`` imports on first use
        (1-2 s; the first training round of a run paid it)."""
        t0 = time.monotonic()
        try:
            import torch._dynamo  # noqa: F401

            import fedmeta.client.app  # noqa: F401
        except Exception as e:  # noqa: BLE001 - the first task will import (and report) it again
            log.warning("warm-up failed: %s: %s", type(e).__name__, e)
        log.debug("warm-up took %.1f s", time.monotonic() - t0)

    def run(self) -> None:
        """Warm up, then poll for tasks and serve them until stopped."""
        from fedmeta.protocol import transport

        transport.apply()  # a task's message is pulled from the SuperNode (see that module)
        self.warm_up()
        polling = transport.Polling.adaptive(busy_s=BUSY_POLL_S, idle_s=self.settings.poll_s)
        client = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                              SuperExecAuthHttpInterceptor(master_secret=self.settings.secret,
                                                           protected_methods=SUPEREXEC_PROTECTED_METHODS),
                              retry_s=0)  # serve_tasks waits and asks again

        def acquire() -> str | None:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            return res.token if res.HasField("task") and res.token else None

        wakeup = Wakeup(self._stop, self.settings.wake_fd)
        try:
            serve_tasks(acquire, self.serve, polling, wakeup.wait, woken=wakeup.woken)
        finally:
            client.close()
            if self.settings.wake_fd is not None:
                os.close(self.settings.wake_fd)  # handed over by the site runner: the worker's now

    def serve(self, token: str) -> None:
        """Serve one task: check its app, answer with the installed ClientApp, push the reply."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token), retry_s=TASK_RETRY_S)
        lost = threading.Event()
        heartbeat = HeartbeatSender(task_heartbeat(client, lost))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        status, details = SubStatus.FAILED, "refused"
        try:
            message, context, run, fab = pull_task_input(client)
            verdict = check_bundle(fab.content, fab_id=run.fab_id, fab_version=run.fab_version,
                                   version=self.settings.version,
                                   allow_secure_aggregation=self.settings.policy.allow_secure_aggregation)
            if not verdict.accepted:
                self.refused += 1
                log.warning("refused run %d: %s (bundle %s)", run.run_id, verdict.reason, fab.hash_str)
                self.audit("app_refused", run_id=int(run.run_id), app=run.fab_id[:100],
                           version=run.fab_version[:50], bundle_sha256=fab.hash_str,
                           reason=verdict.reason[:200])
                reply = Message(Error(code=int(SiteErrorCode.APP_REFUSED),
                                      reason=reason(SiteErrorCode.APP_REFUSED)), reply_to=message)
            else:
                # the site decides its data and the floor under every number it releases
                context.node_config = {**self.settings.node_config,
                                       K.MIN_PATIENTS: self.settings.policy.min_patients}
                reply = self._answer(message, context, run_id=int(run.run_id),
                                     secure_aggregation=verdict.secure_aggregation, cancelled=lost)
                status, details = SubStatus.COMPLETED, ""
            push_message(client, reply, context)
        except Exception as e:  # noqa: BLE001 - a broken task must never stop the worker
            log.error("task failed outside the app: %s\n%s", e, traceback.format_exc())
        finally:
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except Exception as e:  # noqa: BLE001 - e.g. the SuperNode restarted under the task
                log.error("task status not delivered: %s", e)
            finally:
                heartbeat.stop()
                client.close()

    def _answer(self, message: Message, context: Context, *, run_id: int, secure_aggregation: bool,
                cancelled: threading.Event | None = None) -> Message:
        """The reply to one request, or a code and category when anything goes wrong.

        The request is parsed once; the policy checks that object and the handler computes from
        it. Nothing else reads the message. The whole request runs within the policy's
        ``max_request_seconds`` and stops once its message expired or ``cancelled`` is set (its
        task was abandoned), at the next check of its loops (:mod:`fedmeta.common.deadline`)."""
        t0 = time.monotonic()
        kind = message.metadata.message_type
        server_round = _round_of(message)
        request: SiteRequest | None = None
        try:
            with deadline.within(self.settings.policy.max_request_seconds, cancelled=cancelled,
                                 expires=_expiry(message)):
                request = parse_request(message, secure_aggregation=secure_aggregation)
                if secure_aggregation:
                    reply = self._serve_secagg(message, context, request)
                else:
                    assert request is not None  # a plain run's requests always parse to one
                    self._check(request, context, secure_aggregation=False)
                    reply = Message(content=answer(request, context), reply_to=message)
        except Exception as e:  # noqa: BLE001 - classified below; the text never leaves the site
            code = classify(e)
            log.error("run %d, %s of round %d: %s: %s\n%s", run_id, kind, server_round,
                      type(e).__name__, e, traceback.format_exc())
            rule = {"rule": str(e)[:200]} if code is SiteErrorCode.POLICY_REFUSAL else {}
            self.audit("request_failed", run_id=run_id, round=server_round, phase=kind,
                       algorithm=request.algorithm if request is not None else None,
                       category=reason(code)[:200], **rule)  # a refusal's rule: policy values and counts
            return Message(Error(code=int(code), reason=reason(code, e)), reply_to=message)
        self.served += 1
        examples = None
        if reply.has_content() and K.METRICS in reply.content.metric_records:
            value = reply.content[K.METRICS].get(K.NUM_EXAMPLES)
            examples = int(value) if isinstance(value, int | float) else None
        self.audit("request_served", run_id=run_id, round=server_round, phase=kind,
                   step=request.phase if request is not None else "secagg-protocol",
                   algorithm=request.algorithm if request is not None else None,
                   num_examples=examples, seconds=round(time.monotonic() - t0, 3))
        return reply

    def _check(self, request: SiteRequest, context: Context, *, secure_aggregation: bool,
               secagg_threshold: int | None = None) -> None:
        from fedmeta.client.app import site_of

        policy = self.settings.policy
        run_id = int(context.run_id)

        def spend_epsilon() -> None:  # before any data is read; a greeting only checks
            if request.phase in (K.HELLO, K.COUNTS, K.TRAIN):
                self.ledger.spend_epsilon(policy, request.experiment, run_id=run_id,
                                          release=request.phase == K.TRAIN)

        check_request(policy, request, site=lambda: site_of(context, request.experiment),
                      secure_aggregation=secure_aggregation, secagg_threshold=secagg_threshold,
                      before_data=spend_epsilon)
        kind = {MessageType.EVALUATE: "evaluate", MessageType.TRAIN: "train"}.get(request.message_type, "query")
        self.ledger.charge(policy, run_id=run_id, kind=kind)

    def _serve_secagg(self, message: Message, context: Context, request: SiteRequest | None) -> Message:
        """A SecAgg+ step: the protocol's own steps (no experiment, no data) go straight to
        Flower's mod; the step that computes the delta is checked, then served with that
        checked request."""
        from fedmeta.client.secagg_app import serving

        if request is None:
            return self._secagg_app()(message, context)
        self._check(request, context, secure_aggregation=True, secagg_threshold=_secagg_threshold(context))
        with serving(request):
            return self._secagg_app()(message, context)


def serve_tasks(acquire: Callable[[], str | None], serve: Callable[[str], None], polling: Polling,
                wait: Callable[[float], bool], woken: Callable[[], bool] = lambda: False) -> None:
    """Ask for a task (``acquire``: its token, or None when there is none), serve it and ask again
    at once; when there is none, wait ``polling``'s next wait (short after a task, backing off to
    its idle ceiling), so that an idle site asks rarely and a task that comes after any idle time
    is taken at most that ceiling after it arrived. ``wait(seconds)`` returns True once stopped
    (:meth:`Wakeup.wait`); it may return early, and when ``woken()`` says the SuperNode has just
    taken a message, the polls are quick again at once. An ``acquire`` that raises (the SuperNode
    is (re)starting) is asked again after :data:`UNREACHABLE_WAIT_S`."""
    while not wait(0.0):
        try:
            token = acquire()
        except Exception as e:  # noqa: BLE001 - the SuperNode may be (re)starting
            log.debug("no answer from the SuperNode's Runtime API: %s", e)
            if wait(UNREACHABLE_WAIT_S):
                return
            continue
        if token:
            serve(token)
            polling.active()  # the next round's task comes soon: look again quickly
        elif wait(polling.next_s()):
            return
        elif woken():
            polling.active()


def _secagg_threshold(context: Context) -> int | None:
    """The reconstruction threshold this node's SecAgg+ setup step recorded (None before it)."""
    state = context.state.config_records.get("secaggplus_state")
    value = state.get("threshold") if state is not None else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _expiry(message: Message) -> float | None:
    """When ``message``'s reply would have no time left to live (Flower gives a reply what
    remains of the request's ``created_at + ttl``, on the same clocks it already relies on)."""
    meta = message.metadata
    created, ttl = getattr(meta, "created_at", None), getattr(meta, "ttl", None)
    if not isinstance(created, int | float) or not isinstance(ttl, int | float) or created <= 0 or ttl <= 0:
        return None
    return float(created) + float(ttl)


def _round_of(message: Message) -> int:
    try:
        value = message.content[K.CONFIG].get(K.ROUND, 0) if K.CONFIG in message.content.config_records else 0
        return int(value) if isinstance(value, int | float) else 0
    except Exception:  # noqa: BLE001 - only for the log line
        return 0
