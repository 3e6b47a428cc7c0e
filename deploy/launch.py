"""Build and run Flower's own deployment commands for a provisioned consortium (Flower 1.39).

* Coordinator: ``flower-superlink`` with TLS on every API (``--ssl-ca-certfile/--ssl-certfile/
  --ssl-keyfile``), ``--enable-supernode-auth`` (only registered SuperNode keys are admitted), a
  SQLite state database (``--database``), the gRPC request-response Fleet API
  (``--fleet-api-type grpc-rere``) for the hospitals and the HTTPS Control API for ``flwr``.
* Hospital: ``flower-supernode --grpc-rere`` with the consortium CA (``--root-certificates``), its
  key (``--auth-supernode-private-key``), its ``--node-config`` and its own local ``--port`` for
  the ClientApp runtime API.
* Operator: ``flwr supernode register|unregister`` and ``flwr run`` against a private
  ``FLWR_HOME`` whose ``config.toml`` names the SuperLink's Control API and the CA.

TLS is on unless ``insecure=True``, which logs a warning (and cannot be combined with node
authentication: Flower refuses). Runtime dependency installation (``uv sync``) is always
disabled: sites and coordinator run the installed ``fedmeta``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy.node import NodeConfig
from fedmeta.deploy.provision import Registry

logger = logging.getLogger(__name__)

CONNECTION = "fedmeta"
INSECURE_WARNING = (
    "--insecure: TLS is OFF. Model updates and credentials cross the network unencrypted and "
    "hospitals are not authenticated. Use only on a closed test machine."
)
FLEET_GRPC_LOG = re.compile(r"Starting Fleet API \(gRPC-rere\) on (\S+)")


def _bin(name: str) -> str:
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
    """Files the coordinator reads (from provisioning) and writes (its state folder)."""

    deployment: Path  # the provisioning output (registry.json, coordinator/)
    state: Path  # SuperLink database, FLWR_HOME, node ids, audit log, process logs

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


def base_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: private FLWR_HOME, no runtime ``uv sync``."""
    env = dict(os.environ)
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by
    # name: put this interpreter's bin folder first on PATH so they come from the same venv, also
    # when the venv was never activated (e.g. `.venv/bin/python -m pytest` in CI).
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, *(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def superlink_argv(
    layout: CoordinatorLayout,
    *,
    fleet_address: str,
    control_host: str,
    control_port: int,
    insecure: bool = False,
) -> list[str]:
    """``flower-superlink`` command line for the coordinator."""
    argv = [_bin("flower-superlink")]
    if insecure:
        logger.warning(INSECURE_WARNING)
        argv += ["--insecure"]
    else:
        for p in (layout.ca, layout.cert, layout.key):
            if not p.is_file():
                raise ProvisionError(f"{p}: missing; run `fedmeta provision` first")
        argv += [
            "--ssl-ca-certfile", str(layout.ca),
            "--ssl-certfile", str(layout.cert),
            "--ssl-keyfile", str(layout.key),
            "--enable-supernode-auth",
        ]
    argv += [
        "--database", str(layout.database),
        "--fleet-api-type", "grpc-rere",
        "--fleet-api-address", fleet_address,
        "--host", control_host,
        "--port", str(control_port),
        "--disable-runtime-dependency-installation",
    ]
    return argv


def supernode_argv(
    site: NodeConfig,
    *,
    insecure: bool = False,
    superlink: str | None = None,
    runtime_port: int | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    use_ca: bool = True,
) -> list[str]:
    """``flower-supernode`` command line for one hospital (gRPC-rere Fleet API).

    ``use_ca=False`` omits the consortium CA (the SuperNode then trusts only the system store):
    used by the test showing that a hospital without the CA cannot connect.
    """
    argv = [_bin("flower-supernode"), "--grpc-rere", "--superlink", superlink or site.superlink]
    if insecure:
        logger.warning(INSECURE_WARNING)
        argv += ["--insecure"]
    else:
        if use_ca:
            argv += ["--root-certificates", str(site.root_certificates)]
        argv += ["--auth-supernode-private-key", str(site.auth_private_key)]
    node_config = site.node_config_arg()
    if node_config:
        argv += ["--node-config", node_config]
    argv += ["--port", str(runtime_port or site.runtime_port)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def write_flwr_config(
    flwr_home: Path, *, control_address: str, root_certificates: Path | None
) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one SuperLink connection named ``fedmeta``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{control_address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates.resolve()}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


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


def _flwr(args: list[str], env: Mapping[str, str], *, timeout: float = 60.0) -> dict[str, object]:
    """Run ``flwr ARGS --format json`` and return its JSON document."""
    argv = [_bin("flwr"), *args, "--format", "json"]
    try:
        res = subprocess.run(  # noqa: S603 - fixed argv
            argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ProvisionError(f"`{' '.join(argv)}` timed out after {timeout:.0f} s") from e
    out = res.stdout.strip()
    start = out.find("{")
    try:
        doc: dict[str, object] = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError as e:
        raise ProvisionError(
            f"`{' '.join(argv)}` printed no JSON (exit {res.returncode}): {out[-400:]} "
            f"{res.stderr[-400:]}"
        ) from e
    if not doc.get("success", False):
        raise ProvisionError(
            f"`flwr {' '.join(args)}` failed: {doc.get('error-message', res.stderr[-400:])}"
        )
    return doc


def load_node_ids(layout: CoordinatorLayout) -> dict[str, int]:
    """Site name -> SuperLink node id, as recorded when the keys were registered."""
    if not layout.nodes.exists():
        return {}
    return {k: int(v) for k, v in json.loads(layout.nodes.read_text()).items()}


def _save_node_ids(layout: CoordinatorLayout, ids: Mapping[str, int]) -> None:
    layout.nodes.write_text(json.dumps(dict(ids), indent=2) + "\n")


def register_sites(layout: CoordinatorLayout, env: Mapping[str, str]) -> dict[str, int]:
    """Register each active site's public key with the running SuperLink (idempotent).

    Revoked sites are never registered. Sites registered before (same state database) are
    kept; returns site name -> node id.
    """
    registry = Registry.load(layout.deployment)
    ids = load_node_ids(layout)
    for record in registry.active():
        if record.name in ids:
            continue
        pub = layout.deployment / "coordinator" / "authorized" / f"{record.name}.pub"
        doc = _flwr(["supernode", "register", str(pub), CONNECTION, "--name", record.name], env)
        ids[record.name] = int(str(doc["node-id"]))
        logger.info("registered site %s as node %d (key %s)", record.name, ids[record.name],
                    record.fingerprint)
        _save_node_ids(layout, ids)
    _save_node_ids(layout, ids)
    return ids


def unregister_site(layout: CoordinatorLayout, env: Mapping[str, str], name: str) -> int:
    """Unregister a (revoked) site's key from the running SuperLink; returns its node id."""
    ids = load_node_ids(layout)
    if name not in ids:
        raise ProvisionError(f"{layout.nodes}: site {name!r} has no registered node id")
    node_id = ids.pop(name)
    _flwr(["supernode", "unregister", str(node_id), CONNECTION], env)
    _save_node_ids(layout, ids)
    logger.info("unregistered site %s (node %d)", name, node_id)
    return node_id


def list_nodes(env: Mapping[str, str]) -> list[dict[str, object]]:
    """``flwr supernode list``: the SuperLink's view of every registered node."""
    doc = _flwr(["supernode", "list", CONNECTION], env)
    nodes = doc.get("nodes", [])
    if not isinstance(nodes, list):
        raise ProvisionError(f"flwr supernode list: unexpected answer {doc!r}")
    return [dict(n) for n in nodes]


def project_root() -> Path:
    """The folder holding fedmeta's ``pyproject.toml`` (the Flower app that ``flwr run`` ships)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ProvisionError(
            f"{root}: no pyproject.toml; pass --app with the fedmeta source folder"
        )
    return root


def run_config_arg(values: Mapping[str, str]) -> str:
    """``flwr run --run-config`` text: TOML strings, quoted and escaped."""
    parts = []
    for k, v in values.items():
        escaped = v.replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'{k}="{escaped}"')
    return " ".join(parts)


SECAGG_COMPONENTS = {
    "serverapp": "fedmeta.server.secagg_app:app",
    "clientapp": "fedmeta.client.secagg_app:app",
}


def stage_app(app: Path, dest: Path, *, secagg: bool = False) -> Path:
    """Copy the app's ``pyproject.toml`` into ``dest`` and return ``dest``.

    ``flwr run`` rewrites the ``pyproject.toml`` it is given (it comments out the legacy
    ``[tool.flwr.federations]`` tables), so it is pointed at a copy, never at the source tree.
    The components it names (``fedmeta.server.app:app``, ``fedmeta.client.app:app``) are imported
    from the installed ``fedmeta`` package on both sides, so the FAB needs nothing else.
    ``secagg=True`` points the components at the secure-aggregation pair
    (:mod:`fedmeta.server.secagg_app`, :mod:`fedmeta.client.secagg_app`).
    """
    src = app / "pyproject.toml"
    if not src.is_file():
        raise ProvisionError(f"{src}: missing; --app must be the fedmeta source folder")
    dest.mkdir(parents=True, exist_ok=True)
    text = src.read_text(encoding="utf-8")
    if secagg:
        for key, target in SECAGG_COMPONENTS.items():
            text, n = re.subn(rf'(?m)^{key}\s*=\s*"[^"]*"', f'{key} = "{target}"', text)
            if n != 1:
                raise ProvisionError(f"{src}: expected one `{key} = ...` component, found {n}")
    (dest / "pyproject.toml").write_text(text, encoding="utf-8")
    return dest


def submit_run(
    env: Mapping[str, str], *, app: Path, run_config: Mapping[str, str], secagg: bool = False
) -> int:
    """``flwr run APP fedmeta --run-config ...`` on a staged copy of APP; returns the run id."""
    staged = stage_app(app, Path(env["FLWR_HOME"]) / "staged-app", secagg=secagg)
    args = ["run", str(staged), CONNECTION]
    if run_config:
        args += ["--run-config", run_config_arg(run_config)]
    doc = _flwr(args, env, timeout=120.0)
    run_id = int(str(doc["run-id"]))
    logger.info("submitted run %d (app %s, config %s)", run_id, app, dict(run_config))
    return run_id


def run_status(env: Mapping[str, str], run_id: int) -> str:
    """The run's status string from ``flwr list --run-id`` (e.g. ``running``, ``finished:completed``)."""
    doc = _flwr(["list", CONNECTION, "--run-id", str(run_id)], env)
    runs = doc.get("runs", [])
    if not isinstance(runs, list) or not runs:
        raise ProvisionError(f"flwr list: run {run_id} not found")
    return str(runs[0].get("status", "unknown"))


def wait_run(
    env: Mapping[str, str], run_id: int, *, timeout: float, poll: float = 2.0
) -> str:
    """Poll until the run finishes; returns its final status or raises on timeout."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        status = run_status(env, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise ProvisionError(f"run {run_id} still {status!r} after {timeout:.0f} s")


def stream_logs(env: Mapping[str, str], run_id: int) -> int:
    """``flwr log RUN_ID --stream``: print the run's logs until it ends (for the CLI)."""
    return subprocess.call(  # noqa: S603 - fixed argv
        [_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=dict(env)
    )
