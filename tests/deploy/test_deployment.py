"""End to end on 127.0.0.1: a real SuperLink (TLS, node authentication) and real SuperNodes.

One consortium is provisioned and its coordinator and three hospitals are started once for the
module (each start costs seconds: the SuperNodes poll every 3 s and every message starts a
ClientApp process that imports torch). The fixture stops every process by PID at the end, pass or
fail, and fails if any survived.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy.certs import cert_pem, make_ca, write_public_bytes
from fedmeta.deploy.consortium import load_consortium
from fedmeta.deploy.keys import make_site_keys
from fedmeta.deploy.launch import (
    check_fleet_is_grpc,
    list_nodes,
    project_root,
    submit_run,
    superlink_uses_grpc_fleet,
    wait_run,
)
from fedmeta.deploy.local import (
    LOOPBACK,
    CoordinatorHandle,
    free_port,
    start_coordinator,
    start_site,
    wait_nodes_online,
    write_local_consortium,
)
from fedmeta.deploy.processes import Processes
from fedmeta.deploy.provision import provision
from fedmeta.deploy.siteconfig import SiteConfig, load_site_config
from fedmeta.server.audit import read_log

pytestmark = pytest.mark.deployment

N_SITES = 3  # started; site-3 is registered but kept offline for the no-CA test
FAST = ["eval.adapt_steps=20", "tasks.meta_batch=4"]


@dataclass
class Deployment:
    root: Path
    pki: Path
    procs: Processes
    co: CoordinatorHandle
    sites: list[SiteConfig]
    pyproject_sha256: str


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    sha = _digest(project_root() / "pyproject.toml")
    fleet, control = free_port(), free_port()
    cpath = write_local_consortium(root / "consortium.yaml", sites=N_SITES + 1,
                                   fleet_port=fleet, control_port=control)
    pki = root / "pki"
    provision(load_consortium(cpath), pki)
    procs = Processes(root / "run")
    try:
        co = start_coordinator(
            procs, deployment=pki, state=root / "coordinator",
            fleet_address=f"{LOOPBACK}:{fleet}", control_host=LOOPBACK, control_port=control,
        )
        sites = [load_site_config(pki / "sites" / f"site-{i}" / "site.yaml")
                 for i in range(N_SITES + 1)]
        for s in sites[:N_SITES]:
            start_site(procs, s, runtime_port=free_port())
        wait_nodes_online(co.env, [co.node_ids[s.site] for s in sites[:N_SITES]], timeout=60)
        yield Deployment(root=root, pki=pki, procs=procs, co=co, sites=sites,
                         pyproject_sha256=sha)
    finally:
        procs.refresh_children()
        procs.stop_all()
    leftovers = procs.leftovers()
    assert leftovers == [], f"processes survived the deployment: {leftovers}"
    recorded = json.loads((root / "run" / "pids.json").read_text())
    assert {"superlink", "site-site-0", "site-site-1", "site-site-2"} <= set(recorded)
    assert not any(v["alive"] for v in recorded.values())


def _wait_exit(procs: Processes, name: str, timeout: float) -> int:
    m = procs.procs[name]
    try:
        return m.popen.wait(timeout=timeout)
    finally:
        procs.stop(name)


def _online(d: Deployment) -> set[int]:
    return {int(str(n["node-id"])) for n in list_nodes(d.co.env) if n.get("status") == "online"}


def test_fleet_api_is_grpc_over_tls(deployment: Deployment) -> None:
    d = deployment
    assert superlink_uses_grpc_fleet(d.co.process.log_path) == d.co.fleet_address
    check_fleet_is_grpc(d.co.fleet_address, ca=d.pki / "ca" / "ca.crt")
    other = make_ca(common_name="not ours", organization="x", validity_days=1)
    write_public_bytes(d.root / "other-ca.crt", cert_pem(other.cert))
    with pytest.raises(ProvisionError, match="did not complete a gRPC\\+TLS handshake"):
        check_fleet_is_grpc(d.co.fleet_address, ca=d.root / "other-ca.crt", timeout=3)
    for i in range(N_SITES):
        argv = d.procs.procs[f"site-site-{i}"].popen.args
        assert "--grpc-rere" in argv and "--root-certificates" in argv and "--insecure" not in argv
    assert "--enable-supernode-auth" in d.co.process.popen.args


def test_unregistered_key_is_refused(deployment: Deployment) -> None:
    d = deployment
    keys = make_site_keys(d.root / "stranger", comment="stranger")
    stranger = SiteConfig(site="stranger", superlink=d.co.fleet_address,
                          root_certificates=d.pki / "ca" / "ca.crt",
                          auth_private_key=keys.private, node_config={"partition-id": 0})
    before = _online(d)
    start_site(d.procs, stranger, runtime_port=free_port(), max_retries=1, max_wait_time=10)
    code = _wait_exit(d.procs, "site-stranger", timeout=60)
    assert code != 0
    assert "Failed to activate SuperNode" in d.procs.procs["site-stranger"].log_path.read_text()
    assert _online(d) == before


def test_site_without_the_ca_cannot_connect(deployment: Deployment) -> None:
    d = deployment
    late = d.sites[N_SITES]  # registered, never started with the CA
    before = _online(d)
    start_site(d.procs, late, runtime_port=free_port(), use_ca=False, max_retries=1,
               max_wait_time=10)
    argv = d.procs.procs[f"site-{late.site}"].popen.args
    assert "--root-certificates" not in argv
    code = _wait_exit(d.procs, f"site-{late.site}", timeout=60)
    assert code != 0
    assert d.co.node_ids[late.site] not in _online(d)
    assert _online(d) == before


def test_federated_reptile_run_over_tls(deployment: Deployment) -> None:
    d = deployment
    out = d.root / "results"
    t0 = time.monotonic()
    run_id = submit_run(d.co.env, app=project_root(), run_config={
        "config": "", "overrides": " ".join(["rounds=2", *FAST]), "out": str(out)})
    d.procs.refresh_children()
    status = wait_run(d.co.env, run_id, timeout=300)
    elapsed = time.monotonic() - t0
    assert status == "finished:completed", (status, elapsed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "reptile" and summary["rounds"] == 2
    assert len(summary["sites"]) == N_SITES
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(len(r["accepted"]) == N_SITES and not r["rejected"] for r in rounds)
    assert (out / "final.safetensors").is_file()
    events = [e["event"] for e in read_log(d.co.layout.audit)]
    assert events.count("node_registered") == N_SITES + 1
    # The audit log holds identities only: no arrays, no metrics beyond counts.
    text = d.co.layout.audit.read_text()
    assert "query_loss" not in text and "arrays" not in text
    (d.root / "timing.json").write_text(json.dumps(
        {"run_s": elapsed, "round_wall_s": [r["wall_s"] for r in rounds]}))


def test_flwr_run_never_rewrites_the_source_pyproject(deployment: Deployment) -> None:
    # `flwr run` migrates the pyproject.toml it is given; submit_run hands it a staged copy.
    assert _digest(project_root() / "pyproject.toml") == deployment.pyproject_sha256
