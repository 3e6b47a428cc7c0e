"""Separate hosts on one Linux machine, and a TLS consortium deployed across them.

Each host is a Linux network namespace with its own address on a private bridge, and each
process started on it also gets a mount namespace of its own in which the host sees only its own
files: ``root/private/<host>`` holds them and appears as ``root/own-<host>``, while
``root/private`` itself is covered by an empty in-memory folder. So a hospital sees its data,
bundle and state, and neither another hospital's nor the coordinator's.

Nothing outside these namespaces (and their loopback) is addressed or bound: the bridge lives in
a namespace of its own. Everything created is deleted afterwards (:func:`separate_hosts`): every
process still inside the namespaces (they can only be ours), the namespaces, the bridge with
them, and the files; on SIGTERM too (it is turned into ``SystemExit`` while the hosts exist),
and at interpreter exit. A run that was SIGKILLed leaves namespaces named after its process id;
the next :func:`separate_hosts` finds them (their process gone) and deletes them and what runs
in them. Needs root (:func:`unavailable` says why not).

Used by ``tests/deploy/test_hosts.py`` and ``fedmeta bench hosts``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmeta.deploy.processes import Managed, Processes, pid_alive

log = logging.getLogger(__name__)

#: The hosts' /24 network (inside the bridge's namespace only).
NET = "10.231.0"
#: Namespace names: ``fmh<pid>-<host>`` (the bridge's host is ``br``).
PREFIX = "fmh"
_OURS = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")
BRIDGE = "br"


def unavailable() -> str | None:
    """Why hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = f"{PREFIX}{os.getpid()}-probe"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None if res.returncode == 0 else f"cannot create a network namespace: {res.stderr.strip()}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _namespaces() -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _pids_in(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _delete(namespaces: Sequence[str]) -> None:
    """Stop every process inside ``namespaces`` (SIGTERM, then SIGKILL), then delete them."""
    pids = {p for ns in namespaces for p in _pids_in(ns)}
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = {p for ns in namespaces for p in _pids_in(ns)}
            if pids:
                time.sleep(0.1)
        if not pids:
            break
    if pids:
        log.error("processes %s still run in %s", sorted(pids), list(namespaces))
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def sweep_stale() -> list[str]:
    """Delete the namespaces a killed run of this module left (their process is gone)."""
    stale = [ns for ns in _namespaces() if (m := _OURS.match(ns)) and not pid_alive(int(m.group(1)))]
    if stale:
        log.warning("deleting namespaces left by a run that was killed: %s", stale)
        _delete(stale)
    return stale


@dataclass
class Hosts:
    """Hosts made by :func:`separate_hosts`: ``names`` in order, their namespaces ``ns``."""

    root: Path
    names: tuple[str, ...]
    ns: dict[str, str]
    net: str = NET

    def own(self, host: str) -> Path:
        """Where ``host`` sees its own files (inside its mount namespace)."""
        return self.root / f"own-{host}"

    def private(self, host: str) -> Path:
        """Where ``host``'s files are, seen from outside the hosts."""
        return self.root / "private" / host

    def as_host(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host``: in its network namespace and a mount namespace of its own."""
        script = (f"mount --bind {self.private(host)} {self.own(host)} && "
                  f"mount -t tmpfs tmpfs {self.root / 'private'} && exec \"$@\"")
        return ["ip", "netns", "exec", self.ns[host], "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *argv]

    def address(self, host: str) -> str:
        return f"{self.net}.{self.names.index(host) + 1}"

    def can_read(self, host: str, path: Path) -> bool:
        res = subprocess.run(self.as_host(host, ["cat", str(path)]), capture_output=True, check=False)
        return res.returncode == 0

    def pids(self) -> list[int]:
        """Every process running on any of the hosts (should be none once they are stopped)."""
        return sorted({p for ns in self.ns.values() for p in _pids_in(ns)})


class _Terminated(SystemExit):
    pass


@contextmanager
def separate_hosts(names: Sequence[str], *, net: str = NET) -> Iterator[Hosts]:
    """Make ``names`` hosts on a private bridge (``net.1``, ``net.2`` … in order); on leaving,
    delete everything made (see the module docstring)."""
    if not names or len(set(names)) != len(names) or len(names) > 250 or BRIDGE in names:
        raise ValueError(f"hosts need distinct names other than {BRIDGE!r} (1 to 250): {list(names)}")
    for host in names:
        if not re.fullmatch(r"[a-z0-9]{1,8}", host):
            raise ValueError(f"host name {host!r}: use 1 to 8 of [a-z0-9]")
    sweep_stale()
    tag = f"{PREFIX}{os.getpid()}-"
    ns = {h: f"{tag}{h}" for h in (*names, BRIDGE)}
    taken = set(_namespaces()) & set(ns.values())
    if taken:  # one process, one set of hosts at a time
        raise RuntimeError(f"namespaces {sorted(taken)} already exist (hosts already made by this process)")
    root = Path(tempfile.mkdtemp(prefix="fedmeta-hosts-"))
    done = [False]

    def cleanup() -> None:
        if done[0]:
            return
        done[0] = True
        _delete(list(ns.values()))
        shutil.rmtree(root, ignore_errors=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise _Terminated(128 + signum)

    atexit.register(cleanup)
    previous = None
    import threading

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for host in names:
            (root / "private" / host).mkdir(parents=True)
            (root / f"own-{host}").mkdir()
        for name in ns.values():
            _ip("netns", "add", name)
        br = ns[BRIDGE]
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, host in enumerate(names):
            # created directly in the two namespaces: no interface ever exists outside them
            _ip("link", "add", "eth0", "netns", ns[host], "type", "veth", "peer", "name", f"v{host}", "netns", br)
            _ip("-n", br, "link", "set", f"v{host}", "master", "br0", "up")
            _ip("-n", ns[host], "addr", "add", f"{net}.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns[host], "link", "set", "eth0", "up")
            _ip("-n", ns[host], "link", "set", "lo", "up")
        yield Hosts(root, tuple(names), ns, net)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        cleanup()
        atexit.unregister(cleanup)


# -- a consortium across the hosts -------------------------------------------------------------

PYTHON = (sys.executable, "-m", "fedmeta.cli.main")


@dataclass
class Consortium:
    """A provisioned TLS consortium on :class:`Hosts`: the coordinator's host and one hospital per
    site host (``sites``: host -> site name), each holding only its own files."""

    hosts: Hosts
    coordinator: str
    sites: dict[str, str]
    outcomes: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        return self.hosts.own(self.coordinator) / "pki"

    @property
    def state(self) -> Path:
        return self.hosts.own(self.coordinator) / "state"

    def run_folder(self, name: str) -> Path:
        """A run's folder on the coordinator's host, seen from outside the hosts."""
        return self.hosts.private(self.coordinator) / "state" / "runs" / name

    def write_experiment(self, settings: Mapping[str, Any], name: str = "experiment.yaml") -> Path:
        """An experiment on the coordinator's host over the sites' shared schema (its path there)."""
        co = self.coordinator
        doc = {**settings, "data": {"source": "ehr", "feature_schema": str(self.hosts.own(co) / "schema.yaml"),
                                    "outcomes": list(self.outcomes), **dict(settings.get("data", {}))}}
        (self.hosts.private(co) / name).write_text(yaml.safe_dump(doc))
        return self.hosts.own(co) / name

    def start_coordinator(self, procs: Processes, *, timeout: float = 120.0) -> Managed:
        """``fedmeta coordinator start`` on the coordinator's host, once it says it is up."""
        h, co = self.hosts, self.coordinator
        proc = procs.start("coordinator", h.as_host(co, [*PYTHON, "coordinator", "start", "--deployment",
                                                         str(self.pki), "--state", str(self.state),
                                                         "--passphrase-file", str(h.own(co) / "key.pass")]),
                           env=self.env)
        deadline = time.monotonic() + timeout
        while "coordinator up" not in proc.log_path.read_text(errors="replace"):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not come up:\n"
                                   + proc.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        return proc

    def start_site(self, procs: Processes, host: str) -> Managed:
        """``fedmeta site start`` on a hospital's host (process name ``site-<host>``)."""
        node = self.hosts.own(host) / "bundle" / "node.yaml"
        return procs.start(f"site-{host}", self.hosts.as_host(host, [*PYTHON, "site", "start", "--node", str(node)]),
                           env=self.env)

    def run_argv(self, config: Path, *, name: str, timeout: float) -> list[str]:
        """``fedmeta run`` on the coordinator's host."""
        return self.hosts.as_host(self.coordinator, [
            *PYTHON, "run", "--deployment", str(self.pki), "--state", str(self.state), "--config", str(config),
            "--name", name, "--timeout", f"{timeout:.0f}"])

    def rounds(self, name: str) -> list[dict[str, Any]]:
        """The run's ``rounds.jsonl`` so far."""
        path = self.run_folder(name) / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def deploy_consortium(hosts: Hosts, *, coordinator: str, sites: Sequence[str], seed: int = 3,
                      mean_stays: int = 260, runtime_port: int = 9094) -> Consortium:
    """Provision a consortium whose coordinator is on ``coordinator`` and a hospital on each host
    of ``sites`` (named ``hospital-<host>``, synthetic EHR data), and give each host only its own
    files: a hospital its bundle, its key's passphrase, its data and its state; the coordinator the
    registry, its certificate and key, its key's passphrase and the shared feature schema, and no
    hospital's data. Each key has a passphrase of its own; the CA's stays off every host."""
    from fedmeta.common.data.site_config import find_site_configs
    from fedmeta.common.data.synth_ehr import write_synth_ehr
    from fedmeta.deploy.consortium import load_consortium
    from fedmeta.deploy.local import configure_bundle
    from fedmeta.deploy.provision import PASSPHRASES, provision
    from fedmeta.deploy.secrets import (
        CA_KEY,
        COORDINATOR_KEY,
        Passphrase,
        fresh_passphrase,
        write_passphrase_file,
    )

    h, co = hosts, coordinator
    work = h.root / "operator"
    names = {host: f"hospital-{host}" for host in sites}
    consortium = work / "consortium.yaml"
    consortium.parent.mkdir(parents=True)
    consortium.write_text(yaml.safe_dump({
        "consortium": "hosts", "coordinator": {"host": h.address(co), "sans": [h.address(co)]},
        "sites": [{"name": n} for n in names.values()]}))
    ca_secret = fresh_passphrase()
    write_passphrase_file(work / "ca.pass", ca_secret)
    write_passphrase_file(h.private(co) / "key.pass", fresh_passphrase([ca_secret]))
    pki = work / "pki"
    provision(load_consortium(consortium), pki, ca_passphrase=Passphrase(file=work / "ca.pass", role=CA_KEY),
              passphrase=Passphrase(file=h.private(co) / "key.pass", role=COORDINATOR_KEY), site_keys=True)
    generated = work / "generated"
    write_synth_ehr(generated, sites=len(sites), seed=seed, mean_stays=mean_stays)
    configs = find_site_configs(generated)
    schema = configs[0].schema
    for host, config in zip(sites, configs, strict=True):
        own, private = h.own(host), h.private(host)
        shutil.copytree(pki / "sites" / names[host], private / "bundle")
        shutil.copyfile(pki / PASSPHRASES / f"{names[host]}.pass", private / "key.pass")
        os.chmod(private / "key.pass", 0o600)
        shutil.copytree(config.source.parent, private / "data" / config.source.parent.name)
        shutil.copyfile(schema, private / "data" / schema.name)
        configure_bundle(private / "bundle", data=str(own / "data" / config.source.parent.name / "site.yaml"),
                         runtime_port=runtime_port)
        node = yaml.safe_load((private / "bundle" / "node.yaml").read_text())
        node["state"] = str(own / "state")
        node["key_passphrase_file"] = str(own / "key.pass")
        (private / "bundle" / "node.yaml").write_text(yaml.safe_dump(node))
    shutil.copytree(pki / "coordinator", h.private(co) / "pki" / "coordinator")
    shutil.copyfile(pki / "registry.json", h.private(co) / "pki" / "registry.json")
    shutil.copyfile(schema, h.private(co) / "schema.yaml")
    shutil.rmtree(work)  # the operator's machine: the CA key and every copy go
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("FEDMETA_KEY_PASSPHRASE", "FEDMETA_CA_PASSPHRASE"):
        env.pop(name, None)
    return Consortium(hosts=h, coordinator=co, sites=names, outcomes=list(configs[0].outcomes), env=env)


__all__ = ["NET", "Consortium", "Hosts", "deploy_consortium", "separate_hosts", "sweep_stale", "unavailable"]
