"""The coordinator's ServerApp executor: the only process that starts ServerApps on its host.

Flower's SuperLink, in its default ``subprocess`` isolation, starts ``flower-superexec``, which
starts ``flwr-serverapp`` for each run; that process installs the submitted bundle and imports
whatever ServerApp it names, as the SuperLink's own user. fedmeta runs the SuperLink in
``process`` isolation (it launches nothing) and this executor beside it, as a site runs its
SuperNode beside its worker (:mod:`fedmeta.client.worker`):

1. ``python -m fedmeta.deploy.serverexec --socket S --secret-file F`` takes each ServerApp task
   from the SuperLink's Runtime API (``AcquireTask``, signed with a secret only the two share)
   and starts one child for it (the task's token goes in the child's environment, never on its
   command line);
2. the child (``--serve``) pulls the task's input and checks the run's bundle with the same
   :func:`fedmeta.protocol.app.check_bundle` the sites use (publisher/name ``fedmeta/fedmeta``,
   the installed version, no file but ``pyproject.toml``, fedmeta's own pair of components).
   Anything else is refused before any of its code is read or run: written to the
   coordinator's ``audit.jsonl`` as ``app_refused`` and the run ends as failed with the reason;
3. an accepted run is served by the **installed** ``fedmeta.server.app`` (or its SecAgg+ pair):
   nothing is installed from the bundle and nothing is imported from it; its run config is the
   fedmeta bundle's own defaults (:func:`fedmeta.protocol.app.render_pyproject`) with the run's
   overrides.

The child does what Flower's ``flwr-serverapp`` does around the app (heartbeat, the run's log
uploaded to the SuperLink for ``fedmeta run``'s stream, the final status) with Flower's own
functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The child's environment variable holding its task's token.
TOKEN_ENV = "FEDMETA_SERVERAPP_TOKEN"
#: The longest wait between two asks for a ServerApp task just after one (runs submitted
#: together), and once idle: a run submitted to an idle coordinator starts within IDLE_POLL_S.
POLL_S, IDLE_POLL_S = 0.1, 1.0


def _runtime_client(socket: Path, *interceptors: Any, retry: bool = True) -> Any:
    from fedmeta.deploy.control import SOCKET_URL, over_socket
    from fedmeta.protocol.flower_compat import RuntimeHttpClient, make_simple_http_retry_invoker

    client = RuntimeHttpClient(SOCKET_URL, interceptors=list(interceptors),
                               retry_invoker=make_simple_http_retry_invoker() if retry else None)
    over_socket(client, socket)
    return client


def executor(socket: Path, secret: bytes, superlink_pid: int | None) -> None:
    """Take ServerApp tasks and start one ``--serve`` child for each, until the SuperLink exits
    (asking every :data:`POLL_S` after a task, backing off to :data:`IDLE_POLL_S` when idle)."""
    from fedmeta.deploy.processes import pid_alive
    from fedmeta.protocol.flower_compat import (
        SUPEREXEC_PROTECTED_METHODS,
        AcquireTaskRequest,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
        TaskType,
    )
    from fedmeta.protocol.transport import Polling

    client = _runtime_client(socket, RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                             SuperExecAuthHttpInterceptor(master_secret=secret,
                                                          protected_methods=SUPEREXEC_PROTECTED_METHODS),
                             retry=False)
    children: list[subprocess.Popen[bytes]] = []
    polling = Polling.adaptive(busy_s=POLL_S, idle_s=IDLE_POLL_S)
    while superlink_pid is None or pid_alive(superlink_pid):
        children = [c for c in children if c.poll() is None]
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
        except Exception as e:  # noqa: BLE001 - the SuperLink may be starting or stopping
            log.debug("no answer from the SuperLink's Runtime API: %s", e)
            time.sleep(1.0)
            continue
        if res.HasField("task") and res.token:
            env = {**os.environ, TOKEN_ENV: res.token}
            argv = [sys.executable, "-m", "fedmeta.deploy.serverexec", "--serve", "--socket", str(socket),
                    "--parent-pid", str(os.getpid())]
            children.append(subprocess.Popen(argv, env=env))  # noqa: S603 - fixed argv
            log.info("started the ServerApp of task %d (pid %d)", res.task.task_id, children[-1].pid)
            polling.active()
        else:
            time.sleep(polling.next_s())
    for c in children:
        c.terminate()


def run_config(override: dict[str, Any], *, secure_aggregation: bool) -> dict[str, Any]:
    """The run config of an accepted run: the fedmeta bundle's own defaults and the overrides
    (keys the bundle does not declare are an error, as in Flower)."""
    from fedmeta.common.extras import installed_version
    from fedmeta.protocol.app import render_pyproject
    from fedmeta.protocol.flower_compat import flatten_dict, fuse_dicts

    project = tomllib.loads(render_pyproject(version=installed_version(), secure_aggregation=secure_aggregation))
    defaults = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    return dict(fuse_dicts(defaults, override))


def serve(socket: Path, token: str, parent_pid: int | None) -> None:  # noqa: PLR0915 - mirrors Flower's
    """One ServerApp task: check the bundle, then run the installed fedmeta ServerApp.

    The structure is Flower's ``run_serverapp`` (heartbeat, log upload, final status pushed on
    every exit), with the bundle's installation and import replaced by the check and the
    installed app."""
    from queue import Queue

    import httpx
    from flwr.app import Context

    from fedmeta.common.extras import installed_version
    from fedmeta.deploy.control import SOCKET_URL, TIMEOUT_S
    from fedmeta.protocol.app import check_bundle
    from fedmeta.protocol.flower_compat import (
        EventType,
        ExitCode,
        HeartbeatSender,
        PullTaskInputRequest,
        PushTaskOutputRequest,
        SubStatus,
        context_from_proto,
        context_to_proto,
        fab_from_proto,
        flush_logs,
        flwr_exit,
        grid_runtime_client,
        last_try,
        make_task_heartbeat_fn_http,
        mirror_output_to_queue,
        register_signal_handlers,
        run_from_proto,
        set_task_identity,
        socket_grid,
        start_log_uploader,
        start_parent_process_monitor,
        stop_log_uploader,
    )
    from fedmeta.protocol.flower_compat import run_serverapp as run_app
    from fedmeta.server import audit as audit_log

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    grid = socket_grid(str(socket), url=SOCKET_URL, token=token, timeout_s=TIMEOUT_S)
    uploader = None
    heartbeat = None
    context: Context | None = None
    status, details = SubStatus.FAILED, "Task failed with unknown error."
    exit_code = ExitCode.SUCCESS
    refusal: str | None = None

    def on_exit() -> None:
        last_try(grid)
        if uploader:
            flush_logs(log_queue)
        try:
            grid_runtime_client(grid).PushTaskOutput(PushTaskOutputRequest(
                context=context_to_proto(context) if context else None, sub_status=status, details=details))
        except httpx.HTTPError as err:
            log.error("failed to push the task's output: %s", err)
        if uploader:
            stop_log_uploader(log_queue, uploader)
        if heartbeat and heartbeat.is_running:
            heartbeat.stop()
        grid.close()

    register_signal_handlers(event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE,
                             exit_message="Task stopped by user.", exit_handlers=[on_exit])
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid_runtime_client(grid)))
        heartbeat.start()
        res = grid_runtime_client(grid).PullTaskInput(PullTaskInputRequest())
        set_task_identity(run_id=res.run.run_id, node_id=res.context.node_id, task_id=res.task_id)
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        grid.set_run(run)
        uploader = start_log_uploader(log_queue=log_queue, node_id=0, run_id=run.run_id,
                                      client=grid_runtime_client(grid))
        verdict = check_bundle(fab.content, fab_id=run.fab_id, fab_version=run.fab_version,
                               version=installed_version(), allow_secure_aggregation=True)
        if not verdict.accepted:  # the run ends as failed; this process has nothing to report
            refusal = (f"fedmeta refused run {run.run_id}: {verdict.reason} (bundle {fab.hash_str}); "
                       "none of its code ran")
            audit = audit_log.from_env()
            if audit is not None:
                audit.record("app_refused", run_id=int(run.run_id), app=run.fab_id[:100],
                             version=run.fab_version[:50], bundle_sha256=fab.hash_str,
                             reason=verdict.reason[:200])
            details = f"app refused: {verdict.reason}"[:300]
        else:
            if verdict.secure_aggregation:
                from fedmeta.server.secagg_app import app
            else:
                from fedmeta.server.app import app
            context.run_config = run_config(dict(run.override_config),
                                            secure_aggregation=verdict.secure_aggregation)
            context = run_app(grid=grid, context=context, server_app_dir=".", loaded_server_app=app)
            status, details = SubStatus.COMPLETED, ""
            from flwr.app import RecordDict

            context.state = RecordDict()
    except Exception as ex:  # noqa: BLE001 - reported as the run's failure, as Flower does
        log.error("ServerApp raised an exception", exc_info=ex)
        details = f"ServerApp failed with exception: {ex}"
        exit_code = ExitCode.SERVERAPP_EXCEPTION
    flwr_exit(code=exit_code, message=refusal, event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m fedmeta.deploy.serverexec")
    p.add_argument("--socket", type=Path, required=True, help="the SuperLink's API socket")
    p.add_argument("--secret-file", default=None, help="the secret shared with the SuperLink")
    p.add_argument("--superlink-pid", type=int, default=None, help="exit when this process exits")
    p.add_argument("--serve", action="store_true", help="serve the one task in $" + TOKEN_ENV)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.serve:
        token = os.environ.pop(TOKEN_ENV, "")
        if not token:
            sys.exit(f"--serve: ${TOKEN_ENV} is empty")
        serve(args.socket, token, args.parent_pid)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.secret_file is None:
        sys.exit("--secret-file is required")
    secret = Path(args.secret_file).read_bytes()
    executor(args.socket, secret, args.superlink_pid)


if __name__ == "__main__":
    main()
