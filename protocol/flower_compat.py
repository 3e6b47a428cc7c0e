"""Every use fedmeta makes of Flower's internals, in one module.

fedmeta is built on Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
``flwr.simulation``, ``flwr.server``'s strategies and workflows, ``flwr.client.mod``,
``flwr.common``'s message types) and, where that API has no door, on a few internals of the
pinned Flower (:data:`PINNED`). Those internals are reached from here only (``tests/test_layers.py``
fails on any other ``flwr`` import), in two kinds:

- **Names** that fedmeta uses as Flower defines them (:data:`NAMES`): the Runtime API client and
  task calls that the site worker uses to serve the SuperNode's tasks itself, the Control API
  client and messages behind ``fedmeta``'s operator commands, the SecAgg+ compatibility
  helpers. Each is imported when first used (``from fedmeta.protocol.flower_compat import X``),
  so importing this module imports nothing of Flower's.
- **Patch points**: changes to Flower's behaviour, applied explicitly by the process that needs
  them, never on import (:func:`quicken_object_pulls`, :func:`set_supernode_waits`,
  :func:`slow_http_ticks`, :func:`set_task_identity`, :func:`set_reply_source`), and **log lines** of Flower's that the
  launcher reads (:data:`FLEET_GRPC_LOG`, :data:`SUPERNODE_EXIT_MARKERS`).

:func:`missing` lists what a Flower upgrade moved: every name that no longer imports and every
patch point or log line that is no longer where it was; ``tests/protocol/test_flower_compat.py``
asserts it is empty, so an upgrade fails loudly there instead of somewhere in a run.

Moving to Flower 1.40 or later (whose Fleet API is HTTP and whose SuperNode has no gRPC client)
would touch, besides this module: the SuperLink and SuperNode command lines and the TLS check of
the Fleet API (``fedmeta.deploy.launch``: ``--fleet-api-type grpc-rere`` and
:data:`FLEET_GRPC_LOG`), the Fleet API probe that insists on HTTP/2 (gRPC), and the threat-model
rows that rest on gRPC over TLS with SuperNode authentication. The site's gate and everything
above the grid (``fedmeta.server``, ``fedmeta.sitecore``) use only the public API and the message
records and would not change. The cost to fedmeta's promise of TLS gRPC is the transport itself:
an HTTP Fleet API is a different wire, so that promise would have to be re-stated and re-tested
(TLS still holds; SuperNode authentication would have to be re-verified on the new transport).
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable
from importlib import import_module
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real types for the type checker; at run time names import lazily
    from flwr.cli.build import build_fab_from_disk as build_fab_from_disk
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor as CliClientHttpInterceptor
    from flwr.cli.flower_config import read_superlink_connection as read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection as init_http_client_from_connection
    from flwr.clientapp.typing import Mod as Mod
    from flwr.common.config import flatten_dict as flatten_dict
    from flwr.common.config import fuse_dicts as fuse_dicts
    from flwr.common.constant import SubStatus as SubStatus
    from flwr.common.serde import context_from_proto as context_from_proto
    from flwr.common.serde import context_to_proto as context_to_proto
    from flwr.common.serde import fab_from_proto as fab_from_proto
    from flwr.common.serde import fab_to_proto as fab_to_proto
    from flwr.common.serde import run_from_proto as run_from_proto
    from flwr.common.serde import user_config_to_proto as user_config_to_proto
    from flwr.compat.common.recorddict_compat import (
        arrayrecord_to_parameters as arrayrecord_to_parameters,
    )
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict as fitres_to_recorddict
    from flwr.proto.control_pb2 import ListNodesRequest as ListNodesRequest  # pylint: disable=E0611
    from flwr.proto.control_pb2 import ListRunsRequest as ListRunsRequest  # pylint: disable=E0611
    from flwr.proto.control_pb2 import RegisterNodeRequest as RegisterNodeRequest  # pylint: disable=E0611
    from flwr.proto.control_pb2 import StartRunRequest as StartRunRequest  # pylint: disable=E0611
    from flwr.proto.control_pb2 import StopRunRequest as StopRunRequest  # pylint: disable=E0611
    from flwr.proto.control_pb2 import StreamLogsRequest as StreamLogsRequest  # pylint: disable=E0611
    from flwr.proto.control_pb2 import (  # pylint: disable=E0611
        UnregisterNodeRequest as UnregisterNodeRequest,
    )
    from flwr.proto.runtime_pb2 import AcquireTaskRequest as AcquireTaskRequest  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullTaskInputRequest as PullTaskInputRequest
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest as PushTaskOutputRequest
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        SendTaskHeartbeatRequest as SendTaskHeartbeatRequest,
    )
    from flwr.server.client_proxy import ClientProxy as ClientProxy
    from flwr.server.run_serverapp import run as run_serverapp  # noqa: F401 - served under this name
    from flwr.supercore.app_utils import (
        start_parent_process_monitor as start_parent_process_monitor,
    )
    from flwr.supercore.constant import TaskType as TaskType
    from flwr.supercore.control.control_http_client import ControlHttpClient as ControlHttpClient
    from flwr.supercore.exit import ExitCode as ExitCode
    from flwr.supercore.exit import flwr_exit as flwr_exit
    from flwr.supercore.exit import register_signal_handlers as register_signal_handlers
    from flwr.supercore.fab import Fab as Fab
    from flwr.supercore.heartbeat import HeartbeatSender as HeartbeatSender
    from flwr.supercore.heartbeat import make_task_heartbeat_fn_http as make_task_heartbeat_fn_http
    from flwr.supercore.http_logging import get_uvicorn_log_config as get_uvicorn_log_config
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor as RuntimeTokenHttpInterceptor,
    )
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor as RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.interceptors import (
        SuperExecAuthHttpInterceptor as SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.logger import console_handler as console_handler
    from flwr.supercore.logger import flush_logs as flush_logs
    from flwr.supercore.logger import mirror_output_to_queue as mirror_output_to_queue
    from flwr.supercore.logger import start_log_uploader as start_log_uploader
    from flwr.supercore.logger import stop_log_uploader as stop_log_uploader
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes as public_key_to_bytes
    from flwr.supercore.retry import RetryInvoker as RetryInvoker
    from flwr.supercore.retry import exponential as exponential
    from flwr.supercore.retry import (
        make_simple_http_retry_invoker as make_simple_http_retry_invoker,
    )
    from flwr.supercore.runtime import RuntimeHttpClient as RuntimeHttpClient
    from flwr.supercore.task_identity import TaskIdentity as TaskIdentity
    from flwr.supercore.telemetry import EventType as EventType
    from flwr.superlink.grid import HttpGrid as HttpGrid
    from flwr.superlink.main import create_app as create_app
    from flwr.supernode.runtime.run_clientapp import pull_task_input as pull_task_input
    from flwr.supernode.runtime.run_clientapp import push_message as push_message
    from flwr.supernode.runtime.run_clientapp import push_task_output as push_task_output

#: The Flower release every name and patch point here was checked against.
PINNED = "1.39.0"

#: The Runtime API calls Flower signs with the SuperExec secret (the site worker's and the
#: coordinator executor's task claims): gRPC method paths of Flower's ``Runtime`` service.
SUPEREXEC_PROTECTED_METHODS = ("/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks",
                               "/flwr.proto.Runtime/ClaimTask")

#: name -> (module, attribute) of each internal fedmeta uses as it is.
NAMES: dict[str, tuple[str, str]] = {
    # the site worker: serving the SuperNode's tasks over its Runtime API (fedmeta.client.worker)
    "AcquireTaskRequest": ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    "SendTaskHeartbeatRequest": ("flwr.proto.runtime_pb2", "SendTaskHeartbeatRequest"),
    "RuntimeHttpClient": ("flwr.supercore.runtime", "RuntimeHttpClient"),
    "RuntimeTokenHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    "RuntimeVersionHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    "SuperExecAuthHttpInterceptor": ("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor"),
    "HeartbeatSender": ("flwr.supercore.heartbeat", "HeartbeatSender"),
    "RetryInvoker": ("flwr.supercore.retry", "RetryInvoker"),
    "exponential": ("flwr.supercore.retry", "exponential"),
    "TaskType": ("flwr.supercore.constant", "TaskType"),
    "SubStatus": ("flwr.common.constant", "SubStatus"),
    "pull_task_input": ("flwr.supernode.runtime.run_clientapp", "pull_task_input"),
    "push_message": ("flwr.supernode.runtime.run_clientapp", "push_message"),
    "push_task_output": ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
    # the operator's Control API calls (fedmeta.deploy.control)
    "read_superlink_connection": ("flwr.cli.flower_config", "read_superlink_connection"),
    "init_http_client_from_connection": ("flwr.cli.utils", "init_http_client_from_connection"),
    "build_fab_from_disk": ("flwr.cli.build", "build_fab_from_disk"),
    "fab_to_proto": ("flwr.common.serde", "fab_to_proto"),
    "user_config_to_proto": ("flwr.common.serde", "user_config_to_proto"),
    "Fab": ("flwr.supercore.fab", "Fab"),
    "public_key_to_bytes": ("flwr.supercore.primitives.asymmetric", "public_key_to_bytes"),
    "RegisterNodeRequest": ("flwr.proto.control_pb2", "RegisterNodeRequest"),
    "UnregisterNodeRequest": ("flwr.proto.control_pb2", "UnregisterNodeRequest"),
    "ListNodesRequest": ("flwr.proto.control_pb2", "ListNodesRequest"),
    "StartRunRequest": ("flwr.proto.control_pb2", "StartRunRequest"),
    "ListRunsRequest": ("flwr.proto.control_pb2", "ListRunsRequest"),
    "StopRunRequest": ("flwr.proto.control_pb2", "StopRunRequest"),
    "StreamLogsRequest": ("flwr.proto.control_pb2", "StreamLogsRequest"),
    # secure aggregation through Flower's legacy (FitIns/FitRes) SecAgg+ workflow
    "Mod": ("flwr.clientapp.typing", "Mod"),
    "ClientProxy": ("flwr.server.client_proxy", "ClientProxy"),
    "arrayrecord_to_parameters": ("flwr.compat.common.recorddict_compat", "arrayrecord_to_parameters"),
    "fitres_to_recorddict": ("flwr.compat.common.recorddict_compat", "fitres_to_recorddict"),
    # the coordinator's own ServerApp executor and SuperLink on a Unix socket
    # (fedmeta.deploy.serverexec, fedmeta.deploy.superlink, fedmeta.deploy.control)
    "CliClientHttpInterceptor": ("flwr.cli.cli_client_interceptor", "CliClientHttpInterceptor"),
    "ControlHttpClient": ("flwr.supercore.control.control_http_client", "ControlHttpClient"),
    "make_simple_http_retry_invoker": ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    "flatten_dict": ("flwr.common.config", "flatten_dict"),
    "fuse_dicts": ("flwr.common.config", "fuse_dicts"),
    "context_from_proto": ("flwr.common.serde", "context_from_proto"),
    "context_to_proto": ("flwr.common.serde", "context_to_proto"),
    "fab_from_proto": ("flwr.common.serde", "fab_from_proto"),
    "run_from_proto": ("flwr.common.serde", "run_from_proto"),
    "PullTaskInputRequest": ("flwr.proto.runtime_pb2", "PullTaskInputRequest"),
    "PushTaskOutputRequest": ("flwr.proto.runtime_pb2", "PushTaskOutputRequest"),
    "run_serverapp": ("flwr.server.run_serverapp", "run"),
    "start_parent_process_monitor": ("flwr.supercore.app_utils", "start_parent_process_monitor"),
    "ExitCode": ("flwr.supercore.exit", "ExitCode"),
    "flwr_exit": ("flwr.supercore.exit", "flwr_exit"),
    "register_signal_handlers": ("flwr.supercore.exit", "register_signal_handlers"),
    "make_task_heartbeat_fn_http": ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http"),
    "flush_logs": ("flwr.supercore.logger", "flush_logs"),
    "mirror_output_to_queue": ("flwr.supercore.logger", "mirror_output_to_queue"),
    "start_log_uploader": ("flwr.supercore.logger", "start_log_uploader"),
    "stop_log_uploader": ("flwr.supercore.logger", "stop_log_uploader"),
    "console_handler": ("flwr.supercore.logger", "console_handler"),
    "TaskIdentity": ("flwr.supercore.task_identity", "TaskIdentity"),
    "EventType": ("flwr.supercore.telemetry", "EventType"),
    "HttpGrid": ("flwr.superlink.grid", "HttpGrid"),
    "get_uvicorn_log_config": ("flwr.supercore.http_logging", "get_uvicorn_log_config"),
    "create_app": ("flwr.superlink.main", "create_app"),
}


def __getattr__(name: str) -> Any:
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = NAMES[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


# -- log lines the launcher reads -----------------------------------------------------------------

#: The SuperLink's line announcing a gRPC-rere Fleet API, with the address it bound
#: (``flwr.superlink.cli.flower_superlink``): proof that the Fleet API is gRPC.
FLEET_GRPC_LOG = re.compile(r"Starting Fleet API \(gRPC-rere\) on (\S+)")

#: Words in a stopped SuperNode's last log lines -> what they mean for the hospital (a site
#: reports the first that matches; never more of the log than that).
NODE_REFUSED = ("the coordinator refused the node: its key is not registered (never added, or "
                "revoked), or its previous session has not expired yet")
SUPERNODE_EXIT_MARKERS: tuple[tuple[str, str], ...] = (
    ("Failed to activate", NODE_REFUSED),
    ("PERMISSION_DENIED", "the coordinator refused the node's key"),
    ("UNAVAILABLE", "the coordinator is unreachable"),
    ("certificate", "TLS verification failed"),
)

#: Where each Flower log line above is written, to check that it still is.
_LOG_SOURCES: dict[str, tuple[str, str]] = {
    "Fleet API (gRPC-rere) start line": ("flwr.superlink.cli.flower_superlink",
                                         "Starting Fleet API (gRPC-rere) on"),
    # the SuperLink's refusal of a node's activation, which the SuperNode logs
    "SuperNode activation refused": ("flwr.supercore.error.catalog", "Failed to activate"),
}


# -- patch points ----------------------------------------------------------------------------------

def _object_pullers() -> tuple[Callable[..., Any], ...]:
    from flwr.supercore.inflatable import inflatable_utils

    return inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree


def quicken_object_pulls(initial_backoff_s: float) -> None:
    """Start Flower's retry backoff for a message object that has not arrived yet at
    ``initial_backoff_s`` (Flower: 1 s) in this process (:mod:`fedmeta.protocol.transport`)."""
    for fn in _object_pullers():
        defaults = fn.__kwdefaults__
        if defaults is None or "initial_backoff" not in defaults:
            raise RuntimeError(f"{fn.__module__}.{fn.__name__} no longer takes initial_backoff; pin flwr "
                               f"{PINNED} or update fedmeta.protocol.flower_compat")
        defaults["initial_backoff"] = float(initial_backoff_s)


def _supernode_modules() -> tuple[Any, Any, Any, Any]:
    from flwr.client.grpc_rere_client import connection
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal

    return connection, constant, heartbeat, start_client_internal


def set_supernode_waits(*, idle_sleep: Callable[[float], None], heartbeat_s: int) -> int:
    """In this process, make the SuperNode's ``time.sleep`` calls go to ``idle_sleep`` (Flower
    sleeps 3 s between two polls of the SuperLink when idle, 0.5 s while it waits for its worker)
    and announce a heartbeat of ``heartbeat_s`` (at least Flower's minimum); returns the
    heartbeat interval set."""
    problems = _supernode_problems()
    if problems:
        raise RuntimeError(f"this Flower no longer has the SuperNode waits fedmeta sets ({'; '.join(problems)}); "
                           f"pin flwr {PINNED} or update fedmeta.protocol.flower_compat")
    connection, constant, heartbeat, start_client_internal = _supernode_modules()
    interval = max(int(heartbeat_s), int(constant.HEARTBEAT_MIN_INTERVAL))
    connection.HEARTBEAT_DEFAULT_INTERVAL = interval
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval
    start_client_internal.time = SimpleNamespace(
        sleep=idle_sleep, time=time.time, monotonic=time.monotonic, perf_counter=time.perf_counter)
    return interval


def slow_http_ticks(tick_s: float) -> None:
    """In this process, make the uvicorn server behind Flower's HTTP APIs (the SuperLink's
    Control and Runtime API, the SuperNode's Runtime API) wake every ``tick_s`` seconds instead
    of every 0.1 s when nothing happens. Its main loop wakes only to refresh the ``Date`` header
    (once a second) and to see whether it should stop: requests are served as before; a stop
    takes up to ``tick_s`` longer."""
    problems = _uvicorn_problems()
    if problems:
        raise RuntimeError(f"uvicorn no longer ticks as fedmeta expects ({'; '.join(problems)}); "
                           f"pin the uvicorn flwr {PINNED} brings or update fedmeta.protocol.flower_compat")
    import asyncio

    from uvicorn.server import Server

    tenths = max(1, round(tick_s * 10))

    async def main_loop(self: Any) -> None:  # uvicorn's, with the tick as a parameter
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + tenths) % 864000  # on_tick counts tenths of a second
            await asyncio.sleep(tenths / 10)
            should_exit = await self.on_tick(counter)

    Server.main_loop = main_loop  # type: ignore[method-assign]


def _uvicorn_problems() -> list[str]:
    from uvicorn.server import Server

    problems = []
    main_loop, on_tick = inspect.getsource(Server.main_loop), inspect.getsource(Server.on_tick)
    if "await asyncio.sleep(0.1)" not in main_loop or "should_exit = await self.on_tick(counter)" not in main_loop:
        problems.append("uvicorn.Server.main_loop no longer ticks every 0.1 s through on_tick(counter)")
    if "counter % 10 == 0" not in on_tick:
        problems.append("uvicorn.Server.on_tick no longer counts tenths of a second")
    return problems


def run_supernode() -> None:
    """Run Flower's ``flower-supernode`` command (``sys.argv`` holds its arguments) in this
    process, its console log with timestamps and without colour codes (it goes to a file)."""
    from flwr.common.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    update_console_handler(timestamps=True, colored=False)
    flower_supernode()


def superlink_cli() -> Any:
    """Flower's ``flower-superlink`` module (``flwr.superlink.cli.flower_superlink``; the package
    exports a function of the same name), whose config parser and lifespan
    :mod:`fedmeta.deploy.superlink` runs with its API on a Unix socket."""
    return import_module("flwr.superlink.cli.flower_superlink")


def serve_over_unix_socket(client: Any, path: str, *, timeout_s: float) -> None:
    """Make one of Flower's protobuf-over-HTTP clients (``ControlHttpClient``,
    ``RuntimeHttpClient``, the deployed grid's) talk to the API behind the Unix socket ``path``:
    its private HTTP connection pool (``_client``) is replaced by one whose transport is the
    socket (its URLs, interceptors and retries are unchanged)."""
    import httpx

    old = client._client
    client._client = httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=timeout_s,
                                  follow_redirects=True)
    old.close()


def socket_grid(path: str, *, url: str, token: str, timeout_s: float) -> Any:
    """Flower's deployed grid (``HttpGrid``) for the task ``token``, reaching the SuperLink's
    Runtime API behind the Unix socket ``path`` (``url``: the URL its requests carry)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    class SocketGrid(HttpGrid):  # type: ignore[misc]
        def _connect(self) -> None:
            super()._connect()
            serve_over_unix_socket(self._client, path, timeout_s=timeout_s)

    return SocketGrid(runtime_api_address=url.split("//", 1)[1], insecure=True, token=token)


def grid_runtime_client(grid: Any) -> Any:
    """The Runtime API client of a deployed grid (connected on first use)."""
    return grid._runtime_client


def last_try(grid: Any) -> None:
    """Make a deployed grid's calls try once more at most (a process on its way out)."""
    grid._retry_invoker.max_tries = 1


def set_task_identity(*, run_id: int | None = None, node_id: int | None = None,
                      task_id: int | None = None) -> None:
    """Who Flower thinks is computing in this process (it stamps messages built in a ClientApp
    with it): the in-process grid (:mod:`fedmeta.server.local_grid`) sets it per delivery."""
    from flwr.supercore.task_identity import TaskIdentity

    if run_id is not None:
        TaskIdentity.run_id = run_id
    if task_id is not None:
        TaskIdentity.task_id = task_id
    if node_id is not None:
        TaskIdentity.node_id = node_id


def set_reply_source(reply: Any, node_id: int) -> None:
    """Set a reply's sender (Flower's metadata has no setter for it; the in-process grid keeps it
    honest after a ClientApp answered)."""
    reply.metadata.__dict__["_src_node_id"] = int(node_id)


def is_deployed_grid(grid: object) -> bool:
    """Whether ``grid`` is Flower's grid of a deployment, which reaches its nodes through a
    SuperLink (so replies arrive by push and pull, and nodes can be slow or gone)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


# -- checks ----------------------------------------------------------------------------------------

def _supernode_problems() -> list[str]:
    connection, constant, heartbeat, start_client_internal = _supernode_modules()
    problems = []
    if "time.sleep(3)" not in inspect.getsource(start_client_internal):
        problems.append("flwr.supernode.start_client_internal no longer sleeps 3 s between polls")
    for module in (connection, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            problems.append(f"{module.__name__}.HEARTBEAT_DEFAULT_INTERVAL is gone")
    if not hasattr(constant, "HEARTBEAT_MIN_INTERVAL"):
        problems.append("flwr.common.constant.HEARTBEAT_MIN_INTERVAL is gone")
    return problems


def superlink_problems() -> list[str]:
    """What the SuperLink on a Unix socket (:mod:`fedmeta.deploy.superlink`, the executor and the
    Control client) relies on and this Flower no longer has (empty: all present)."""
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.protobuf.client import ProtobufClient
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.main import create_app  # noqa: F401

    problems = []
    cli = superlink_cli()
    for attribute in ("_parse_superlink_lifespan_config", "SuperLinkLifespan", "_run_superlink_http_api"):
        if not hasattr(cli, attribute):
            problems.append(f"flwr.superlink.cli.flower_superlink.{attribute} is gone")
    if "self._client = httpx.Client(" not in inspect.getsource(ProtobufClient):
        problems.append("ProtobufClient no longer keeps its HTTP pool in _client")
    for cls in (ControlHttpClient, RuntimeHttpClient):
        if not issubclass(cls, ProtobufClient):
            problems.append(f"{cls.__name__} is no longer a ProtobufClient")
    grid = inspect.getsource(HttpGrid)
    for part in ("def _connect(", "def _runtime_client(", "self._retry_invoker = ", "self._client: "):
        if part not in grid:
            problems.append(f"HttpGrid no longer has {part.strip('(: =')}")
    return problems


def missing() -> list[str]:
    """What a Flower upgrade moved: each entry names a name, patch point or log line fedmeta
    relies on that this Flower no longer has where fedmeta expects it (empty: all present)."""
    out = []
    for name, (module, attribute) in NAMES.items():
        try:
            getattr(import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            out.append(f"{name}: {module}.{attribute} ({type(e).__name__})")
    try:
        for fn in _object_pullers():
            if "initial_backoff" not in (fn.__kwdefaults__ or {}):
                out.append(f"{fn.__module__}.{fn.__name__} no longer takes initial_backoff")
    except ImportError as e:
        out.append(f"object pulls: {e}")
    try:
        out += _supernode_problems()
    except ImportError as e:
        out.append(f"SuperNode waits: {e}")
    try:
        out += _uvicorn_problems()
    except (ImportError, OSError) as e:
        out.append(f"HTTP API ticks: {e}")
    for what, (module, text) in _LOG_SOURCES.items():
        try:
            source = inspect.getsource(import_module(module))
        except (ImportError, OSError) as e:
            out.append(f"{what}: {module} ({e})")
            continue
        if text not in source:
            out.append(f"{what}: {module} no longer logs {text!r}")
    try:
        out += superlink_problems()
    except ImportError as e:
        out.append(f"SuperLink entry points: {e}")
    try:
        from flwr.supercore.task_identity import TaskIdentity

        for attribute in ("run_id", "node_id", "task_id"):
            if not isinstance(getattr(type(TaskIdentity), attribute, None), property):
                out.append(f"TaskIdentity.{attribute} is no longer a settable property")
        from flwr.app import Metadata
        from flwr.superlink.grid.http_grid import HttpGrid  # noqa: F401

        if "_src_node_id" not in inspect.getsource(Metadata):
            out.append("flwr.app.Metadata no longer keeps _src_node_id")
    except ImportError as e:
        out.append(f"grid and task identity: {e}")
    return out
