"""A consortium across separate hosts: the coordinator and two hospitals, each in its own Linux
network namespace with its own address on a private bridge this test creates, and each in its own
mount namespace that sees only its own files: a hospital sees its data, bundle and state, and
neither the other hospital's nor the coordinator's; the coordinator sees none of the hospitals'.

Nothing outside these namespaces (and their loopback) is addressed: the bridge lives in a
namespace of its own, and everything is deleted afterwards. Needs root (to create namespaces), as
on the machines this project is tested on; elsewhere the test is skipped and says why.
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
HOSTS = ("co", "a", "b")
SECRET = "the coordinator key's own passphrase"
CA_SECRET = "the CA key's passphrase, another one"


def _can_make_hosts() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces and switch users"
    for tool in ("ip", "unshare", "mount"):
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
    """``root/private/<host>`` holds each host's files; inside a host's namespaces they appear at
    ``root/own-<host>`` and ``root/private`` is an empty in-memory folder."""

    root: Path
    ns: dict[str, str]

    def own(self, host: str) -> Path:
        return self.root / f"own-{host}"

    def private(self, host: str) -> Path:
        return self.root / "private" / host

    def as_host(self, host: str, argv: list[str]) -> list[str]:
        script = (f"mount --bind {self.private(host)} {self.own(host)} && "
                  f"mount -t tmpfs tmpfs {self.root / 'private'} && exec \"$@\"")
        return ["ip", "netns", "exec", self.ns[host], "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *argv]

    def address(self, host: str) -> str:
        return f"{NET}.{HOSTS.index(host) + 1}"

    def can_read(self, host: str, path: Path) -> bool:
        res = subprocess.run(self.as_host(host, ["cat", str(path)]), capture_output=True, check=False)
        return res.returncode == 0


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if SKIP:
        pytest.skip(SKIP)
    tag = f"fm{os.getpid() % 100000}"
    ns = {h: f"{tag}{h}" for h in (*HOSTS, "br")}
    root = Path(tempfile.mkdtemp(prefix="fedmeta-hosts-"))
    for host in HOSTS:
        (root / "private" / host).mkdir(parents=True)
        (root / f"own-{host}").mkdir()
    try:
        for name in ns.values():
            _ip("netns", "add", name)
        _ip("-n", ns["br"], "link", "add", "br0", "type", "bridge")
        _ip("-n", ns["br"], "link", "set", "br0", "up")
        for i, host in enumerate(HOSTS):
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


def test_a_two_round_tls_federation_across_separate_hosts(hosts: Hosts) -> None:
    from fedmeta.common.data.site_config import find_site_configs
    from fedmeta.common.data.synth_ehr import write_synth_ehr
    from fedmeta.deploy.consortium import load_consortium
    from fedmeta.deploy.local import configure_bundle
    from fedmeta.deploy.provision import provision
    from fedmeta.deploy.secrets import CA_KEY, Passphrase

    h = hosts
    os.environ["FEDMETA_KEY_PASSPHRASE"] = SECRET
    os.environ["FEDMETA_CA_PASSPHRASE"] = CA_SECRET
    try:
        consortium = h.root / "consortium.yaml"
        consortium.write_text(yaml.safe_dump({
            "consortium": "hosts", "coordinator": {"host": h.address("co"), "sans": [h.address("co")]},
            "sites": [{"name": "hospital-a"}, {"name": "hospital-b"}]}))
        pki = h.root / "pki"
        provision(load_consortium(consortium), pki, ca_passphrase=Passphrase(env="FEDMETA_CA_PASSPHRASE", role=CA_KEY),
                  passphrase=Passphrase(env="FEDMETA_KEY_PASSPHRASE"), site_keys=True)
    finally:
        os.environ.pop("FEDMETA_KEY_PASSPHRASE", None)
        os.environ.pop("FEDMETA_CA_PASSPHRASE", None)
    generated = h.root / "generated"
    write_synth_ehr(generated, sites=2, seed=3, mean_stays=260)
    configs = find_site_configs(generated)
    schema = configs[0].schema
    for host, config in zip(("a", "b"), configs, strict=True):
        # Each hospital's host holds its bundle, its key's own passphrase, its data and its state.
        shutil.copytree(pki / "sites" / f"hospital-{host}", h.private(host) / "bundle")
        shutil.copyfile(pki / "passphrases" / f"hospital-{host}.pass", h.private(host) / "key.pass")
        os.chmod(h.private(host) / "key.pass", 0o600)
        shutil.copytree(config.source.parent, h.private(host) / "data" / config.source.parent.name)
        shutil.copyfile(schema, h.private(host) / "data" / schema.name)
        configure_bundle(h.private(host) / "bundle",
                         data=str(h.own(host) / "data" / config.source.parent.name / "site.yaml"),
                         runtime_port=9094)
        node = yaml.safe_load((h.private(host) / "bundle" / "node.yaml").read_text())
        node["state"] = str(h.own(host) / "state")
        node["key_passphrase_file"] = str(h.own(host) / "key.pass")
        (h.private(host) / "bundle" / "node.yaml").write_text(yaml.safe_dump(node))
    # The coordinator's host holds the registry, its own certificate and key, and the shared
    # feature schema: no hospital's data.
    shutil.copytree(pki / "coordinator", h.private("co") / "pki" / "coordinator")
    shutil.copyfile(pki / "registry.json", h.private("co") / "pki" / "registry.json")
    shutil.copyfile(schema, h.private("co") / "schema.yaml")
    shutil.rmtree(pki)
    shutil.rmtree(generated)
    (h.private("co") / "experiment.yaml").write_text(yaml.safe_dump({
        "algorithm": "reptile", "rounds": 2, "data": {"source": "ehr", "feature_schema": str(h.own("co") / "schema.yaml"),
                              "outcomes": list(configs[0].outcomes)},
        "tasks": {"meta_batch": 4}, "eval": {"adapt_steps": 20}, "federation": {"timeout_s": 120}}))
    python = [sys.executable, "-m", "fedmeta.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    co_env = {**env, "FEDMETA_KEY_PASSPHRASE": SECRET}  # the coordinator's key only
    co_pki, co_state = h.own("co") / "pki", h.own("co") / "state"
    procs = Processes(h.root / "procs")
    try:
        co = procs.start("coordinator", h.as_host("co", [*python, "coordinator", "start",
                                                         "--deployment", str(co_pki), "--state", str(co_state)]),
                         env=co_env)
        deadline = time.monotonic() + 120
        while "coordinator up" not in co.log_path.read_text():
            assert co.alive() and time.monotonic() < deadline, co.log_path.read_text()[-3000:]
            time.sleep(0.5)
        for host in ("a", "b"):
            procs.start(f"site-{host}", h.as_host(host, [*python, "site", "start", "--node",
                                                         str(h.own(host) / "bundle" / "node.yaml")]), env=env)
        run = subprocess.run(
            h.as_host("co", [*python, "run", "--deployment", str(co_pki), "--state", str(co_state),
                             "--config", str(h.own("co") / "experiment.yaml"), "--name", "hosts",
                             "--timeout", "420"]),
            env=env, capture_output=True, text=True, timeout=480, check=False)
        if run.returncode != 0:
            logs = {m: procs.procs[m].log_path.read_text()[-3000:] for m in ("site-a", "site-b")}
            pytest.fail(f"fedmeta run failed:\n{run.stdout[-4000:]}\n{run.stderr[-1000:]}\n{logs}")
        folder = h.private("co") / "state" / "runs" / "hosts"
        summary = json.loads((folder / "summary.json").read_text())
        assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
        rounds = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(sorted(r["accepted"]) == ["hospital-a", "hospital-b"] for r in rounds)
        assert "round 2/2" in run.stdout  # the operator saw the run's progress
        # Each hospital's data is visible on its own host only: not on the other hospital's, not
        # on the coordinator's (so what the coordinator got, it got from the sites' replies).
        for host, other in (("a", "b"), ("b", "a")):
            table = next((h.private(host) / "data").rglob("*.csv")).relative_to(h.private(host))
            assert h.can_read(host, h.own(host) / table)
            for viewer in (other, "co"):
                assert not h.can_read(viewer, h.own(host) / table)
                assert not h.can_read(viewer, h.private(host) / table)
        assert f"{h.address('co')}:9092" in co.log_path.read_text()  # the Fleet API's own address
    finally:
        procs.refresh_children()
        procs.stop_all()
    assert procs.leftovers() == []
