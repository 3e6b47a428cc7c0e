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
from fedmeta.deploy.node import NodeConfig, load_node_config
from fedmeta.deploy.processes import Processes, descendants
from fedmeta.deploy.provision import provision
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
    sites: list[NodeConfig]
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
        sites = [load_node_config(pki / "sites" / f"site-{i}" / "node.yaml")
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
    stranger = NodeConfig(site="stranger", superlink=d.co.fleet_address,
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


def test_secure_aggregation_run_over_tls(deployment: Deployment) -> None:
    """``--secagg``: Reptile over SecAgg+ through the real SuperLink; sites clip to privacy.clip."""
    d = deployment
    out = d.root / "secagg"
    run_id = submit_run(d.co.env, app=project_root(), secagg=True, run_config={
        "config": "", "overrides": "rounds=1 privacy.clip=0.05 tasks.meta_batch=4",
        "out": str(out)})
    d.procs.refresh_children()
    assert wait_run(d.co.env, run_id, timeout=300) == "finished:completed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["rounds_completed"] == 1
    (r1,) = _rounds(out)
    # Each site's delta (norm 0.05-0.3 unclipped) was clipped to 0.05 before masking, so the
    # securely averaged delta cannot exceed it (quantisation adds at most ~1e-8 per coordinate).
    assert 0 < r1["mean_delta_norm"] <= 0.05 + 1e-5
    assert (out / "final.safetensors").is_file()
    started = [e for e in _audit(d, run_id) if e["event"] == "run_started"]
    assert started and started[0]["algorithm"] == "reptile+secagg"


def test_flwr_run_never_rewrites_the_source_pyproject(deployment: Deployment) -> None:
    # `flwr run` migrates the pyproject.toml it is given; submit_run hands it a staged copy.
    assert _digest(project_root() / "pyproject.toml") == deployment.pyproject_sha256


MALFORMED_SITE = Path(__file__).parent / "malformed_site"


def _audit(d: Deployment, run_id: int) -> list[dict]:
    return [e for e in read_log(d.co.layout.audit) if e.get("run_id") == run_id]


def _rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _restart_site_until_online(
    d: Deployment, co: CoordinatorHandle, site: NodeConfig, *, timeout: float
) -> None:
    """Start the site's SuperNode again until the SuperLink admits it (a SuperNode that crashed is
    refused re-activation until its old session's heartbeat expires: exit code 305)."""
    deadline = time.monotonic() + timeout
    name = f"site-{site.site}"
    log = d.procs.run_dir / "logs" / f"{name}.log"
    while time.monotonic() < deadline:
        offset = log.stat().st_size if log.exists() else 0
        m = start_site(d.procs, site, runtime_port=free_port())
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end and m.alive():
            with log.open("rb") as f:
                f.seek(offset)
                if f"SuperNode ID: {co.node_ids[site.site]}".encode() in f.read():
                    return
            time.sleep(0.5)
        d.procs.stop(name)
        time.sleep(3.0)
    raise AssertionError(f"{site.site} was not re-admitted within {timeout:.0f} s")


@dataclass
class FaultScenario:
    out: Path
    first_run: int
    resumed_run: int
    faulty_node: int
    crashed_node: int
    first_audit: list[dict]
    resumed_audit: list[dict]


@pytest.fixture(scope="module")
def faults(deployment: Deployment) -> FaultScenario:
    """One run that meets all three faults (each start-up costs tens of seconds, so they share it).

    * site-3 is faulty: its ClientApp puts a NaN into every delta it sends;
    * site-2 crashes (SIGKILL) while computing round 1 and restarts later;
    * after round 1 is checkpointed the coordinator crashes (SIGKILL), restarts on the same state
      database, and the run is resubmitted with ``resume=true``.

    A crashed SuperNode is refused re-activation until the SuperLink has seen its previous session
    expire, so site-2 is restarted until admitted, as systemd's ``Restart=`` would.
    """
    d = deployment
    out = d.root / "faults"
    faulty, crashed = d.sites[N_SITES], d.sites[2]
    start_site(d.procs, faulty, runtime_port=free_port(),
               extra_env={"PYTHONPATH": str(MALFORMED_SITE)})
    wait_nodes_online(d.co.env, [d.co.node_ids[s.site] for s in d.sites], timeout=60)
    overrides = ["rounds=2", "federation.timeout_s=40", *FAST]
    first = submit_run(d.co.env, app=project_root(), run_config={
        "config": "", "overrides": " ".join(overrides), "out": str(out)})

    # Round 1 starts right after the handshake (audited as run_started): kill site-2 once the
    # ClientApp computing its round-1 update is running.
    _wait_for(lambda: any(e["event"] == "run_started" for e in _audit(d, first)), 120,
              "run_started in the audit log")
    victim = f"site-{crashed.site}"

    def clientapp_running() -> bool:
        for pid in descendants(d.procs.procs[victim].pid):
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and b"flwr-clientapp" in cmdline.read_bytes():
                return True
        return False

    _wait_for(clientapp_running, 60, "site-2's round-1 ClientApp")
    d.procs.kill(victim)

    _wait_for(lambda: (out / "rounds.jsonl").exists() and len(_rounds(out)) >= 1, 120,
              "round 1 in rounds.jsonl")
    assert (out / "checkpoint.safetensors").is_file()
    d.procs.kill("superlink")
    co = start_coordinator(
        d.procs, deployment=d.pki, state=d.co.layout.state, fleet_address=d.co.fleet_address,
        control_host=LOOPBACK, control_port=int(d.co.control_address.rsplit(":", 1)[1]),
    )
    assert co.node_ids == d.co.node_ids  # same database: same registered identities
    _restart_site_until_online(d, co, crashed, timeout=150)
    wait_nodes_online(co.env, [co.node_ids[s.site] for s in d.sites], timeout=90)
    # After the restart the operator asks for three hospitals (min_nodes=3) and gives SuperNodes
    # that still hold messages of the killed run time to drain them.
    resume_overrides = ["rounds=2", "federation.timeout_s=90", "federation.min_nodes=3", *FAST]
    resumed = submit_run(co.env, app=project_root(), run_config={
        "config": "", "overrides": " ".join(resume_overrides), "out": str(out),
        "resume": "true"})
    try:
        assert wait_run(co.env, resumed, timeout=300) == "finished:completed"
    finally:
        d.procs.stop(f"site-{faulty.site}")
    return FaultScenario(
        out=out, first_run=first, resumed_run=resumed,
        faulty_node=d.co.node_ids[faulty.site], crashed_node=d.co.node_ids[crashed.site],
        first_audit=_audit(d, first), resumed_audit=_audit(d, resumed),
    )


def _contributions(events: list[dict], round_: int) -> dict[int, dict]:
    return {e["node_id"]: e for e in events
            if e["event"] == "contribution" and e["round"] == round_}


def test_malformed_delta_is_rejected_logged_and_the_round_goes_on(faults: FaultScenario) -> None:
    rounds = _rounds(faults.out)
    for r in rounds:
        assert len(r["rejected"]) == 1 and r["applied"], r
        (reason,) = r["rejected"].values()
        assert "NaN/Inf" in reason
    for events, round_ in ((faults.first_audit, 1), (faults.resumed_audit, 2)):
        bad = _contributions(events, round_)[faults.faulty_node]
        assert bad["accepted"] is False and "NaN/Inf" in bad["reason"]
        assert bad["site"] == f"site-{N_SITES}"
        (done,) = [e for e in events if e["event"] == "round_completed" and e["round"] == round_]
        assert done["rejected"] == [faults.faulty_node]


def test_site_crash_mid_round_then_rejoin(faults: FaultScenario) -> None:
    r1, r2 = _rounds(faults.out)
    assert len(r1["sampled"]) == N_SITES + 1
    assert len(r1["accepted"]) == N_SITES - 1 and r1["applied"]  # min_nodes = 2 was met
    missing = _contributions(faults.first_audit, 1)[faults.crashed_node]
    assert missing["accepted"] is False
    assert missing["reason"] == "no reply before the round timeout"
    (done,) = [e for e in faults.first_audit if e["event"] == "round_completed"]
    assert done["missing"] == [faults.crashed_node]
    assert len(r2["accepted"]) == N_SITES  # site-2 is back
    assert _contributions(faults.resumed_audit, 2)[faults.crashed_node]["accepted"] is True


def test_coordinator_restart_resumes_from_checkpoint(faults: FaultScenario) -> None:
    assert [r["round"] for r in _rounds(faults.out)] == [1, 2]
    resumed = [e for e in faults.resumed_audit if e["event"] == "checkpoint_resumed"]
    assert [e["round"] for e in resumed] == [1]
    assert not any(e["event"] == "contribution" and e["round"] == 1
                   for e in faults.resumed_audit)  # round 1 was not redone
    assert not any(e["event"] == "run_finished" for e in faults.first_audit)
    summary = json.loads((faults.out / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["sites"]) >= N_SITES
