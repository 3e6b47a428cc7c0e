"""A whole consortium on one machine: ``fedmeta deploy local``.

Everything a real consortium does, on 127.0.0.1: the experiment is loaded and validated first
(a bad config or override stops here, before anything starts); a fresh consortium is provisioned
with encrypted keys, each with a random passphrase of its own (the CA's, the coordinator's and
each hospital's, in owner-only files, never in an environment: :func:`provision_local`); each
hospital gets its own bundle, its own state folder and its own copy of *its* data only; the
coordinator (TLS SuperLink, node authentication) and one ``fedmeta site start`` process per
hospital are started; the run is submitted and its progress shown; its outputs are copied to
``--out``; every process is stopped by PID, pass or fail.

Data: a built-in source's hospital is named in its node file (``fed-heart``: the data installed
with fedmeta); an EHR consortium (``ehr``, ``synth-ehr``) is split into one folder per hospital
(its table, its ``site.yaml``, a copy of the shared schema), and the coordinator's experiment
names only the schema and the outcomes (``data.feature_schema``, ``data.outcomes``). A MEDS
consortium (``meds``, ``synth-meds``) is split the same way (each hospital's MEDS dataset, label
files and ``site.yaml``); the coordinator's experiment names only the outcomes, and the features
are agreed from the sites' thresholded code counts when the run starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedmeta.common.config import ExperimentConfig, load_config
from fedmeta.common.errors import ConfigError, ProvisionError
from fedmeta.deploy.consortium import load_consortium
from fedmeta.deploy.control import Control
from fedmeta.deploy.coordinator import CoordinatorHandle, start_coordinator
from fedmeta.deploy.launch import base_env, follow_run, submit_run
from fedmeta.deploy.node import NODE_FILE
from fedmeta.deploy.processes import Managed, Processes
from fedmeta.deploy.provision import PASSPHRASES, provision
from fedmeta.deploy.secrets import (
    CA_KEY,
    COORDINATOR_KEY,
    Passphrase,
    fresh_passphrase,
    secure_folder,
    write_passphrase_file,
)
from fedmeta.protocol.run_name import new as new_run_name

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def online_nodes(control: Control) -> set[int]:
    """The node ids the SuperLink reports online."""
    return {n.node_id for n in control.nodes() if n.status == "online"}


def wait_nodes_online(control: Control, node_ids: Sequence[int], *, timeout: float) -> None:
    """Wait until the SuperLink reports every node in ``node_ids`` online."""
    deadline = time.monotonic() + timeout
    want = set(node_ids)
    online: set[int] = set()
    while time.monotonic() < deadline:
        online = online_nodes(control)
        if want <= online:
            return
        time.sleep(0.3)
    raise ProvisionError(
        f"nodes {sorted(want - online)} not online after {timeout:.0f} s (online: {sorted(online)})"
    )


def write_local_consortium(path: Path, *, sites: Sequence[str], fleet_port: int, control_port: int) -> Path:
    """A consortium YAML for ``sites`` hospitals and a coordinator on 127.0.0.1."""
    doc = {
        "consortium": "local",
        "coordinator": {"host": LOOPBACK, "sans": ["localhost", LOOPBACK],
                        "fleet_port": fleet_port, "control_port": control_port},
        "sites": [{"name": s} for s in sites],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def bundle_name(site: str) -> str:
    """A consortium site name (``[a-z0-9-]``) for a data source's site name."""
    name = "".join(c if c.isalnum() else "-" for c in site.lower()).strip("-")
    return name or "site"


@dataclass(frozen=True)
class SitePlan:
    """One hospital of a local consortium: its bundle name and what its node file says it serves."""

    name: str
    data: str | dict[str, object]


def site_names(cfg: ExperimentConfig, n_sites: int) -> list[str]:
    """``n_sites`` of the data source's sites (checks the source, its sites and the holdout):
    for a table source, those whose training and test splits meet the default site policy's
    ``min_patients`` first, so that a demonstration does not provision a hospital that then
    declines; a site that will decline is named, with its counts, before anything starts."""
    from fedmeta.common.data.registry import data_spec, load_site, simulation_sites
    from fedmeta.sitecore.policy import SitePolicy

    data_spec(cfg.data)
    names = list(simulation_sites(cfg.data))
    if n_sites > len(names):
        raise ConfigError(f"--sites {n_sites}: the experiment's data source {cfg.data.source!r} "
                          f"has {len(names)} sites")
    if cfg.data.source not in ("fed-heart", "ehr", "synth-ehr"):
        return names[:n_sites]
    floor = SitePolicy().min_patients
    sites = {n: load_site(cfg.data, n) for n in names}
    sizes = {n: (s.n_train, s.n_test) for n, s in sites.items()}
    meets = [n for n in names if min(sizes[n]) >= floor]
    chosen = (meets + [n for n in names if n not in meets])[:n_sites]
    for n in chosen:
        if n not in meets:
            log.warning("site %s will decline under the default policy: %d training and %d test "
                        "patients, below min_patients = %d", n, *sizes[n], floor)
    return chosen


def plan_sites(cfg: ExperimentConfig, n_sites: int, work: Path) -> tuple[list[SitePlan], ExperimentConfig]:
    """Which data each of ``n_sites`` hospitals serves, and the coordinator's experiment."""
    from fedmeta.common.data.registry import data_spec

    spec = data_spec(cfg.data)
    names = site_names(cfg, n_sites)
    if cfg.data.source in ("meds", "synth-meds"):
        return _plan_meds_sites(cfg, names, work, spec.outcomes)
    if cfg.data.source not in ("ehr", "synth-ehr"):
        d = cfg.data
        builtin: dict[str, object] = {"source": d.source, "synth_sites": d.synth_sites,
                                      "synth_seed": d.synth_seed}
        if d.path:
            builtin["path"] = d.path
        return [SitePlan(bundle_name(n), {**builtin, "site": n}) for n in names], cfg
    from fedmeta.common.data.ehr import ehr_root, synth_ehr_root
    from fedmeta.common.data.site_config import find_site_configs

    root = synth_ehr_root(cfg.data) if cfg.data.source == "synth-ehr" else ehr_root(cfg.data)
    configs = {c.name: c for c in find_site_configs(root)}
    plans = []
    for n in names:
        c = configs[n]
        own = _own_folder(work, n)
        folder = own / c.source.parent.name
        shutil.copytree(c.source.parent, folder, dirs_exist_ok=True)
        shutil.copyfile(c.schema, own / c.schema.name)
        plans.append(SitePlan(bundle_name(n), str(folder / "site.yaml")))
    coordinator_schema = work / "coordinator-schema.yaml"
    shutil.copyfile(next(iter(configs.values())).schema, coordinator_schema)
    experiment = load_config(None, [], base={
        **cfg.to_dict(),
        "data": {**cfg.to_dict()["data"], "source": "ehr", "path": "", "sites": [], "holdout": [],
                 "feature_schema": str(coordinator_schema), "outcomes": list(spec.outcomes)},
    })
    return plans, experiment


def _own_folder(work: Path, name: str) -> Path:
    own = work / "sites" / bundle_name(name) / "data"
    own.mkdir(parents=True, exist_ok=True)
    os.chmod(own.parent, 0o700)
    return own


def _plan_meds_sites(cfg: ExperimentConfig, names: Sequence[str], work: Path,
                     outcomes: Sequence[str]) -> tuple[list[SitePlan], ExperimentConfig]:
    """MEDS hospitals: each gets a copy of its own site folder (site.yaml, MEDS dataset, label
    files); the coordinator's experiment names only the outcomes: the features are agreed from
    the sites' thresholded code counts when the run starts."""
    from fedmeta.common.data.meds.source import meds_site_configs

    configs = {c.name: c for c in meds_site_configs(cfg.data)}
    plans = []
    for n in names:
        folder = _own_folder(work, n) / configs[n].source.parent.name
        shutil.copytree(configs[n].source.parent, folder, dirs_exist_ok=True)
        plans.append(SitePlan(bundle_name(n), str(folder / configs[n].source.name)))
    experiment = load_config(None, [], base={
        **cfg.to_dict(),
        "data": {**cfg.to_dict()["data"], "source": "meds", "path": "", "sites": [], "holdout": [],
                 "outcomes": list(outcomes)},
    })
    return plans, experiment


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


@dataclass(frozen=True)
class LocalUp:
    """A local consortium once every site is online, before its run is submitted: the processes
    (``superlink``, ``serverexec`` and one ``site-NAME`` per hospital, whose SuperNode is its
    child) and the started coordinator."""

    procs: Processes
    coordinator: CoordinatorHandle
    sites: dict[str, Managed]


def start_local_site(procs: Processes, bundle: Path, *, insecure: bool = False,
                     env: dict[str, str] | None = None, name: str | None = None) -> Managed:
    """``fedmeta site start --node BUNDLE/node.yaml`` as a process of its own."""
    argv = [sys.executable, "-m", "fedmeta.cli.main", "site", "start", "--node", str(bundle / NODE_FILE)]
    if insecure:
        argv.append("--insecure")
    return procs.start(name or f"site-{bundle.name}", argv, env=env or dict(os.environ))


def configure_bundle(bundle: Path, *, data: str | dict[str, object], runtime_port: int,
                     poll_interval_s: float | None = None, key_passphrase_file: Path | None = None) -> None:
    """Point a provisioned bundle's node file at its data, its own runtime port and state (and
    its idle poll, when given, a hospital's default otherwise; its key's passphrase file, when given)."""
    path = bundle / NODE_FILE
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc.update({"data": data, "runtime_port": runtime_port})
    if poll_interval_s is not None:
        doc["poll_interval_s"] = poll_interval_s
    if key_passphrase_file is not None:
        doc["key_passphrase_file"] = str(key_passphrase_file)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


@dataclass(frozen=True)
class LocalKeys:
    """The passphrases of a throwaway consortium's keys, one each (plaintext when insecure)."""

    ca: Passphrase
    coordinator: Passphrase
    deployment: Path

    def site(self, name: str) -> Path | None:
        """The file holding site ``name``'s key passphrase (None for plaintext keys)."""
        return None if self.coordinator.none else self.deployment / PASSPHRASES / f"{name}.pass"


def provision_local(consortium_path: Path, deployment: Path, *, secrets_dir: Path,
                    insecure: bool = False) -> LocalKeys:
    """Provision a throwaway consortium into ``deployment``: the CA key and the coordinator key
    each encrypted with a random passphrase of its own (``secrets_dir/ca.pass``,
    ``coordinator.pass``, 0600), and every site key made here with its own
    (``deployment/passphrases/<site>.pass``). No passphrase goes into an environment. With
    ``insecure`` the keys are plaintext."""
    if insecure:
        ca = coordinator = Passphrase(none=True)
    else:
        folder = secure_folder(secrets_dir)
        ca_secret = fresh_passphrase()
        write_passphrase_file(folder / "ca.pass", ca_secret)
        write_passphrase_file(folder / "coordinator.pass", fresh_passphrase([ca_secret]))
        ca = Passphrase(file=folder / "ca.pass", role=CA_KEY)
        coordinator = Passphrase(file=folder / "coordinator.pass", role=COORDINATOR_KEY)
    provision(load_consortium(consortium_path), deployment, ca_passphrase=ca, passphrase=coordinator,
              site_keys=True)
    return LocalKeys(ca=ca, coordinator=coordinator, deployment=deployment)


def deploy_local(
    *,
    sites: int,
    rounds: int | None,
    out: Path,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    insecure: bool = False,
    run_timeout: float = 900.0,
    secagg: bool = False,
    stream: bool = True,
    say: Callable[[str], None] = print,
    on_up: Callable[[LocalUp], None] | None = None,
) -> LocalResult:
    """Provision, start a TLS SuperLink and ``sites`` hospitals on 127.0.0.1, run, stop all.

    ``summary.json`` (and ``rounds.jsonl``, ``final.safetensors``) land in ``out`` as with
    ``fedmeta simulate``; the deployment (certificates, keys), state and logs in ``out/deploy``.
    ``on_up`` is called once every site is online, before the run is submitted (``fedmeta bench
    idle`` measures the idle consortium there); its time is not in ``startup_s`` nor ``run_s``.
    """
    if sites < 1:
        raise ConfigError(f"--sites must be >= 1, got {sites}")
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    cfg = load_config(config, list(overrides), allow_empty=False)  # every override checked as given
    if rounds is not None and any(o.split("=", 1)[0].strip() == "rounds" for o in overrides):
        raise ConfigError(f"--rounds {rounds} and --set rounds=…: give one of them")
    if rounds is not None or (config is None and not any(o.split("=", 1)[0].strip() == "rounds"
                                                             for o in overrides)):
        cfg = load_config(None, ["rounds=" + str(rounds or 2)], base=cfg.to_dict())
    if cfg.federation.min_nodes > sites:
        raise ConfigError(f"federation.min_nodes = {cfg.federation.min_nodes}: more than the "
                          f"{sites} sites started")
    if secagg:
        from fedmeta.common.data.registry import data_spec
        from fedmeta.server.secagg_app import refusal

        why = refusal(cfg, data_spec(cfg.data))
        if why is not None:
            raise ConfigError(f"--secagg: {why}")
    site_names(cfg, sites)  # the data source and its sites, before anything is written
    t0 = time.monotonic()
    out = out.resolve()
    work = out / "deploy"
    if work.exists():
        raise ProvisionError(f"{work}: already exists; give a new --out")
    work.mkdir(parents=True)
    os.chmod(work, 0o700)
    plans, experiment = plan_sites(cfg, sites, work)
    fleet_port, control_port = free_port(), free_port()
    consortium_path = write_local_consortium(work / "consortium.yaml", sites=[p.name for p in plans],
                                             fleet_port=fleet_port, control_port=control_port)
    deployment = work / "pki"
    keys = provision_local(consortium_path, deployment, secrets_dir=work / "secrets", insecure=insecure)
    passphrase = keys.coordinator
    for plan in plans:
        configure_bundle(deployment / "sites" / plan.name, data=plan.data, runtime_port=free_port(),
                         key_passphrase_file=keys.site(plan.name))
    t_prov = time.monotonic()
    run_name = new_run_name(experiment.algorithm)
    state = work / "coordinator"
    status, run_id, t_up, t_submit, t_run = "not started", -1, t_prov, t_prov, t_prov
    co = None
    with Processes(work / "run") as procs:
        try:
            co = start_coordinator(
                procs, deployment=deployment, state=state, passphrase=passphrase,
                fleet_address=f"{LOOPBACK}:{fleet_port}", insecure=insecure)
            site_env = base_env(work / "flwr-home-sites")
            started = {plan.name: start_local_site(procs, deployment / "sites" / plan.name,
                                                   insecure=insecure, env=site_env) for plan in plans}
            assert co.control is not None
            if co.node_ids:
                wait_nodes_online(co.control, list(co.node_ids.values()), timeout=90.0)
            else:
                time.sleep(5.0)  # insecure: no registration, so no node list to wait on
            t_up = time.monotonic()
            say(f"consortium up in {t_up - t0:.1f} s: coordinator 127.0.0.1:{fleet_port} (TLS), "
                f"{len(plans)} sites; running {experiment.algorithm} for {experiment.rounds} rounds")
            if on_up is not None:
                procs.refresh_children()
                on_up(LocalUp(procs=procs, coordinator=co, sites=started))
            t_submit = time.monotonic()
            run_id = submit_run(co.control, co.layout.flwr_home,
                                run_config={"experiment": experiment.to_json(), "run-name": run_name},
                                secure_aggregation=secagg)
            status = follow_run(co.control, run_id, timeout=run_timeout, stream=stream, write=say)
            t_run = time.monotonic()
        finally:
            procs.refresh_children()
            if co is not None and co.control is not None:
                co.control.close()  # an open connection holds the SuperLink's shutdown
    leftovers = procs.leftovers()
    if leftovers:
        log.error("processes still running after stop: %s", leftovers)
    if status != "finished:completed":
        run_log = state / "runs" / run_name / "run.log"
        errors = [line.split(" error: ", 1)[1] for line in
                  (run_log.read_text(errors="replace").splitlines() if run_log.exists() else [])
                  if " error: " in line]
        raise ProvisionError(f"run {run_id} ended {status!r}" + (f": {errors[-1]}" if errors else "")
                             + f"; see {run_log} and the logs in {work / 'run' / 'logs'}")
    folder = state / "runs" / run_name
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    summary = out / "summary.json"
    if not summary.is_file():
        raise ProvisionError(f"run {run_id} completed but wrote no {folder / 'summary.json'}")
    return LocalResult(status=status, run_id=run_id, provision_s=t_prov - t0, startup_s=t_up - t_prov,
                       run_s=t_run - t_submit, total_s=time.monotonic() - t0, summary=summary,
                       leftovers=leftovers)


__all__ = ["LOOPBACK", "LocalKeys", "LocalResult", "LocalUp", "configure_bundle", "deploy_local", "free_port",
           "online_nodes", "plan_sites", "provision_local", "start_local_site", "wait_nodes_online",
           "write_local_consortium"]
