"""The SuperLink's Control API, called in this process (no ``flwr`` subprocess per request).

The coordinator's SuperLink serves its Control API (and its Runtime API) on a Unix socket in the
owner-only state folder (:mod:`fedmeta.deploy.superlink`), so only the coordinator's own user can
reach it. :class:`Control` keeps one Control API client (Flower's own ``ControlHttpClient``, its
HTTP connection made over that socket) and offers what fedmeta's operator commands need:
register, unregister and list nodes (with the public key each authenticates with), start a run
from a bundle folder, read a run's status, stop a run and stream its logs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.common.errors import ProvisionError

log = logging.getLogger(__name__)

#: The base URL of the API behind the socket (the host name is never resolved).
SOCKET_URL = "http://superlink"
TIMEOUT_S = 30.0


def over_socket(client: Any, path: Path) -> None:
    """Make Flower's protobuf-over-HTTP ``client`` (``ControlHttpClient``, ``RuntimeHttpClient``)
    talk to the API behind the Unix socket ``path``: its HTTP connection pool is replaced by one
    whose transport is the socket (the client's URLs, interceptors and retries are unchanged)."""
    from fedmeta.protocol import flower_compat

    flower_compat.serve_over_unix_socket(client, str(path), timeout_s=TIMEOUT_S)


@dataclass(frozen=True)
class NodeRecord:
    """A node as the SuperLink knows it: id, status and the public key it authenticates with."""

    node_id: int
    status: str
    public_key: bytes
    name: str


class Control:
    """One Control API client for the coordinator whose API socket is ``socket``."""

    def __init__(self, socket: Path) -> None:
        from fedmeta.protocol.flower_compat import (
            CliClientHttpInterceptor,
            ControlHttpClient,
            RuntimeVersionHttpInterceptor,
        )

        self.socket: Path | None = socket
        if not socket.is_socket():
            raise ProvisionError(f"{socket}: no Control API socket; is `fedmeta coordinator start` "
                                 "running with this --state, as this user?")
        self._client = ControlHttpClient(SOCKET_URL, interceptors=[
            CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        over_socket(self._client, socket)

    @classmethod
    def with_client(cls, client: Any) -> Control:
        """A :class:`Control` over another Flower Control API client (e.g. one reaching a
        SuperLink on a TCP port, as Flower runs it by default)."""
        self = cls.__new__(cls)
        self.socket = None
        self._client = client
        return self

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, request: Any) -> Any:
        try:
            return fn(request)
        except Exception as e:  # noqa: BLE001 - HTTP and protocol errors, named for the operator
            raise ProvisionError(f"Control API {what} failed: {type(e).__name__}: {e}") from e

    # -- nodes -----------------------------------------------------------------------------------
    def register(self, public_key_openssh: bytes, name: str) -> int:
        """Register a SuperNode key; returns its node id."""
        from cryptography.hazmat.primitives import serialization

        from fedmeta.protocol.flower_compat import RegisterNodeRequest, public_key_to_bytes

        key = serialization.load_ssh_public_key(public_key_openssh)
        res = self._call("RegisterNode", self._client.RegisterNode,
                         RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name))  # type: ignore[arg-type]
        if not res.node_id:
            raise ProvisionError(f"the SuperLink did not register the key of {name}")
        return int(res.node_id)

    def unregister(self, node_id: int) -> None:
        from fedmeta.protocol.flower_compat import UnregisterNodeRequest

        self._call("UnregisterNode", self._client.UnregisterNode, UnregisterNodeRequest(node_id=node_id))

    def nodes(self) -> list[NodeRecord]:
        """Every node the SuperLink has a record of."""
        from fedmeta.protocol.flower_compat import ListNodesRequest

        res = self._call("ListNodes", self._client.ListNodes, ListNodesRequest())
        return [NodeRecord(int(n.node_id), str(n.status), bytes(n.public_key), str(n.name))
                for n in res.nodes_info]

    # -- runs ------------------------------------------------------------------------------------
    def start_run(self, app: Path, run_config: Mapping[str, str | bool]) -> int:
        """Start a run of the bundle built from the folder ``app``; returns the run id."""
        from fedmeta.protocol.flower_compat import (
            Fab,
            StartRunRequest,
            build_fab_from_disk,
            fab_to_proto,
            user_config_to_proto,
        )

        fab_bytes = build_fab_from_disk(app)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        req = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(dict(run_config)),
                              federation="")
        res = self._call("StartRun", self._client.StartRun, req)
        if not res.HasField("run_id"):
            raise ProvisionError("the SuperLink did not start the run")
        return int(res.run_id)

    def run_status(self, run_id: int) -> str:
        """``running``, ``finished:completed``, ``finished:failed``, … (Flower's status)."""
        from fedmeta.protocol.flower_compat import ListRunsRequest

        res = self._call("ListRuns", self._client.ListRuns, ListRunsRequest(run_id=run_id))
        if run_id not in res.run_dict:
            raise ProvisionError(f"run {run_id} not found")
        status = res.run_dict[run_id].status
        return f"{status.status}:{status.sub_status}" if status.sub_status else str(status.status)

    def stop_run(self, run_id: int) -> None:
        from fedmeta.protocol.flower_compat import StopRunRequest

        try:
            self._call("StopRun", self._client.StopRun, StopRunRequest(run_id=run_id))
        except ProvisionError as e:
            log.warning("could not stop run %d: %s", run_id, e)

    def follow_logs(self, run_id: int, stop: threading.Event, write: Any = print) -> None:
        """Write the run's log as it arrives until ``stop`` is set (run it in a thread)."""
        from fedmeta.protocol.flower_compat import StreamLogsRequest

        after = 0.0
        while not stop.is_set():
            try:
                for res in self._client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=after)):
                    if res.log_output:
                        write(res.log_output.rstrip("\n"))
                    after = max(after, float(res.latest_timestamp))
                    if stop.is_set():
                        return
            except Exception as e:  # noqa: BLE001 - the stream ends with the run; try again
                log.debug("log stream of run %d: %s", run_id, e)
            stop.wait(0.5)
