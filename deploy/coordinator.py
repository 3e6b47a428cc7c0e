"""The coordinator's side of a deployment: ``fedmeta coordinator start`` and ``revoke``.

:func:`start_coordinator` makes the state folder owner-only, decrypts the TLS key into memory,
starts the SuperLink (its Control API on a Unix socket in that folder, launching nothing) and
fedmeta's ServerApp executor beside it (the only thing that starts a ServerApp on this host: the
installed fedmeta one, for a fedmeta bundle), checks that its Fleet API speaks gRPC over TLS,
and reconciles the
SuperLink's node registrations with the consortium registry (:func:`reconcile`): every active
site's key is registered; a revoked site's key, and any key registered some other way (e.g.
``flwr supernode register`` through the Control API), is unregistered and written to the audit
log. The ServerApp it runs finds the registry (``$FEDMETA_REGISTRY``), the audit log and the runs
folder through its environment, and names every node by its key (:mod:`fedmeta.server.identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy.control import Control
from fedmeta.deploy.launch import (
    CoordinatorLayout,
    app_env,
    check_fleet_is_grpc,
    executor_argv,
    superlink_argv,
    superlink_uses_grpc_fleet,
    wait_for_port,
    wait_for_socket,
)
from fedmeta.deploy.processes import Managed, Processes
from fedmeta.deploy.provision import Registry
from fedmeta.deploy.secrets import (
    COORDINATOR_KEY,
    MemoryFile,
    Passphrase,
    decrypted_pem,
    secure_folder,
)
from fedmeta.deploy.sitekeys import fingerprint_of_bytes
from fedmeta.protocol import environment as ENV
from fedmeta.server.audit import open_log

log = logging.getLogger(__name__)

@dataclass
class CoordinatorHandle:
    """A started coordinator: its layout, environment, addresses, processes and node ids."""

    layout: CoordinatorLayout
    env: dict[str, str]
    fleet_address: str
    control_address: str  # the Control API's Unix socket
    process: Managed  # the SuperLink
    executor: Managed  # fedmeta's ServerApp executor
    node_ids: dict[str, int] = field(default_factory=dict)
    key: MemoryFile | None = None
    secret: MemoryFile | None = None
    control: Control | None = None

    def alive(self) -> bool:
        return self.process.alive() and self.executor.alive()


def load_node_ids(layout: CoordinatorLayout) -> dict[str, int]:
    """Site name -> SuperLink node id, as recorded when the keys were registered."""
    if not layout.nodes.exists():
        return {}
    return {k: int(v) for k, v in json.loads(layout.nodes.read_text()).items()}


def _save_node_ids(layout: CoordinatorLayout, ids: Mapping[str, int]) -> None:
    layout.nodes.write_text(json.dumps(dict(ids), indent=2) + "\n")
    os.chmod(layout.nodes, 0o600)


def reconcile(layout: CoordinatorLayout, control: Control) -> dict[str, int]:
    """Make the SuperLink's registrations match the consortium registry; returns site -> node id.

    Every registered node is matched with the registry by the fingerprint of its public key: an
    active site's node is kept; a revoked site's node, and a node whose key the registry does not
    know (e.g. registered with ``flwr supernode register``), is unregistered and written to the
    audit log. Active sites not registered yet are registered.
    """
    registry = Registry.load(layout.deployment)
    by_fp = {r.fingerprint: r for r in registry.sites.values()}
    audit = open_log(layout.audit)
    ids: dict[str, int] = {}
    for node in control.nodes():
        if node.status in ("unregistered", "deleted"):
            continue
        fp = fingerprint_of_bytes(node.public_key) or "unknown key"
        record = by_fp.get(fp)
        if record is not None and record.status == "active" and record.name not in ids:
            ids[record.name] = node.node_id
            continue
        why = (f"the key of site {record.name} is revoked" if record is not None and record.status != "active"
               else "a second node for one site" if record is not None
               else "registered outside the consortium registry")
        control.unregister(node.node_id)
        audit.record("node_unregistered", site=record.name if record else None, node_id=node.node_id,
                     reason=why, fingerprint=fp)
        log.warning("unregistered node %d (key %s): %s", node.node_id, fp, why)
    for record in registry.active():
        if record.name in ids:
            continue
        pub = layout.deployment / "coordinator" / "authorized" / f"{record.name}.pub"
        try:
            key = pub.read_bytes()
        except OSError as e:
            why = f"its public key {pub} cannot be read ({e.strerror or e}); copy it from the provisioning folder"
            audit.record("node_refused", fingerprint=record.fingerprint, reason=why[:200])
            log.error("site %s not registered: %s", record.name, why)
            continue
        if fingerprint_of_bytes(key) != record.fingerprint:
            why = (f"{pub} holds key {fingerprint_of_bytes(key)}, not the registry's {record.fingerprint} "
                   "(replaced or corrupted)")
            audit.record("node_refused", fingerprint=record.fingerprint, reason=why[:200])
            log.error("site %s not registered: %s", record.name, why)
            continue
        ids[record.name] = control.register(key, record.name)
        audit.record("node_registered", site=record.name, node_id=ids[record.name],
                     fingerprint=record.fingerprint)
        log.info("registered site %s as node %d (key %s)", record.name, ids[record.name],
                    record.fingerprint)
    _save_node_ids(layout, ids)
    return ids


def unregister_site(layout: CoordinatorLayout, control: Control, name: str) -> int:
    """Unregister a (revoked) site's key from the running SuperLink; returns its node id."""
    ids = load_node_ids(layout)
    if name not in ids:
        raise ProvisionError(f"{layout.nodes}: site {name!r} has no registered node id")
    node_id = ids.pop(name)
    control.unregister(node_id)
    _save_node_ids(layout, ids)
    log.info("unregistered site %s (node %d)", name, node_id)
    return node_id


def coordinator_env(layout: CoordinatorLayout, *, passphrase_env: str | None = None) -> dict[str, str]:
    """The environment of the SuperLink and of the executor (and so of the ServerApp): no key
    passphrase in it (:func:`fedmeta.deploy.launch.app_env`)."""
    env = app_env(layout.flwr_home, passphrase_env=passphrase_env)
    env[ENV.AUDIT_LOG] = str(layout.audit.resolve())
    env[ENV.REGISTRY] = str(layout.registry.resolve())
    env[ENV.RUNS_DIR] = str(layout.runs.resolve())
    env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)  # Flower's gRPC Control API (TCP): never
    return env


def secure_state(state: Path) -> None:
    """Make the state folder and everything already in it owner-only (0700 / 0600)."""
    secure_folder(state)
    for root, dirs, files in os.walk(state):
        for d in dirs:
            os.chmod(Path(root) / d, 0o700)
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                os.chmod(p, 0o600)


def start_coordinator(
    procs: Processes,
    *,
    deployment: Path,
    state: Path,
    passphrase: Passphrase,
    fleet_address: str,
    insecure: bool = False,
    persist_state: bool = False,
    timeout: float = 60.0,
) -> CoordinatorHandle:
    """Start the SuperLink for a provisioned ``deployment``, fedmeta's ServerApp executor beside
    it, and reconcile the sites (state in memory unless ``persist_state``:
    :func:`fedmeta.deploy.launch.superlink_argv`)."""
    layout = CoordinatorLayout(deployment=deployment, state=state)
    Registry.load(deployment)  # signed by the consortium CA, or nothing starts
    os.umask(0o077)
    secure_state(state)
    secure_folder(layout.runs)
    env = coordinator_env(layout, passphrase_env=passphrase.env)
    # the registry is checked against this CA certificate only, for as long as this coordinator runs
    env[ENV.CA_SHA256] = hashlib.sha256(layout.ca.read_bytes()).hexdigest()
    key = None if insecure else decrypted_pem(layout.key, passphrase, what=COORDINATOR_KEY.what)
    secret = MemoryFile("superexec-secret", secrets.token_bytes(32))
    argv = superlink_argv(layout, key_path=key.path if key else None, fleet_address=fleet_address,
                          secret_path=secret.path, insecure=insecure, persist_state=persist_state)
    for name in ("serverexec", "superlink"):  # a restart: the previous pair must be gone
        if name in procs.procs:
            procs.stop(name)
    proc = procs.start("superlink", argv, env=env, pass_fds=[secret.fd] + ([key.fd] if key else []))
    fleet_host, _, fleet_port = fleet_address.rpartition(":")
    wait_for_socket(layout.socket, timeout=timeout, proc_alive=proc.alive)
    wait_for_port(fleet_host if fleet_host not in ("0.0.0.0", "") else "127.0.0.1", int(fleet_port),
                  timeout=timeout, proc_alive=proc.alive)
    executor = procs.start("serverexec", executor_argv(layout, secret_path=secret.path, superlink_pid=proc.pid),
                           env=env, pass_fds=[secret.fd])
    bound = superlink_uses_grpc_fleet(proc.log_path)
    if bound is None:
        time.sleep(1.0)
        bound = superlink_uses_grpc_fleet(proc.log_path)
    if bound is None:
        raise ProvisionError(
            f"{proc.log_path}: the SuperLink did not report a gRPC-rere Fleet API; refusing to go on"
        )
    check_host = fleet_address if fleet_host not in ("0.0.0.0", "") else f"127.0.0.1:{fleet_port}"
    check_fleet_is_grpc(check_host, ca=None if insecure else layout.ca)
    log.info("SuperLink up: Fleet API gRPC-rere on %s, Control API on %s", bound, layout.socket)
    control = Control(layout.socket)
    ids = {} if insecure else reconcile(layout, control)
    procs.refresh_children()
    return CoordinatorHandle(
        layout=layout, env=env, fleet_address=fleet_address, control_address=str(layout.socket),
        process=proc, executor=executor, node_ids=ids, key=key, secret=secret, control=control,
    )
