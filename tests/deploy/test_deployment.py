"""A real consortium on 127.0.0.1, attacked as a hostile coordinator operator or participant would.

One consortium is provisioned (each key encrypted with a passphrase of its own) and its coordinator (TLS
SuperLink, node authentication) and three hospitals (``fedmeta site start``: a SuperNode in
process isolation and the site worker) are started once for the module; site-3 is provisioned
but kept for the attacks that need a fourth node. The fixture stops every process by PID at the
end, pass or fail, and fails if any survived. Tests run in file order: the last ones restart the
coordinator.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedmeta.common.config import load_config
from fedmeta.common.data.schema import Feature, Schema, save_schema
from fedmeta.common.errors import ProvisionError
from fedmeta.common.extras import installed_version
from fedmeta.deploy.certs import cert_pem, make_ca, write_public_bytes
from fedmeta.deploy.consortium import load_consortium
from fedmeta.deploy.control import Control
from fedmeta.deploy.coordinator import CoordinatorHandle, reconcile, start_coordinator
from fedmeta.deploy.launch import (
    base_env,
    bin_path,
    check_fleet_is_grpc,
    submit_run,
    superlink_uses_grpc_fleet,
    wait_for_port,
    wait_run,
)
from fedmeta.deploy.local import (
    LOOPBACK,
    configure_bundle,
    free_port,
    online_nodes,
    start_local_site,
    wait_nodes_online,
    write_local_consortium,
)
from fedmeta.deploy.processes import Managed, Processes, descendants
from fedmeta.deploy.provision import provision, revoke_site
from fedmeta.deploy.secrets import (
    CA_KEY,
    MemoryFile,
    Passphrase,
    decrypted_pem,
    write_passphrase_file,
)
from fedmeta.deploy.sitekeys import fingerprint, fingerprint_of_bytes, make_site_keys
from fedmeta.protocol.app import PUBLISHER
from fedmeta.server.audit import read_log

pytestmark = pytest.mark.deployment

SITES = ["site-0", "site-1", "site-2", "site-3"]  # Cleveland, Hungary, Switzerland, VA Long Beach
STARTED = SITES[:3]
SECRET = "a passphrase only this test knows"  # the coordinator key's
CA_SECRET = "the CA key's passphrase, its own"
PASS = Passphrase(env="FEDMETA_KEY_PASSPHRASE")
FAST = ["algorithm=reptile", "eval.adapt_steps=20", "tasks.meta_batch=4", "federation.timeout_s=60"]
IDENTIFIER = "Doe, John MRN 0012345"
MALFORMED_SITE = Path(__file__).parent / "malformed_site"


@dataclass
class Consortium:
    root: Path
    pki: Path
    procs: Processes
    co: CoordinatorHandle
    site_env: dict[str, str]
    fleet: int
    control: int

    def bundle(self, site: str) -> Path:
        return self.pki / "sites" / site

    @property
    def ca_pass(self) -> Passphrase:
        return Passphrase(file=self.root / "ca.pass", role=CA_KEY)

    def site_pass(self, site: str) -> Passphrase:
        """The passphrase of the key provisioning made for ``site`` (its own)."""
        return Passphrase(file=self.pki / "passphrases" / f"{site}.pass")

    def env(self, site: str, **extra: str) -> dict[str, str]:
        """A site process's environment: its own key's passphrase (``$FEDMETA_KEY_PASSPHRASE``)."""
        secret = self.site_pass(site).read()
        assert secret is not None
        return {**self.site_env, "FEDMETA_KEY_PASSPHRASE": secret.decode(), **extra}

    def ids(self, sites: list[str]) -> list[int]:
        return [self.co.node_ids[s] for s in sites]

    def restart_coordinator(self) -> None:
        if self.co.control is not None:
            self.co.control.close()
        self.procs.kill("superlink")
        self.co = start_coordinator(
            self.procs, deployment=self.pki, state=self.root / "coordinator", passphrase=PASS,
            fleet_address=f"{LOOPBACK}:{self.fleet}")


def _policy(bundle: Path, **policy: object) -> None:
    path = bundle / "node.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["policy"] = {**doc["policy"], **policy}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("deploy")
    old = os.environ.get("FEDMETA_KEY_PASSPHRASE")
    os.environ["FEDMETA_KEY_PASSPHRASE"] = SECRET
    fleet, control = free_port(), free_port()
    path = write_local_consortium(root / "consortium.yaml", sites=SITES, fleet_port=fleet, control_port=control)
    doc = yaml.safe_load(path.read_text())
    for i, s in enumerate(doc["sites"]):
        s["partition_id"] = i
    path.write_text(yaml.safe_dump(doc))
    pki = root / "pki"
    write_passphrase_file(root / "ca.pass", CA_SECRET.encode())
    provision(load_consortium(path), pki, ca_passphrase=Passphrase(file=root / "ca.pass", role=CA_KEY),
              passphrase=PASS, site_keys=True)
    for i, site in enumerate(SITES):
        configure_bundle(pki / "sites" / site, data={"source": "fed-heart", "partition": i},
                         runtime_port=free_port())
        _policy(pki / "sites" / site, min_patients=15)  # Switzerland tests on 16 patients
    procs = Processes(root / "run")
    co = None
    try:
        co = start_coordinator(procs, deployment=pki, state=root / "coordinator", passphrase=PASS,
                               fleet_address=f"{LOOPBACK}:{fleet}")
        site_env = base_env(root / "flwr-home-sites")
        site_env.pop("FEDMETA_KEY_PASSPHRASE", None)  # the coordinator key's: no site has it
        d = Consortium(root, pki, procs, co, site_env, fleet, control)
        for site in STARTED:
            start_local_site(procs, pki / "sites" / site, env=d.env(site))
        assert co.control is not None
        wait_nodes_online(co.control, [co.node_ids[s] for s in STARTED], timeout=90)
        yield d
        co = d.co
    finally:
        if co is not None and co.control is not None:
            co.control.close()
        procs.refresh_children()
        procs.stop_all()
        if old is None:
            os.environ.pop("FEDMETA_KEY_PASSPHRASE", None)
        else:
            os.environ["FEDMETA_KEY_PASSPHRASE"] = old
    assert procs.leftovers() == [], f"processes survived the deployment: {procs.leftovers()}"


def _run(d: Consortium, name: str, overrides: list[str], *, timeout: float = 240,
         resume: bool = False) -> tuple[int, str, Path]:
    cfg = load_config(None, [*FAST, *overrides])
    assert d.co.control is not None
    run_id = submit_run(d.co.control, d.co.layout.flwr_home,
                        run_config={"experiment": cfg.to_json(), "run-name": name, "resume": resume})
    d.procs.refresh_children()
    status = wait_run(d.co.control, run_id, timeout=timeout)
    return run_id, status, d.co.layout.runs / name


def _rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]


def _audit(d: Consortium, run_id: int | None = None) -> list[dict]:
    return [e for e in read_log(d.co.layout.audit) if run_id is None or e.get("run_id") == run_id]


def _site_audit(d: Consortium, site: str) -> list[dict]:
    return read_log(d.bundle(site) / "state" / "audit.jsonl")


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- the channel and who may use it -----------------------------------------------------------------


def test_fleet_api_is_grpc_over_tls_and_keys_stay_in_memory(consortium: Consortium) -> None:
    d = consortium
    assert superlink_uses_grpc_fleet(d.co.process.log_path) == d.co.fleet_address
    check_fleet_is_grpc(d.co.fleet_address, ca=d.pki / "ca" / "ca.crt")
    other = make_ca(common_name="not ours", organization="x", validity_days=1)
    write_public_bytes(d.root / "other-ca.crt", cert_pem(other.cert))
    with pytest.raises(ProvisionError, match="did not complete a gRPC\\+TLS handshake"):
        check_fleet_is_grpc(d.co.fleet_address, ca=d.root / "other-ca.crt", timeout=3)
    superlink = d.co.process.popen.args
    assert "--enable-supernode-auth" in superlink
    assert superlink[superlink.index("--ssl-keyfile") + 1].startswith("/dev/fd/")  # decrypted in memory
    secret = f"{PASS.env}=".encode()
    # control arm: the fedmeta processes that decrypt the keys have the passphrase (as given) ...
    assert secret in Path(f"/proc/{d.procs.procs[f'site-{STARTED[0]}'].pid}/environ").read_bytes()
    # ... and no Flower process, nor the ServerApp's executor, has it: keys reach them in memory
    for name in ("superlink", "serverexec"):
        assert secret not in Path(f"/proc/{d.procs.procs[name].pid}/environ").read_bytes(), name
    for site in STARTED:
        nodes = [p for p in descendants(d.procs.procs[f"site-{site}"].pid)
                 if b"fedmeta.deploy.supernode" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(nodes) == 1, site
        argv = Path(f"/proc/{nodes[0]}/cmdline").read_bytes().split(b"\0")
        assert b"--root-certificates" in argv and b"--insecure" not in argv
        assert argv[argv.index(b"--isolation") + 1] == b"process"  # the SuperNode launches nothing
        assert argv[argv.index(b"--auth-supernode-private-key") + 1].startswith(b"/dev/fd/")
        assert secret not in Path(f"/proc/{nodes[0]}/environ").read_bytes(), site


def test_a_node_without_a_registered_key_or_the_ca_cannot_connect(consortium: Consortium) -> None:
    d = consortium
    before = online_nodes(d.co.control)  # type: ignore[arg-type]
    stranger = make_site_keys(d.root / "stranger", comment="stranger", passphrase=SECRET.encode())
    late = d.bundle("site-3")  # registered, but started without the consortium CA
    for name, key, ca, pw in (("stranger", stranger.private, True, PASS),
                              ("no-ca", late / "supernode.key", False, d.site_pass("site-3"))):
        with decrypted_pem(key, pw, openssh=True) as mem, MemoryFile("s", b"x" * 32) as secret:
            argv = [sys.executable, "-m", "fedmeta.deploy.supernode", "--grpc-rere", "--superlink",
                    d.co.fleet_address, "--auth-supernode-private-key", mem.path, "--isolation", "process",
                    "--superexec-auth-secret-file", secret.path, "--port", str(free_port()),
                    "--max-retries", "1", "--max-wait-time", "10"]
            if ca:
                argv += ["--root-certificates", str(late / "ca.crt")]
            m = d.procs.start(f"attempt-{name}", argv, env=d.site_env, pass_fds=[mem.fd, secret.fd])
            try:
                code = m.popen.wait(timeout=60)
            finally:
                d.procs.stop(m.name)
        assert code != 0, name
    assert "Failed to activate" in d.procs.procs["attempt-stranger"].log_path.read_text()
    assert online_nodes(d.co.control) == before  # type: ignore[arg-type]


# -- who may run code on the coordinator and use its Control API -----------------------------------

HOSTILE = Path(__file__).parent / "hostile"
LOCAL_USER = HOSTILE / "local_user.py"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _stock_superlink(d: Consortium, name: str, *, fleet: int, control: int,
                     env: dict[str, str] | None = None) -> tuple[Managed, MemoryFile]:
    """Flower's SuperLink as Flower runs it by default (the arrangement before this fix): the
    HTTP Control and Runtime API on a TCP port of 127.0.0.1, ``subprocess`` isolation (it starts
    ``flower-superexec``, which starts ``flwr-serverapp`` for any bundle), with the coordinator's
    TLS key decrypted into memory as fedmeta hands it over."""
    key = decrypted_pem(d.pki / "coordinator" / "server.key", PASS)
    co = d.pki / "coordinator"
    argv = [bin_path("flower-superlink"), "--ssl-ca-certfile", str(co / "ca.crt"),
            "--ssl-certfile", str(co / "server.crt"), "--ssl-keyfile", key.path, "--enable-supernode-auth",
            "--fleet-api-type", "grpc-rere", "--fleet-api-address", f"{LOOPBACK}:{fleet}",
            "--host", LOOPBACK, "--port", str(control), "--disable-runtime-dependency-installation"]
    m = d.procs.start(name, argv, env=env or d.co.env, pass_fds=[key.fd])
    wait_for_port(LOOPBACK, control, timeout=60, proc_alive=m.alive)
    wait_for_port(LOOPBACK, fleet, timeout=60, proc_alive=m.alive)
    return m, key


def _tcp_control(d: Consortium, port: int) -> Control:
    """The Control API of a stock SuperLink, over TCP with TLS (as ``flwr`` reaches it)."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient.from_server_address(
        f"{LOOPBACK}:{port}", insecure=False, root_certificates=(d.pki / "ca" / "ca.crt").read_bytes(),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
    return Control.with_client(client)


def _as_nobody(*args: str) -> dict:
    """Run the local-user attack (``hostile/local_user.py``) as uid ``nobody``; its JSON report."""
    res = subprocess.run([*NOBODY, sys.executable, str(LOCAL_USER), *args], capture_output=True, text=True,
                         timeout=120, check=False, env={"PATH": os.environ["PATH"], "HOME": "/tmp"},
                         cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from its socket inodes and /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


THEFT_APP = (
    "import json, os\n"
    "from pathlib import Path\n"
    "from flwr.serverapp import ServerApp\n"
    "serverapp = ServerApp()\n"
    "@serverapp.main()\n"
    "def main(grid, context):\n"
    "    stolen = False\n"
    "    for proc in Path('/proc').iterdir():\n"
    "        try:\n"
    "            if b'superlink' not in (proc / 'cmdline').read_bytes():\n"
    "                continue\n"
    "            for fd in (proc / 'fd').iterdir():\n"
    "                if os.readlink(fd).startswith('/memfd:') and b'PRIVATE KEY' in fd.read_bytes():\n"
    "                    stolen = True\n"
    "        except OSError:\n"
    "            continue\n"
    "    Path(MARKER).write_text(json.dumps({'uid': os.getuid(), 'stole_tls_key': stolen}))\n"
)


def _theft_bundle(folder: Path, marker: Path, *, publisher: str, name: str, version: str) -> Path:
    """An app whose ServerApp looks for the SuperLink's decrypted TLS key in its memory files
    (``/proc/PID/fd/N``) and writes what it found to ``marker``."""
    folder.mkdir()
    (folder / "theft_app.py").write_text(f"MARKER = {str(marker)!r}\n" + THEFT_APP)
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\n\n[tool.flwr.app]\npublisher = "{publisher}"\n\n'
        '[tool.flwr.app.components]\nserverapp = "theft_app:serverapp"\nclientapp = "theft_app:serverapp"\n')
    return folder


def test_the_coordinator_runs_only_fedmeta_s_own_serverapp(consortium: Consortium, tmp_path: Path) -> None:
    """A run of another app, and one that claims to be fedmeta but carries code, submitted
    through the Control API. Control arm: Flower's own arrangement runs each bundle's ServerApp
    as the SuperLink's user, which finds the SuperLink's decrypted TLS key in its memory files.
    fedmeta's coordinator refuses both before any of their code runs, writes the refusal to its
    audit log and ends the run as failed; nothing reaches a site."""
    d = consortium
    apps = {"evil": ("evil", "evil", "0.0.1"), "impostor": (PUBLISHER, "fedmeta", installed_version())}
    stock, key = _stock_superlink(d, "stock-superlink", fleet=free_port(), control=free_port())
    try:
        control = _tcp_control(d, int(stock.popen.args[stock.popen.args.index("--port") + 1]))
        for label, (publisher, name, version) in apps.items():
            marker = tmp_path / f"stock-{label}.json"
            run_id = control.start_run(_theft_bundle(tmp_path / f"stock-{label}", marker, publisher=publisher,
                                                     name=name, version=version), {})
            _wait_for(marker.exists, 90, f"stock arm, {label}: the foreign ServerApp ran")
            assert json.loads(marker.read_text()) == {"uid": os.getuid(), "stole_tls_key": True}, label
            control.stop_run(run_id)
        control.close()
    finally:
        d.procs.stop("stock-superlink")
        key.close()
    assert d.co.control is not None
    reasons = {"evil": "app 'evil/evil' is not 'fedmeta/fedmeta'",
               "impostor": "the bundle carries files (theft_app.py); fedmeta runs only its installed code"}
    for label, (publisher, name, version) in apps.items():
        marker = tmp_path / f"fixed-{label}.json"
        run_id = d.co.control.start_run(_theft_bundle(tmp_path / f"fixed-{label}", marker, publisher=publisher,
                                                      name=name, version=version), {})
        assert wait_run(d.co.control, run_id, timeout=60) == "finished:failed", label
        refused = [e for e in _audit(d, run_id) if e["event"] == "app_refused"]
        assert [(e["app"], e["reason"]) for e in refused] == [(f"{publisher}/{name}", reasons[label])]
        assert not marker.exists(), label  # none of its code ran
        for site in STARTED:
            assert not [e for e in _site_audit(d, site) if e.get("run_id") == run_id], site
    assert "flower-superexec" not in " ".join(
        Path(f"/proc/{p}/cmdline").read_text() for p in descendants(d.co.process.pid))


def test_another_local_user_cannot_use_the_control_api(consortium: Consortium, tmp_path: Path) -> None:
    """uid ``nobody`` on the coordinator host lists the nodes, registers a key of its own and
    starts a run of its own app. Control arm: Flower's Control API on 127.0.0.1 lets it do all
    three. fedmeta's SuperLink listens on TCP only for the Fleet API; its Control API is a 0600
    socket in the 0700 state folder (here under a folder anyone may enter, as /var/lib is), and
    every attempt fails on the file permissions; nothing changed on the SuperLink."""
    d = consortium
    port = free_port()
    stock, key = _stock_superlink(d, "stock-superlink-2", fleet=free_port(), control=port)
    try:
        got = _as_nobody("--tcp", f"{LOOPBACK}:{port}")
        assert set(got) == {"list_nodes", "register_node", "start_run"}
        assert all("ok" in v for v in got.values()), got  # the attack works on the stock arrangement
        assert got["register_node"]["ok"] > 0 and got["start_run"]["ok"] > 0
    finally:
        d.procs.stop("stock-superlink-2")
        key.close()
    open_parent = Path(tempfile.mkdtemp(prefix="fedmeta-coordinator-", dir="/tmp"))
    try:
        os.chmod(open_parent, 0o755)
        with Processes(d.root / "open-run") as procs:
            co = start_coordinator(procs, deployment=d.pki, state=open_parent / "state", passphrase=PASS,
                                   fleet_address=f"{LOOPBACK}:{free_port()}")
            try:
                assert co.control is not None
                before = co.control.nodes()
                assert stat.S_IMODE(co.layout.state.stat().st_mode) == 0o700
                assert stat.S_IMODE(co.layout.socket.stat().st_mode) == 0o600
                assert _tcp_listening_ports(co.process.pid) == {int(co.fleet_address.rsplit(":", 1)[1])}
                got = _as_nobody("--socket", str(co.layout.socket))
                assert {k: v.get("error") for k, v in got.items()} == dict.fromkeys(
                    ("list_nodes", "register_node", "start_run"), "ConnectError"), got
                assert all("Permission denied" in v["text"] for v in got.values()), got
                assert co.control.nodes() == before
                assert not any(e["event"] in ("run_started", "app_refused") for e in read_log(co.layout.audit))
            finally:
                if co.control is not None:
                    co.control.close()
    finally:
        shutil.rmtree(open_parent, ignore_errors=True)


# -- a run, and what stays where --------------------------------------------------------------------


def test_federated_run_over_tls_with_owner_only_state(consortium: Consortium) -> None:
    d = consortium
    run_id, status, folder = _run(d, "plain", ["rounds=2"])
    assert status == "finished:completed", status
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["sites"]) == set(STARTED)  # named by the registry, not by the nodes
    assert [r["round"] for r in _rounds(folder)] == [1, 2]
    assert all(sorted(r["accepted"]) == STARTED and not r["rejected"] for r in _rounds(folder))
    events = _audit(d, run_id)
    contributions = [e for e in events if e["event"] == "contribution"]
    assert len(contributions) == 6 and all(e["accepted"] and e["num_examples"] == 80 for e in contributions)
    assert {e["site"] for e in contributions} == set(STARTED)
    for p in [d.co.layout.state, d.co.layout.runs, folder]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for p in [*folder.iterdir(), d.co.layout.audit, d.co.layout.nodes]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # the SuperLink's state (and so every update in transit) is in memory, never on disk
    assert not d.co.layout.database.exists() and "--database" not in d.co.process.popen.args
    for site in STARTED:
        served = [e for e in _site_audit(d, site) if e["event"] == "request_served"
                  and e["run_id"] == run_id]
        assert [e["phase"] for e in served].count("train") == 2
        assert stat.S_IMODE((d.bundle(site) / "state").stat().st_mode) == 0o700
        status = d.bundle(site) / "state" / "status.json"  # what a health check reads
        assert json.loads(status.read_text())["status"] == "started"
        assert stat.S_IMODE(status.stat().st_mode) == 0o600


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_secure_aggregation_run_over_tls(consortium: Consortium, algorithm: str) -> None:
    """Reptile deltas and FOMAML meta-gradients over SecAgg+ through the real SuperLink and the
    site workers; sites clip to privacy.clip, so the securely averaged update cannot exceed it."""
    d = consortium
    cfg = load_config(None, [f"algorithm={algorithm}", "rounds=1", "privacy.clip=0.05", "tasks.meta_batch=4"])
    assert d.co.control is not None
    run_id = submit_run(d.co.control, d.co.layout.flwr_home, secure_aggregation=True,
                        run_config={"experiment": cfg.to_json(), "run-name": f"secagg-{algorithm}"})
    assert wait_run(d.co.control, run_id, timeout=300) == "finished:completed"
    folder = d.co.layout.runs / f"secagg-{algorithm}"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["rounds_completed"] == 1
    assert summary["algorithm"] == algorithm
    assert summary["secagg"]["sites"] == 3 and summary["secagg"]["noise_shared_by"] == 2
    (r1,) = _rounds(folder)
    assert 0 < r1["mean_delta_norm"] <= 0.05 + 1e-5


def test_the_site_policy_refuses_a_one_patient_test_split(consortium: Consortium) -> None:
    """A coordinator asking for a test split of its choosing (here 0.5 % of the patients: one or
    two) is refused at the greeting: the splits are the site's own, so it can neither shrink one
    below the floor nor nest two that differ by one patient."""
    d = consortium
    run_id, status, folder = _run(d, "tiny-test-split", ["rounds=1", "data.test_fraction=0.005"])
    assert status == "finished:failed"  # no site would take part
    excluded = [e for e in _audit(d, run_id) if e["event"] == "site_excluded"]
    assert {e["site"] for e in excluded} == set(STARTED)
    for e in excluded:
        assert e["reason"] == ("policy refusal: data.test_fraction = 0.005 and data.split_seed = 43 are not "
                               "this site's splits (0.34, 43)"), e
    for site in STARTED:
        assert any(e["event"] == "request_failed" and e["run_id"] == run_id
                   and e["category"] == "policy refusal" for e in _site_audit(d, site))
    assert not (folder / "summary.json").exists()
    # Why the run failed is in its run.log on the coordinator, each site named by the registry.
    log_text = (folder / "run.log").read_text()
    assert "error: the run failed: 0 site(s) can take part, fewer than federation.min_nodes" in log_text
    for site in STARTED:
        assert re.search(rf"{site}: policy refusal: data.test_fraction = 0.005", log_text), site


def test_a_planted_identifier_never_leaves_the_site(consortium: Consortium) -> None:
    """site-3 serves an EHR table; after it started, its nightly export brings a row with a name
    and a record number in a numeric column. The run that meets it gets a code and a category."""
    d = consortium
    data = d.root / "site-3-data"
    data.mkdir()
    save_schema(Schema((Feature("age", "numeric"), Feature("lactate", "numeric"))), data / "schema.yaml")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.normal(60, 10, 200).round(1), "lactate": rng.gamma(2, 1, 200).round(2),
                          "death": rng.integers(0, 2, 200)})
    frame.to_csv(data / "stays.csv", index=False)
    (data / "site.yaml").write_text(yaml.safe_dump({"kind": "ehr", "name": "ward-3", "path": "stays.csv",
                                                    "schema": "schema.yaml", "outcomes": ["death"]}))
    configure_bundle(d.bundle("site-3"), data=str(data / "site.yaml"), runtime_port=free_port())
    start_local_site(d.procs, d.bundle("site-3"), env=d.env("site-3"))
    wait_nodes_online(d.co.control, d.ids(["site-3"]), timeout=90)  # type: ignore[arg-type]
    frame["age"] = frame["age"].astype(object)
    frame.loc[7, "age"] = IDENTIFIER
    frame.to_csv(data / "stays.csv", index=False)
    run_id, status, folder = _run(d, "planted", ["rounds=1", "data.synth_seed=1"])
    assert status == "finished:completed", status  # the fed-heart sites ran; site-3 was excluded
    (excluded,) = [e for e in _audit(d, run_id) if e["event"] == "site_excluded"]
    assert excluded["site"] == "site-3" and excluded["reason"] == "data error"
    # The full message is in the site's own log, and nowhere on the coordinator.
    assert "0012345" in d.procs.procs["site-site-3"].log_path.read_text()
    coordinator_files = [p for p in (d.root / "coordinator").rglob("*") if p.is_file()]
    coordinator_files.append(d.co.process.log_path)  # the SuperLink's own log
    assert folder / "summary.json" in coordinator_files and d.co.layout.audit in coordinator_files
    for p in coordinator_files:
        content = p.read_bytes()
        for needle in (b"0012345", b"Doe, John", b"stays.csv", str(data).encode()):
            assert needle not in content, (p, needle)
    d.procs.stop("site-site-3")


def test_a_key_registered_outside_the_registry_never_takes_part(consortium: Consortium) -> None:
    """An outsider with Control API access registers its own key (as ``flwr supernode register``
    does) and joins with a plain Flower SuperNode (which would run any app). It is never greeted
    or sampled; the reconciliation every coordinator start runs removes its registration, and a
    restarted SuperLink (state in memory) does not know it at all."""
    d = consortium
    outsider = make_site_keys(d.root / "outsider", comment="outsider", passphrase=None)
    fp = fingerprint(outsider.public.read_bytes())
    assert d.co.control is not None
    node_id = d.co.control.register(outsider.public.read_bytes(), "fedmeta")
    argv = [bin_path("flower-supernode"), "--grpc-rere", "--superlink", d.co.fleet_address,
            "--root-certificates", str(d.pki / "ca" / "ca.crt"),
            "--auth-supernode-private-key", str(outsider.private.with_suffix(".openssh")),
            "--port", str(free_port())]
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(outsider.private.read_bytes(), None)
    outsider.private.with_suffix(".openssh").write_bytes(key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    d.procs.start("outsider", argv, env=d.site_env)
    wait_nodes_online(d.co.control, [node_id], timeout=60)  # type: ignore[arg-type]
    run_id, status, folder = _run(d, "with-outsider", ["rounds=1"])
    assert status == "finished:completed"
    assert all(set(r["sampled"]) <= set(STARTED) for r in _rounds(folder))
    refused = [e for e in _audit(d, run_id) if e["event"] == "node_refused"]
    assert [(e["node_id"], e["fingerprint"]) for e in refused] == [(node_id, fp)]
    assert refused[0]["reason"] == "the key is not in the consortium registry"
    assert d.co.control is not None
    assert reconcile(d.co.layout, d.co.control) == d.co.node_ids  # what a start runs; sites kept
    removed = [e for e in read_log(d.co.layout.audit) if e["event"] == "node_unregistered"
               and e["node_id"] == node_id]
    assert removed and removed[-1]["reason"] == "registered outside the consortium registry"
    assert node_id not in {n.node_id for n in d.co.control.nodes() if n.status != "unregistered"}
    d.restart_coordinator()
    known = {fingerprint_of_bytes(n.public_key) for n in d.co.control.nodes()  # type: ignore[union-attr]
             if n.status != "unregistered"}
    assert fp not in known and known == {fingerprint((d.pki / "coordinator" / "authorized" / f"{s}.pub").read_bytes())
                                         for s in SITES}
    d.procs.stop("outsider")
    wait_nodes_online(d.co.control, d.ids(STARTED), timeout=90)  # type: ignore[arg-type]


def test_a_registry_changed_without_the_ca_key_is_refused(consortium: Consortium) -> None:
    """The symptom's last step: an intruder's key is registered and a plain Flower SuperNode
    joins with it; then its key is written into ``registry.json`` as an active site (which every
    run re-reads). Control arm: the same entry signed with the consortium CA key (what
    ``fedmeta provision --add-site`` writes) makes the node a site the next run greets. Written
    without the CA key, the next run refuses the registry, naming the file, and greets no one;
    ``fedmeta coordinator start`` refuses it before starting anything."""
    from cryptography.hazmat.primitives import serialization

    from fedmeta.deploy.provision import Registry, SiteRecord

    d = consortium
    assert d.co.control is not None
    intruder = make_site_keys(d.root / "intruder", comment="intruder", passphrase=None)
    fp = fingerprint(intruder.public.read_bytes())
    node_id = d.co.control.register(intruder.public.read_bytes(), "intruder")
    key = serialization.load_pem_private_key(intruder.private.read_bytes(), None)
    openssh = intruder.private.with_suffix(".openssh")
    openssh.write_bytes(key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    d.procs.start("intruder", [bin_path("flower-supernode"), "--grpc-rere", "--superlink", d.co.fleet_address,
                               "--root-certificates", str(d.pki / "ca" / "ca.crt"),
                               "--auth-supernode-private-key", str(openssh), "--port", str(free_port())],
                  env=d.site_env)
    path = d.pki / "registry.json"
    original = path.read_bytes()
    entry = SiteRecord(name="intruder", fingerprint=fp, public_key=intruder.public.read_text().strip(),
                       issued_at="2026-01-01T00:00:00+00:00")
    try:
        wait_nodes_online(d.co.control, [node_id], timeout=60)
        doc = json.loads(original)
        doc["sites"]["intruder"] = entry.__dict__
        path.write_text(json.dumps(doc, indent=2))  # the signature is the one the CA made before
        run_id, status, folder = _run(d, "tampered-registry", ["rounds=1"])
        assert status == "finished:failed"
        assert (f"error: the run failed: {path}: the registry's signature does not verify against "
                f"{d.pki / 'coordinator' / 'ca.crt'}") in (folder / "run.log").read_text()
        assert not [e for e in _audit(d, run_id) if e["event"] in ("run_started", "contribution", "site_excluded")]
        with Processes(d.root / "tampered-start") as procs:
            with pytest.raises(ProvisionError, match=f"^{re.escape(str(path))}: the registry's signature"):
                start_coordinator(procs, deployment=d.pki, state=d.root / "tampered-state", passphrase=PASS,
                                  fleet_address=f"{LOOPBACK}:{free_port()}")
            assert procs.procs == {}  # nothing was started
        # control arm: the same entry, signed with the CA key, makes the intruder a site
        path.write_bytes(original)
        registry = Registry.load(d.pki)
        registry.sites["intruder"] = entry
        registry.save(d.pki, d.ca_pass)
        run_id, status, folder = _run(d, "signed-registry", ["rounds=1"])
        events = _audit(d, run_id)
        assert not [e for e in events if e["event"] == "node_refused" and e["node_id"] == node_id]
        assert [e for e in events if e.get("site") == "intruder"], events  # greeted as a site
    finally:
        path.write_bytes(original)
        d.procs.stop("intruder")
        reconcile(d.co.layout, d.co.control)  # unregisters the intruder's key


# -- faults -------------------------------------------------------------------------------------------


def test_a_site_killed_mid_round_is_noticed_the_run_goes_on_and_it_rejoins(consortium: Consortium) -> None:
    """site-3 (back on its fed-heart data) sends a NaN in every update; site-1's SuperNode is killed
    during round 1 and restarted by its `fedmeta site start`; after round 1 the coordinator itself
    crashes, restarts on its state, and the run resumes from its checkpoint."""
    d = consortium
    configure_bundle(d.bundle("site-3"), data={"source": "fed-heart", "partition": 3}, runtime_port=free_port())
    start_local_site(d.procs, d.bundle("site-3"), env=d.env("site-3", PYTHONPATH=str(MALFORMED_SITE)))
    wait_nodes_online(d.co.control, d.ids(SITES), timeout=90)  # type: ignore[arg-type]
    cfg = load_config(None, [*FAST, "rounds=3"])
    assert d.co.control is not None
    run_id = submit_run(d.co.control, d.co.layout.flwr_home,
                        run_config={"experiment": cfg.to_json(), "run-name": "faults"})
    _wait_for(lambda: any(e["event"] == "round_started" for e in _audit(d, run_id)), 120, "round 1")
    site = d.procs.procs["site-site-1"]
    node = [p for p in descendants(site.pid)
            if b"fedmeta.deploy.supernode" in Path(f"/proc/{p}/cmdline").read_bytes()]
    t_kill = time.monotonic()
    os.kill(node[0], signal.SIGKILL)
    folder = d.co.layout.runs / "faults"
    _wait_for(lambda: (folder / "rounds.jsonl").exists() and len(_rounds(folder)) >= 1, 120, "round 1 done")
    noticed_after = time.monotonic() - t_kill
    d.procs.kill("superlink")  # the coordinator crashes after round 1
    r1 = _rounds(folder)[0]
    assert r1["missing"] == ["site-1"] and r1["applied"]
    assert noticed_after < 40, noticed_after  # seconds, not federation.timeout_s
    assert "NaN/Inf" in r1["rejected"]["site-3"]  # recorded under the site's registered name
    first = _audit(d, run_id)
    missing = [e for e in first if e["event"] == "contribution" and e["site"] == "site-1"]
    assert missing[0]["accepted"] is False and "no reply" in missing[0]["reason"]
    d.co = start_coordinator(d.procs, deployment=d.pki, state=d.root / "coordinator", passphrase=PASS,
                             fleet_address=f"{LOOPBACK}:{d.fleet}")
    wait_nodes_online(d.co.control, d.ids(SITES), timeout=150)  # type: ignore[arg-type]
    restarts = [e for e in _site_audit(d, "site-1") if e["event"] == "node_restarted"]
    assert restarts, "site-1's node was not restarted by fedmeta site start"
    resumed, status, _ = _run(d, "faults", ["rounds=3"], resume=True)
    assert status == "finished:completed", status
    rounds = _rounds(folder)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "site-1" in rounds[1]["accepted"] or "site-1" in rounds[2]["accepted"]  # back
    assert all("NaN/Inf" in r["rejected"]["site-3"] for r in rounds)
    assert [e["round"] for e in _audit(d, resumed) if e["event"] == "checkpoint_resumed"] == [1]
    d.procs.stop("site-site-3")


def test_a_revoked_site_never_takes_part_after_a_restart(consortium: Consortium) -> None:
    d = consortium
    revoked_fp = fingerprint((d.pki / "coordinator" / "authorized" / "site-2.pub").read_bytes())
    revoke_site(d.pki, "site-2", reason="left the consortium", ca_passphrase=d.ca_pass)
    revoked_node = d.co.node_ids["site-2"]
    assert d.co.control is not None
    assert "site-2" not in reconcile(d.co.layout, d.co.control)  # what every start runs
    removed = [e for e in read_log(d.co.layout.audit) if e["event"] == "node_unregistered"
               and e["site"] == "site-2"]
    assert removed and removed[-1]["reason"] == "the key of site site-2 is revoked"
    assert revoked_node not in {n.node_id for n in d.co.control.nodes() if n.status != "unregistered"}
    d.restart_coordinator()
    assert "site-2" not in d.co.node_ids
    assert revoked_fp not in {fingerprint_of_bytes(n.public_key) for n in d.co.control.nodes()  # type: ignore[union-attr]
                              if n.status != "unregistered"}
    wait_nodes_online(d.co.control, d.ids(["site-0", "site-1"]), timeout=90)  # type: ignore[arg-type]
    _, status, folder = _run(d, "after-revoke", ["rounds=1"])
    assert status == "finished:completed"
    assert all(set(r["sampled"]) == {"site-0", "site-1"} for r in _rounds(folder))
    assert revoked_node not in online_nodes(d.co.control)  # type: ignore[arg-type]


def test_a_persisted_superlink_keeps_its_registrations_across_a_restart(consortium: Consortium) -> None:
    """`coordinator start --persist-state`: the SuperLink's state is an owner-only SQLite database,
    and a restarted SuperLink finds its registrations there (same node ids, nothing re-registered);
    the default (in memory) starts empty and registers every active site again."""
    d = consortium
    state, fleet = d.root / "persisted", free_port()
    with Processes(d.root / "persisted-run") as procs:
        def start() -> CoordinatorHandle:
            return start_coordinator(procs, deployment=d.pki, state=state, passphrase=PASS,
                                     fleet_address=f"{LOOPBACK}:{fleet}", persist_state=True)

        co = start()
        try:
            first = dict(co.node_ids)
            assert first and "--database" in co.process.popen.args and co.layout.database.is_file()
            registered = [e for e in read_log(co.layout.audit) if e["event"] == "node_registered"]
            assert sorted(e["site"] for e in registered) == sorted(first)
            assert co.control is not None
            co.control.close()
            procs.kill("superlink")
            co = start()
            assert co.node_ids == first  # found in the database, not registered anew
            again = [e for e in read_log(co.layout.audit) if e["event"] == "node_registered"]
            assert len(again) == len(registered)
            files = sorted(state.glob("superlink.db*"))
            assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files
        finally:
            if co.control is not None:
                co.control.close()
    # the module's own coordinator (in memory) registered every active site afresh at each restart
    assert d.co.node_ids and not d.co.layout.database.exists()


# -- a hostile coordinator (runs last: the coordinator is replaced by Flower's own SuperLink) --------

LIVE = ["site-0", "site-1"]  # site-2 was revoked above


def _hostile_coordinator(d: Consortium) -> Control:
    """Replace the coordinator by one whose operator is hostile: Flower's own SuperLink on the
    consortium's Fleet port and certificate, which runs whatever ServerApp a bundle names (with
    ``hostile_server`` and a shadow ``fedmeta.server.app`` on its PYTHONPATH), the live sites'
    keys registered. Started once; later tests reuse it."""
    if getattr(d, "hostile", None) is not None:
        return d.hostile  # type: ignore[no-any-return]
    if d.co.control is not None:
        d.co.control.close()
    d.procs.stop("serverexec")
    d.procs.stop("superlink")
    env = {**d.co.env, "PYTHONPATH": os.pathsep.join([str(HOSTILE / "shadow"), str(HOSTILE)])}
    port = free_port()
    _, key = _stock_superlink(d, "hostile-superlink", fleet=d.fleet, control=port, env=env)
    control = _tcp_control(d, port)
    ids = [control.register((d.pki / "coordinator" / "authorized" / f"{s}.pub").read_bytes(), s) for s in LIVE]
    wait_nodes_online(control, ids, timeout=120)
    d.hostile = control  # type: ignore[attr-defined]
    d.hostile_key = key  # type: ignore[attr-defined]
    return control


def test_foreign_app_bundles_are_refused_at_every_site(consortium: Consortium, tmp_path: Path) -> None:
    """A hostile coordinator (Flower's own SuperLink, which runs any ServerApp: fedmeta's
    coordinator would refuse these bundles itself) runs an app of its own, and one that claims to
    be fedmeta but carries code. Neither runs at any site; each site logs the refusal."""
    d = consortium
    control = _hostile_coordinator(d)
    marker = tmp_path / "pwned"
    code = (
        "from pathlib import Path\n"
        "from flwr.app import Message, RecordDict\n"
        "from flwr.clientapp import ClientApp\n"
        "from flwr.serverapp import ServerApp\n"
        "clientapp = ClientApp()\n"
        "@clientapp.query()\n"
        "def steal(msg, context):\n"
        f"    Path({str(marker)!r}).write_text(repr(dict(context.node_config)))\n"
        "    return Message(RecordDict(), reply_to=msg)\n"
        "serverapp = ServerApp()\n"
        "@serverapp.main()\n"
        "def main(grid, context):\n"
        "    ids = list(grid.get_node_ids())\n"
        "    grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type='query') for n in ids], timeout=30)\n"
    )
    apps = {
        "evil": ("evil", "evil", "0.0.1"),
        "impostor": (PUBLISHER, "fedmeta", installed_version()),  # fedmeta's identity, plus code
    }
    for label, (publisher, name, version) in apps.items():
        app = tmp_path / label
        app.mkdir()
        (app / "evil_app.py").write_text(code)
        (app / "pyproject.toml").write_text(
            f'[project]\nname = "{name}"\nversion = "{version}"\n\n[tool.flwr.app]\npublisher = "{publisher}"\n\n'
            '[tool.flwr.app.components]\nserverapp = "evil_app:serverapp"\nclientapp = "evil_app:clientapp"\n')
        run_id = control.start_run(app, {})

        def refused_everywhere(run_id: int = run_id) -> bool:
            return all(any(e["event"] == "app_refused" and e["run_id"] == run_id for e in _site_audit(d, s))
                       for s in LIVE)

        _wait_for(refused_everywhere, 90, f"{label}: app_refused at every site")
        control.stop_run(run_id)
        reasons = {e["reason"] for s in LIVE for e in _site_audit(d, s)
                   if e["event"] == "app_refused" and e["run_id"] == run_id}
        assert reasons == ({"app 'evil/evil' is not 'fedmeta/fedmeta'"} if label == "evil"
                           else {"the bundle carries files (evil_app.py); fedmeta runs only its installed code"})
    assert not marker.exists()  # no foreign code ran at any site


def _hostile_bundle(folder: Path, serverapp: str) -> Path:
    """A bundle a site's app check sees as fedmeta's: its identity and version, no code, fedmeta's
    ClientApp, and ``serverapp``; the run config carries the attack's settings."""
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "fedmeta"\nversion = "{installed_version()}"\n\n'
        f'[tool.flwr.app]\npublisher = "{PUBLISHER}"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "{serverapp}"\nclientapp = "fedmeta.client.app:app"\n\n'
        '[tool.flwr.app.config]\nout = ""\ncompliant = ""\nextract = ""\nshapes = ""\nnodes = 0\n')
    return folder


def test_a_decoy_record_extracts_nothing_even_from_fedmeta_s_own_serverapp_name(
        consortium: Consortium, tmp_path: Path) -> None:
    """The decoy attack with a real SuperLink run by a hostile operator: a TRAIN message with a
    compliant experiment in a record that sorts first and a one-patient linear FedAvg in
    ``config``. Before requests were parsed once, every site served it and each reply's
    last-layer delta was a patient's row.

    1. The hostile ServerApp under its own name: every site refuses the bundle (its ServerApp is
       not fedmeta's).
    2. The same attack from a coordinator host whose ``fedmeta.server.app`` was replaced (the
       bundle names fedmeta's own pair): the bundle passes, and every site refuses the request
       itself as ambiguous; nothing is computed, nothing but a code comes back."""
    from fedmeta.common.data.registry import data_spec
    from fedmeta.common.experiment import initial_parameters

    d = consortium
    control = _hostile_coordinator(d)
    live = LIVE
    compliant = load_config(None, [*FAST, "algorithm=reptile", "rounds=5"])
    extract = load_config(None, ["algorithm=fedavg", "rounds=100000", "model.name=linear",
                                 "fedavg.batch_size=1", "fedavg.local_steps=1", "fedavg.lr=1.0"])
    shapes = {k: list(v.shape) for k, v in initial_parameters(extract, data_spec(extract.data)).items()}
    for arm, serverapp, event, reason in [
        ("own-name", "hostile_server:app", "app_refused",
         "components not fedmeta's: serverapp='hostile_server:app'"),
        ("fedmeta-name", "fedmeta.server.app:app", "request_failed", "bad request"),
    ]:
        out = tmp_path / f"{arm}.json"
        run_id = control.start_run(_hostile_bundle(tmp_path / arm, serverapp), {
            "out": str(out), "compliant": compliant.to_json(), "extract": extract.to_json(),
            "shapes": json.dumps(shapes), "nodes": len(live)})
        _wait_for(out.exists, 150, f"{arm}: the hostile ServerApp's record of the replies")
        got = json.loads(out.read_text())
        assert got["sent"] == len(live), got
        replies = got["replies"]
        assert len(replies) == len(live) and all("arrays" not in r for r in replies), replies
        want = 4300 if event == "app_refused" else 4500
        assert {(r["error"], r["reason"]) for r in replies} == {(want, "app refused" if want == 4300 else reason)}
        for site in live:
            entries = [e for e in _site_audit(d, site) if e.get("run_id") == run_id]
            assert [e["event"] for e in entries] == [event], entries
            key = "reason" if event == "app_refused" else "category"
            assert entries[0][key] == reason
            assert not any(e["event"] == "request_served" for e in entries)
        control.stop_run(run_id)
