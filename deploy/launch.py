"""Flower's deployment commands for a provisioned consortium (Flower 1.39), built and run by
fedmeta.

* Coordinator: Flower's SuperLink (``python -m fedmeta.deploy.superlink``: ``flower-superlink``
  with its HTTP API on a Unix socket in the owner-only state folder) with TLS on the Fleet API
  (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``, the key decrypted into memory),
  ``--enable-supernode-auth`` (only registered SuperNode keys are admitted), its state in memory
  (Flower's default; a SQLite database only with ``persist_state``, see :func:`superlink_argv`),
  and ``--isolation process``: the SuperLink launches nothing; fedmeta's executor
  (:mod:`fedmeta.deploy.serverexec`) runs the installed fedmeta ServerApp for a fedmeta bundle
  and refuses any other.
* Operator: fedmeta's commands call the Control API over that socket
  (:class:`fedmeta.deploy.control.Control`): register, unregister and list nodes, start, follow
  and stop runs. Only the coordinator's own user can open the socket.
* Runs are submitted as a bundle holding only a generated ``pyproject.toml``
  (:func:`fedmeta.protocol.app.render_pyproject`): no code and no source folder is needed, and
  nothing is installed at run time.

TLS is on unless ``insecure=True``, which logs a warning (and cannot be combined with node
authentication: Flower refuses).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.common.errors import ProvisionError
from fedmeta.common.extras import installed_version
from fedmeta.deploy.control import Control
from fedmeta.protocol import flower_compat
from fedmeta.protocol.app import render_pyproject

log = logging.getLogger(__name__)

CONNECTION = "fedmeta"
INSECURE_WARNING = (
    "--insecure: TLS is OFF. Model updates and credentials cross the network unencrypted and "
    "hospitals are not authenticated. Use only on a closed test machine."
)
FLEET_GRPC_LOG = flower_compat.FLEET_GRPC_LOG


def bin_path(name: str) -> str:
    """The Flower executable next to the running interpreter (the same venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ProvisionError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


@dataclass(frozen=True)
class CoordinatorLayout:
    """Files the coordinator reads (from provisioning) and writes (its state folder, 0700)."""

    deployment: Path  # the provisioning output (registry.json, coordinator/)
    state: Path  # SuperLink database, FLWR_HOME, node ids, audit log, runs, process logs

    @property
    def ca(self) -> Path:
        return self.deployment / "coordinator" / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.deployment / "coordinator" / "server.crt"

    @property
    def key(self) -> Path:
        return self.deployment / "coordinator" / "server.key"

    @property
    def registry(self) -> Path:
        return self.deployment / "registry.json"

    @property
    def socket(self) -> Path:
        """The SuperLink's Control and Runtime API (a Unix socket, 0600, in the 0700 state folder)."""
        return self.state / "superlink.sock"

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def nodes(self) -> Path:
        return self.state / "nodes.json"

    @property
    def audit(self) -> Path:
        return self.state / "audit.jsonl"

    @property
    def runs(self) -> Path:
        return self.state / "runs"


def app_env(flwr_home: Path, *, passphrase_env: str | None = None) -> dict[str, str]:
    """Environment of a Flower process (SuperLink, SuperNode, the ServerApp's executor): that of
    :func:`base_env` without any key passphrase (``$FEDMETA_KEY_PASSPHRASE``,
    ``$FEDMETA_CA_PASSPHRASE`` and the variable ``passphrase_env`` the operator named). fedmeta
    decrypts every key itself, into memory, before it starts them; none of them, nor an app they
    run, needs a passphrase."""
    from fedmeta.deploy.secrets import PASSPHRASE_ENVS

    env = base_env(flwr_home)
    for name in {*PASSPHRASE_ENVS, passphrase_env or PASSPHRASE_ENVS[0]}:
        env.pop(name, None)
    return env


def base_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: private FLWR_HOME, no runtime ``uv sync``."""
    env = dict(os.environ)
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp) by name: put this
    # interpreter's bin folder first on PATH so they come from the same venv, also when the venv
    # was never activated (e.g. `.venv/bin/python -m pytest` in CI).
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, *(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = os.environ.get("FLWR_TELEMETRY_ENABLED", "0")  # opt in: set it to 1
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def superlink_argv(
    layout: CoordinatorLayout,
    *,
    key_path: str | None,
    fleet_address: str,
    secret_path: str,
    insecure: bool = False,
    persist_state: bool = False,
) -> list[str]:
    """The coordinator's SuperLink command line (``key_path``: the decrypted TLS key;
    ``secret_path``: the secret its Runtime API shares with fedmeta's ServerApp executor).

    Its Control and Runtime API are on the Unix socket :attr:`CoordinatorLayout.socket`
    (:mod:`fedmeta.deploy.superlink`), it runs in ``process`` isolation (it starts no ServerApp:
    :mod:`fedmeta.deploy.serverexec` does, after checking the bundle), and only an executor
    holding the secret may take its tasks.

    The SuperLink keeps its state (node registrations, runs, the messages and their objects in
    transit) in memory unless ``persist_state``, which stores it in ``layout.database``
    (SQLite). In memory, a round is about 3x quicker (every object a site pushes or pulls is a
    database transaction otherwise: ``fedmeta bench deploy``) and no parameter update is ever
    written to the coordinator's disk by Flower. Nothing fedmeta needs is lost when the
    SuperLink restarts: the registrations are rebuilt from the consortium registry at every
    start (:func:`fedmeta.deploy.coordinator.reconcile`), and runs resume from fedmeta's own
    checkpoints in the runs folder. What only the database keeps: Flower's own run history
    across SuperLink restarts.
    """
    from fedmeta.deploy.superlink import check_socket_path

    check_socket_path(layout.socket)
    argv = [sys.executable, "-m", "fedmeta.deploy.superlink", "--control-socket", str(layout.socket)]
    if insecure:
        log.warning(INSECURE_WARNING)
        argv += ["--insecure"]
    else:
        for p in (layout.ca, layout.cert, layout.key):
            if not p.is_file():
                raise ProvisionError(f"{p}: missing; run `fedmeta provision` first")
        assert key_path is not None
        argv += [
            "--ssl-ca-certfile", str(layout.ca),
            "--ssl-certfile", str(layout.cert),
            "--ssl-keyfile", key_path,
            "--enable-supernode-auth",
        ]
    if persist_state:
        argv += ["--database", str(layout.database)]
    argv += [
        "--fleet-api-type", "grpc-rere",
        "--fleet-api-address", fleet_address,
        "--isolation", "process",
        "--superexec-auth-secret-file", secret_path,
        "--disable-runtime-dependency-installation",
    ]
    return argv


def executor_argv(layout: CoordinatorLayout, *, secret_path: str, superlink_pid: int) -> list[str]:
    """fedmeta's ServerApp executor beside the SuperLink (:mod:`fedmeta.deploy.serverexec`)."""
    return [sys.executable, "-m", "fedmeta.deploy.serverexec", "--socket", str(layout.socket),
            "--secret-file", secret_path, "--superlink-pid", str(superlink_pid)]


def wait_for_socket(path: Path, *, timeout: float, proc_alive: object = None) -> None:
    """Wait until the Unix socket ``path`` accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(proc_alive) and not proc_alive():
            raise ProvisionError(f"the process serving {path} exited before it listened")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.2)
    raise ProvisionError(f"{path} did not accept connections within {timeout:.0f} s")


def wait_for_port(host: str, port: int, *, timeout: float, proc_alive: object = None) -> None:
    """Wait until ``host:port`` accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(proc_alive) and not proc_alive():
            raise ProvisionError(f"process serving {host}:{port} exited before it listened")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise ProvisionError(f"{host}:{port} did not accept connections within {timeout:.0f} s")


def check_fleet_is_grpc(address: str, *, ca: Path | None, timeout: float = 10.0) -> None:
    """Confirm the Fleet API at ``address`` speaks gRPC (HTTP/2) over TLS signed by ``ca``.

    A gRPC channel only becomes READY after the TLS handshake (verified against ``ca``) and the
    HTTP/2 settings exchange, so a plain HTTP/1 server or a certificate from elsewhere fails here.
    """
    import grpc

    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()) if ca else None
    channel = (
        grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError as e:
        raise ProvisionError(
            f"Fleet API at {address} did not complete a gRPC{'+TLS' if ca else ''} handshake "
            f"within {timeout:.0f} s"
        ) from e
    finally:
        channel.close()


def superlink_uses_grpc_fleet(log_path: Path) -> str | None:
    """The address the SuperLink's log says its gRPC-rere Fleet API listens on, if any."""
    if not log_path.exists():
        return None
    m = FLEET_GRPC_LOG.search(log_path.read_text(errors="replace"))
    return m.group(1) if m else None


def stage_app(dest: Path, *, secure_aggregation: bool = False) -> Path:
    """Write the run bundle's ``pyproject.toml`` (the installed version, no code) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(
        render_pyproject(version=installed_version(), secure_aggregation=secure_aggregation),
        encoding="utf-8")
    return dest


def submit_run(control: Control, flwr_home: Path, *, run_config: Mapping[str, str | bool],
               secure_aggregation: bool = False) -> int:
    """Start a run of the fedmeta bundle (staged under ``flwr_home``); returns the run id."""
    staged = stage_app(flwr_home / ("staged-secagg" if secure_aggregation else "staged-app"),
                       secure_aggregation=secure_aggregation)
    run_id = control.start_run(staged, run_config)
    log.info("submitted run %d (%s)", run_id, {k: v for k, v in run_config.items() if k != "experiment"})
    return run_id


def wait_run(control: Control, run_id: int, *, timeout: float, poll: float = 0.5) -> str:
    """Poll until the run finishes; returns its final status, or stops it after ``timeout``."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        status = control.run_status(run_id)
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    control.stop_run(run_id)
    return f"stopped after {timeout:.0f} s (was {status})"


def follow_run(control: Control, run_id: int, *, timeout: float, stream: bool,
               write: Any = print) -> str:
    """:func:`wait_run`, showing the run's log meanwhile (``stream``)."""
    stop = threading.Event()
    thread = None
    if stream:
        thread = threading.Thread(target=control.follow_logs, args=(run_id, stop, write), daemon=True)
        thread.start()
    try:
        return wait_run(control, run_id, timeout=timeout)
    except KeyboardInterrupt:
        control.stop_run(run_id)
        return "stopped (interrupted)"
    finally:
        time.sleep(1.0 if stream else 0.0)  # the last lines
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
