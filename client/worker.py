"""The hospital's site worker: the only process that computes for the federation at a site.

The hospital's SuperNode runs in Flower's ``process`` isolation: it launches nothing. This worker
(started by ``fedmeta site start`` beside it) takes each task from the SuperNode's Runtime API
(``AcquireTask``, signed with a secret only the two share), and for each one

1. checks the run's app bundle (:func:`fedmeta.protocol.app.check_bundle`): anything but the
   fedmeta app this hospital installed and pinned is refused before any data is read, answered
   with the code "app refused", and written to the site's own audit log;
2. checks the request against the site's policy (:mod:`fedmeta.sitecore.policy`);
3. answers with the *installed* fedmeta ClientApp (:mod:`fedmeta.client.app`), in this process,
   so torch is imported once and the site's data stays loaded between rounds and runs;
4. replies only with what the ClientApp returns, or, on any failure, a fixed code and a short
   category (:mod:`fedmeta.protocol.errors`); the full message stays in the site's log.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import MessageType
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedmeta.common.config import ExperimentConfig
from fedmeta.protocol import keys as K
from fedmeta.protocol.app import check_bundle
from fedmeta.protocol.errors import SiteErrorCode, classify, reason
from fedmeta.sitecore.policy import SitePolicy, check_agreement, check_experiment, check_sizes

log = logging.getLogger(__name__)

_ACQUIRE = ("/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks",
            "/flwr.proto.Runtime/ClaimTask")

Audit = Callable[..., object]

#: How long one task's calls keep retrying while the SuperNode does not answer (``fedmeta site
#: start`` is restarting it); then the task is abandoned and the worker takes the next one.
TASK_RETRY_S = 30.0
_RETRY_STATUS = frozenset({503, 504})


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


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task's heartbeat to the SuperNode that never signals the process (Flower's sends
    SIGINT when the SuperNode no longer knows the task); a lost task is only logged."""
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
            log.warning("the SuperNode no longer knows the task in progress (it restarted); "
                        "its reply will be refused")
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
    poll_s: float = 0.1


def _policy_mod(settings: WorkerSettings, *, secure_aggregation: bool) -> Any:
    """A ClientApp mod that checks every request against the site's policy before the handler
    reads any data, and the site's split sizes before it computes."""
    from fedmeta.client.app import site_of

    def mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        cfg = _experiment_in(message)
        if cfg is not None:
            check_experiment(settings.policy, cfg, secure_aggregation=secure_aggregation)
            kind = message.metadata.message_type
            if kind == MessageType.QUERY and _phase_of(message) == K.COUNTS:
                # feature agreement: no site is tabularised yet (there is no vocabulary); the
                # handler thresholds its counts at k >= the policy's min_patients (node config)
                check_agreement(settings.policy, cfg)
                return call_next(message, context)
            site = site_of(context, cfg)
            if kind == MessageType.QUERY:  # the greeting: decline the whole run up front
                check_sizes(settings.policy, cfg, site, phase="train")
                check_sizes(settings.policy, cfg, site, phase="evaluate")
            elif kind in (MessageType.TRAIN, MessageType.EVALUATE):
                check_sizes(settings.policy, cfg, site, phase="train" if kind == MessageType.TRAIN else "evaluate")
        return call_next(message, context)

    return mod


class SiteWorker:
    """Serves the SuperNode's tasks with the installed fedmeta ClientApp until :meth:`stop`."""

    def __init__(self, settings: WorkerSettings, audit: Audit) -> None:
        self.settings = settings
        self.audit = audit
        self._stop = threading.Event()
        self._apps: dict[bool, ClientApp] = {}
        self.served = 0
        self.refused = 0

    def stop(self) -> None:
        self._stop.set()

    def _client(self, *interceptors: Any, retry_s: float | None) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.settings.runtime_address, insecure=True, root_certificates=None,
            interceptors=list(interceptors), retry_invoker=retry_invoker(retry_s),
        )

    def _app(self, secure_aggregation: bool) -> ClientApp:
        if secure_aggregation not in self._apps:
            if secure_aggregation:
                from fedmeta.client.secagg_app import make_app
            else:
                from fedmeta.client.app import make_client_app as make_app  # type: ignore[assignment]
            self._apps[secure_aggregation] = make_app(
                mods=[_policy_mod(self.settings, secure_aggregation=secure_aggregation)])
        return self._apps[secure_aggregation]

    def warm_up(self) -> None:
        """Import what the first task would, while the SuperNode is still connecting: the
        ClientApp and torch's compiler package, which ``torch.func.grad`` imports on first use
        (1-2 s; the first training round of a run paid it)."""
        t0 = time.monotonic()
        try:
            self._app(secure_aggregation=False)
            import torch._dynamo  # noqa: F401
        except Exception as e:  # noqa: BLE001 - the first task will import (and report) it again
            log.warning("warm-up failed: %s: %s", type(e).__name__, e)
        log.debug("warm-up took %.1f s", time.monotonic() - t0)

    def run(self) -> None:
        """Warm up, then poll for tasks and serve them until stopped."""
        from fedmeta.protocol import transport

        transport.apply()  # a task's message is pulled from the SuperNode (see that module)
        self.warm_up()
        polling = transport.Polling.up_to(self.settings.poll_s)
        acquire = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                               SuperExecAuthHttpInterceptor(master_secret=self.settings.secret,
                                                            protected_methods=_ACQUIRE),
                               retry_s=0)  # the loop below waits and asks again
        try:
            while not self._stop.is_set():
                try:
                    res = acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except Exception as e:  # noqa: BLE001 - the SuperNode may be (re)starting
                    log.debug("no answer from the SuperNode's Runtime API: %s", e)
                    self._stop.wait(min(1.0, 10 * self.settings.poll_s))
                    continue
                if res.HasField("task") and res.token:
                    self.serve(res.token)
                    polling.active()  # the next round's task comes soon: look again quickly
                else:
                    self._stop.wait(polling.next_s())
        finally:
            acquire.close()

    def serve(self, token: str) -> None:
        """Serve one task: check its app, answer with the installed ClientApp, push the reply."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token), retry_s=TASK_RETRY_S)
        heartbeat = HeartbeatSender(task_heartbeat(client))
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
                                       "min-patients": self.settings.policy.min_patients}
                reply = self._answer(message, context, run_id=int(run.run_id),
                                     secure_aggregation=verdict.secure_aggregation)
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

    def _answer(self, message: Message, context: Context, *, run_id: int, secure_aggregation: bool) -> Message:
        """The ClientApp's reply, or a code and category when anything goes wrong."""
        t0 = time.monotonic()
        kind = message.metadata.message_type
        server_round = _round_of(message)
        try:
            reply = self._app(secure_aggregation)(message, context)
        except Exception as e:  # noqa: BLE001 - classified below; the text never leaves the site
            code = classify(e)
            log.error("run %d, %s of round %d: %s: %s\n%s", run_id, kind, server_round,
                      type(e).__name__, e, traceback.format_exc())
            self.audit("request_failed", run_id=run_id, round=server_round, phase=kind,
                       category=reason(code)[:200])
            return Message(Error(code=int(code), reason=reason(code, e)), reply_to=message)
        self.served += 1
        examples = None
        if reply.has_content() and K.METRICS in reply.content.metric_records:
            value = reply.content[K.METRICS].get(K.NUM_EXAMPLES)
            examples = int(value) if isinstance(value, int | float) else None
        self.audit("request_served", run_id=run_id, round=server_round, phase=kind,
                   num_examples=examples, seconds=round(time.monotonic() - t0, 3))
        return reply


def _experiment_in(message: Message) -> ExperimentConfig | None:
    """The experiment a request carries, in fedmeta's own messages or in the round config of a
    secure-aggregation (legacy) message; None for the protocol's other steps."""
    import json

    from fedmeta.common.config import config_from_dict

    if not message.has_content():
        return None
    for record in message.content.config_records.values():
        text = record.get(K.EXPERIMENT)
        if isinstance(text, str) and text:
            return config_from_dict(json.loads(text), where="<experiment from coordinator>")
    return None


def _phase_of(message: Message) -> str:
    """The ``phase`` of a fedmeta request ("" when it has none)."""
    if not message.has_content() or K.CONFIG not in message.content.config_records:
        return ""
    return str(message.content[K.CONFIG].get(K.PHASE, ""))


def _round_of(message: Message) -> int:
    try:
        value = message.content[K.CONFIG].get(K.ROUND, 0) if K.CONFIG in message.content.config_records else 0
        return int(value) if isinstance(value, int | float) else 0
    except Exception:  # noqa: BLE001 - only for the log line
        return 0
