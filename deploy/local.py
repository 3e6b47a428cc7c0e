"""Run a whole consortium on one machine: ``fedmeta deploy local`` and the pieces it shares with
``fedmeta coordinator start`` / ``fedmeta site start`` / ``fedmeta run``.

:func:`start_coordinator` starts the SuperLink (TLS + node authentication), checks its Fleet API
speaks gRPC, and registers every active site key. :func:`start_site` starts one SuperNode.
:func:`deploy_local` provisions a fresh consortium on 127.0.0.1, starts the coordinator and the
sites, submits the experiment, waits for it, and stops every process it started (by PID) whether
the run passed or failed.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy.consortium import load_consortium
from fedmeta.deploy.launch import (
    CoordinatorLayout,
    base_env,
    check_fleet_is_grpc,
    list_nodes,
    load_node_ids,
    project_root,
    register_sites,
    submit_run,
    superlink_argv,
    superlink_uses_grpc_fleet,
    supernode_argv,
    wait_for_port,
    wait_run,
    write_flwr_config,
)
from fedmeta.deploy.node import NodeConfig, load_node_config
from fedmeta.deploy.processes import Managed, Processes
from fedmeta.deploy.provision import provision
from fedmeta.server.audit import ENV_VAR as AUDIT_ENV
from fedmeta.server.audit import open_log

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CoordinatorHandle:
    """A started coordinator: its layout, environment for ``flwr``, addresses and node ids."""

    layout: CoordinatorLayout
    env: dict[str, str]
    fleet_address: str
    control_address: str
    process: Managed
    node_ids: dict[str, int] = field(default_factory=dict)


def start_coordinator(
    procs: Processes,
    *,
    deployment: Path,
    state: Path,
    fleet_address: str,
    control_host: str,
    control_port: int,
    insecure: bool = False,
    timeout: float = 60.0,
) -> CoordinatorHandle:
    """Start ``flower-superlink`` for a provisioned ``deployment`` and register the sites."""
    layout = CoordinatorLayout(deployment=deployment, state=state)
    state.mkdir(parents=True, exist_ok=True)
    env = base_env(layout.flwr_home)
    env[AUDIT_ENV] = str(layout.audit.resolve())
    write_flwr_config(
        layout.flwr_home,
        control_address=f"{control_host}:{control_port}",
        root_certificates=None if insecure else layout.ca,
    )
    argv = superlink_argv(
        layout,
        fleet_address=fleet_address,
        control_host=control_host,
        control_port=control_port,
        insecure=insecure,
    )
    proc = procs.start("superlink", argv, env=env)
    fleet_host, _, fleet_port = fleet_address.rpartition(":")
    wait_for_port(control_host, control_port, timeout=timeout, proc_alive=proc.alive)
    wait_for_port(fleet_host, int(fleet_port), timeout=timeout, proc_alive=proc.alive)
    bound = superlink_uses_grpc_fleet(proc.log_path)
    if bound is None:
        raise ProvisionError(
            f"{proc.log_path}: the SuperLink did not report a gRPC-rere Fleet API; refusing to go on"
        )
    check_fleet_is_grpc(fleet_address, ca=None if insecure else layout.ca)
    logger.info("SuperLink up: Fleet API gRPC-rere on %s, Control API https://%s:%d",
                bound, control_host, control_port)
    ids: dict[str, int] = {}
    if not insecure:
        known = load_node_ids(layout)
        ids = register_sites(layout, env)
        log = open_log(layout.audit)
        for name, node_id in ids.items():
            if name not in known:
                log.record("node_registered", site=name, node_id=node_id)
    procs.refresh_children()
    return CoordinatorHandle(
        layout=layout,
        env=env,
        fleet_address=fleet_address,
        control_address=f"{control_host}:{control_port}",
        process=proc,
        node_ids=ids,
    )


def start_site(
    procs: Processes,
    site: NodeConfig,
    *,
    insecure: bool = False,
    superlink: str | None = None,
    runtime_port: int | None = None,
    use_ca: bool = True,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    flwr_home: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Managed:
    """Start ``flower-supernode`` for one hospital (``extra_env`` is added to its environment)."""
    home = flwr_home or procs.run_dir / f"flwr-home-{site.site}"
    argv = supernode_argv(
        site,
        insecure=insecure,
        superlink=superlink,
        runtime_port=runtime_port,
        use_ca=use_ca,
        max_retries=max_retries,
        max_wait_time=max_wait_time,
    )
    env = base_env(home)
    env.update(extra_env or {})
    return procs.start(f"site-{site.site}", argv, env=env)


def wait_nodes_online(
    env: dict[str, str], node_ids: Sequence[int], *, timeout: float
) -> None:
    """Wait until the SuperLink reports every node in ``node_ids`` online."""
    deadline = time.monotonic() + timeout
    want = {str(n) for n in node_ids}
    online: set[str] = set()
    while time.monotonic() < deadline:
        online = {
            str(n["node-id"]) for n in list_nodes(env) if str(n.get("status")) == "online"
        }
        if want <= online:
            return
        time.sleep(0.5)
    raise ProvisionError(
        f"nodes {sorted(want - online)} not online after {timeout:.0f} s (online: {sorted(online)})"
    )


def write_local_consortium(path: Path, *, sites: int, fleet_port: int, control_port: int) -> Path:
    """A consortium YAML for ``sites`` hospitals and a coordinator on 127.0.0.1."""
    doc = {
        "consortium": "local",
        "coordinator": {
            "host": LOOPBACK,
            "sans": ["localhost", LOOPBACK],
            "fleet_port": fleet_port,
            "control_port": control_port,
        },
        "sites": [{"name": f"site-{i}", "partition_id": i} for i in range(sites)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@dataclass(frozen=True)
class LocalResult:
    """What ``deploy local`` measured; times in seconds."""

    status: str
    run_id: int
    provision_s: float
    startup_s: float
    run_s: float
    total_s: float
    summary: Path
    leftovers: list[int]


def deploy_local(
    *,
    sites: int,
    rounds: int,
    out: Path,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    insecure: bool = False,
    run_timeout: float = 600.0,
    app: Path | None = None,
    secagg: bool = False,
) -> LocalResult:
    """Provision, start a TLS SuperLink and ``sites`` SuperNodes on 127.0.0.1, run, stop all.

    ``summary.json`` (and ``rounds.jsonl``, ``final.safetensors``) land in ``out`` as with
    ``fedmeta simulate``; the deployment (certificates, keys), state and logs in ``out/deploy``.
    """
    if sites < 1:
        raise ProvisionError(f"--sites must be >= 1, got {sites}")
    if rounds < 1:
        raise ProvisionError(f"--rounds must be >= 1, got {rounds}")
    t0 = time.monotonic()
    out = out.resolve()
    work = out / "deploy"
    fleet_port, control_port = free_port(), free_port()
    consortium_path = write_local_consortium(
        work / "consortium.yaml", sites=sites, fleet_port=fleet_port, control_port=control_port
    )
    deployment = work / "pki"
    provision(load_consortium(consortium_path), deployment)
    t_prov = time.monotonic()
    with Processes(work / "run") as procs:
        try:
            co = start_coordinator(
                procs,
                deployment=deployment,
                state=work / "coordinator",
                fleet_address=f"{LOOPBACK}:{fleet_port}",
                control_host=LOOPBACK,
                control_port=control_port,
                insecure=insecure,
            )
            for i in range(sites):
                site = load_node_config(deployment / "sites" / f"site-{i}" / "node.yaml")
                start_site(procs, site, insecure=insecure, runtime_port=free_port())
            if co.node_ids:
                wait_nodes_online(co.env, list(co.node_ids.values()), timeout=60.0)
            else:
                time.sleep(5.0)  # insecure: no registration, so no node list to wait on
            t_up = time.monotonic()
            run_config = {
                "config": str(config.resolve()) if config else "",
                "overrides": " ".join([*overrides, f"rounds={rounds}"]),
                "out": str(out),
            }
            run_id = submit_run(co.env, app=app or project_root(), run_config=run_config,
                                secagg=secagg)
            open_log(co.layout.audit).record("run_submitted", run_id=run_id,
                                             sites=sorted(co.node_ids))
            procs.refresh_children()
            status = wait_run(co.env, run_id, timeout=run_timeout)
            t_run = time.monotonic()
            logger.info("run %d %s in %.1f s", run_id, status, t_run - t_up)
        finally:
            procs.refresh_children()
    # Leaving the `with` block stopped every process (pass or fail); check none survived.
    leftovers = procs.leftovers()
    if leftovers:
        logger.error("processes still running after stop: %s", leftovers)
    summary = out / "summary.json"
    if status != "finished:completed":
        raise ProvisionError(
            f"run {run_id} ended {status!r}; see the logs in {work / 'run' / 'logs'}"
        )
    if not summary.is_file():
        raise ProvisionError(f"run {run_id} completed but wrote no {summary}")
    return LocalResult(
        status=status,
        run_id=run_id,
        provision_s=t_prov - t0,
        startup_s=t_up - t_prov,
        run_s=t_run - t_up,
        total_s=time.monotonic() - t0,
        summary=summary,
        leftovers=leftovers,
    )
