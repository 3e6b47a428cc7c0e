"""The SuperLink's Control API, called in this process (no ``flwr`` subprocess per request).

Each ``flwr`` command starts a Python process that imports Flower: seconds of CPU per call, paid
for every registration and every status poll. :class:`Control` keeps one Control API client
(Flower's own ``ControlHttpClient``, over TLS to the coordinator's certificate) and offers what
fedmeta's operator commands need: register, unregister and list nodes (with the public key each
authenticates with), start a run from a bundle folder, read a run's status, stop a run and
stream its logs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.common.errors import ProvisionError

log = logging.getLogger(__name__)

_ENV_LOCK = threading.Lock()


@contextmanager
def _flwr_home(path: Path) -> Iterator[None]:
    """Flower's client reads its settings from ``$FLWR_HOME``: set it while one is built."""
    with _ENV_LOCK:
        old = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(path)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = old


@dataclass(frozen=True)
class NodeRecord:
    """A node as the SuperLink knows it: id, status and the public key it authenticates with."""

    node_id: int
    status: str
    public_key: bytes
    name: str


class Control:
    """One Control API client for the coordinator whose ``FLWR_HOME`` is ``flwr_home``."""

    def __init__(self, flwr_home: Path, connection: str = "fedmeta") -> None:
        from fedmeta.protocol.flower_compat import (
            init_http_client_from_connection,
            read_superlink_connection,
        )

        self.flwr_home = flwr_home
        with _flwr_home(flwr_home):
            try:
                conn = read_superlink_connection(connection)
                self._client = init_http_client_from_connection(conn)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - Flower's CLI raises click errors
                raise ProvisionError(f"{flwr_home}: cannot reach the coordinator's Control API "
                                     f"({type(e).__name__}: {e}); is it running?") from None

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
