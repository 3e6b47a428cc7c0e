"""A consortium across separate hosts: the coordinator and two hospitals, each in its own Linux
network namespace with its own address on a private bridge this test creates, each running as its
own user with its own data folder that no other host's user can read.

Nothing outside these namespaces (and their loopback) is addressed: the bridge lives in a
namespace of its own, and everything is deleted afterwards. Needs root (to create namespaces and
switch users), as on the machines this project is tested on; elsewhere the test is skipped and
says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedmeta.deploy.processes import Processes

pytestmark = pytest.mark.deployment

NET = "10.231.0"
USERS = {"co": 61000, "a": 61001, "b": 61002}
SECRET = "separate hosts, one passphrase each would also do"


def _can_make_hosts() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces and switch users"
    for tool in ("ip", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = f"fmprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None if res.returncode == 0 else f"cannot create a network namespace: {res.stderr.strip()}"


SKIP = _can_make_hosts()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Hosts:
    root: Path
    ns: dict[str, str]

    def as_host(self, host: str, argv: list[str]) -> list[str]:
        uid = USERS[host]
        return ["ip", "netns", "exec", self.ns[host], "setpriv", f"--reuid={uid}", f"--regid={uid}",
                "--clear-groups", *argv]

    def address(self, host: str) -> str:
        return f"{NET}.{list(USERS).index(host) + 1}"


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if SKIP:
        pytest.skip(SKIP)
    tag = f"fm{os.getpid() % 100000}"
    ns = {h: f"{tag}{h}" for h in (*USERS, "br")}
    root = Path(tempfile.mkdtemp(prefix="fedmeta-hosts-"))
    os.chmod(root, 0o711)
    try:
        for name in ns.values():
            _ip("netns", "add", name)
        _ip("-n", ns["br"], "link", "add", "br0", "type", "bridge")
        _ip("-n", ns["br"], "link", "set", "br0", "up")
        for i, host in enumerate(USERS):
            _ip("link", "add", f"{tag}{host}", "netns", ns[host], "type", "veth",
                "peer", "name", f"br{host}", "netns", ns["br"])
            _ip("-n", ns["br"], "link", "set", f"br{host}", "master", "br0", "up")
            _ip("-n", ns[host], "addr", "add", f"{NET}.{i + 1}/24", "dev", f"{tag}{host}")
            _ip("-n", ns[host], "link", "set", f"{tag}{host}", "up")
            _ip("-n", ns[host], "link", "set", "lo", "up")
        yield Hosts(root, ns)
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _own(path: Path, host: str, mode: int = 0o700) -> None:
    uid = USERS[host]
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid)
        os.chmod(p, mode if p.is_dir() else 0o600)


def _readable_by(host: str, h: Hosts, path: Path) -> bool:
    uid = USERS[host]
    res = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", str(path)],
                         capture_output=True, check=False)
    return res.returncode == 0


def test_a_two_round_tls_federation_across_separate_hosts(hosts: Hosts) -> None:
    from fedmeta.common.data.site_config import find_site_configs
    from fedmeta.common.data.synth_ehr import write_synth_ehr
    from fedmeta.deploy.consortium import load_consortium
    from fedmeta.deploy.local import configure_bundle
    from fedmeta.deploy.provision import provision
    from fedmeta.deploy.secrets import Passphrase

    h = hosts
    os.environ["FEDMETA_KEY_PASSPHRASE"] = SECRET
    try:
        consortium = h.root / "consortium.yaml"
        consortium.write_text(yaml.safe_dump({
            "consortium": "hosts", "coordinator": {"host": h.address("co"), "sans": [h.address("co")]},
            "sites": [{"name": "hospital-a"}, {"name": "hospital-b"}]}))
        pki = h.root / "pki"
        provision(load_consortium(consortium), pki, passphrase=Passphrase(env="FEDMETA_KEY_PASSPHRASE"))
    finally:
        os.environ.pop("FEDMETA_KEY_PASSPHRASE", None)
    generated = h.root / "generated"
    write_synth_ehr(generated, sites=2, seed=3, mean_stays=260)
    configs = find_site_configs(generated)
    schema = configs[0].schema
    for host, config in zip(("a", "b"), configs, strict=True):
        site = f"hospital-{host}"
        data = h.root / f"data-{host}"
        shutil.copytree(config.source.parent, data / config.source.parent.name)
        shutil.copyfile(schema, data / schema.name)
        _own(data, host)
        bundle = pki / "sites" / site
        configure_bundle(bundle, data=str(data / config.source.parent.name / "site.yaml"),
                         runtime_port=9094)
        node = yaml.safe_load((bundle / "node.yaml").read_text())
        node["state"] = str(h.root / f"state-{host}")
        (bundle / "node.yaml").write_text(yaml.safe_dump(node))
        (h.root / f"state-{host}").mkdir()
        _own(h.root / f"state-{host}", host)
        _own(bundle, host)
    coordinator_files = h.root / "coordinator-pki"
    (coordinator_files / "coordinator").mkdir(parents=True)
    shutil.copytree(pki / "coordinator", coordinator_files / "coordinator", dirs_exist_ok=True)
    shutil.copyfile(pki / "registry.json", coordinator_files / "registry.json")
    shutil.copyfile(schema, coordinator_files / "schema.yaml")
    outcomes = list(configs[0].outcomes)
    experiment = h.root / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "rounds": 2, "data": {"source": "ehr", "feature_schema": str(coordinator_files / "schema.yaml"),
                              "outcomes": outcomes},
        "tasks": {"meta_batch": 4}, "eval": {"adapt_steps": 20}, "federation": {"timeout_s": 120}}))
    shutil.copyfile(experiment, coordinator_files / "experiment.yaml")
    state = h.root / "state-co"
    state.mkdir()
    for p in (coordinator_files, state):
        _own(p, "co")
    python = [sys.executable, "-m", "fedmeta.cli.main"]
    env = {**os.environ, "FEDMETA_KEY_PASSPHRASE": SECRET, "OMP_NUM_THREADS": "1"}
    procs = Processes(h.root / "procs")
    try:
        co = procs.start("coordinator", h.as_host("co", [*python, "coordinator", "start",
                                                         "--deployment", str(coordinator_files),
                                                         "--state", str(state)]),
                         env={**env, "HOME": str(state)})
        deadline = time.monotonic() + 120
        while "coordinator up" not in co.log_path.read_text():
            assert co.alive() and time.monotonic() < deadline, co.log_path.read_text()[-3000:]
            time.sleep(0.5)
        for host in ("a", "b"):
            procs.start(f"site-{host}", h.as_host(host, [*python, "site", "start", "--node",
                                                         str(pki / "sites" / f"hospital-{host}" / "node.yaml")]),
                        env={**env, "HOME": str(h.root / f"state-{host}")})
        run = subprocess.run(
            h.as_host("co", [*python, "run", "--deployment", str(coordinator_files), "--state", str(state),
                             "--config", str(coordinator_files / "experiment.yaml"), "--name", "hosts",
                             "--timeout", "420"]),
            env={**env, "HOME": str(state)}, capture_output=True, text=True, timeout=480, check=False)
        assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
        folder = state / "runs" / "hosts"
        summary = json.loads((folder / "summary.json").read_text())
        assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
        rounds = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(sorted(r["accepted"]) == ["hospital-a", "hospital-b"] for r in rounds)
        assert "round 2/2" in run.stdout  # the operator saw the run's progress
        # Each hospital's data is readable by its own user only: not by the other, not by the
        # coordinator (so what the coordinator got, it got from the sites' replies).
        for host, other in (("a", "b"), ("b", "a")):
            table = next((h.root / f"data-{host}").rglob("*.csv"))
            assert _readable_by(host, h, table)
            assert not _readable_by(other, h, table) and not _readable_by("co", h, table)
        # The sites reached the coordinator from their own addresses.
        log = co.log_path.read_text()
        assert f"{h.address('co')}:9092" in log
    finally:
        procs.refresh_children()
        procs.stop_all()
    assert procs.leftovers() == []
