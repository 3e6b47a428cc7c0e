"""A consortium across separate hosts: the coordinator and two hospitals, each in its own Linux
network namespace with its own address on a private bridge, and each in its own mount namespace
that sees only its own files: a hospital sees its data, bundle and state, and neither the other
hospital's nor the coordinator's; the coordinator sees none of the hospitals'.

The hosts and the consortium are :mod:`fedmeta.bench.netns`'s, which ``fedmeta bench hosts``
runs at ten hospitals. Nothing outside the namespaces (and their loopback) is addressed, and
everything is deleted afterwards. Needs root (to create namespaces), as on the machines this
project is tested on; elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from fedmeta.bench.netns import Hosts, separate_hosts, unavailable
from fedmeta.deploy.processes import Processes

pytestmark = pytest.mark.deployment

HOSTS = ("co", "a", "b")
SKIP = unavailable()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if SKIP:
        pytest.skip(SKIP)
    with separate_hosts(HOSTS) as h:
        yield h
        assert h.pids() == []  # nothing left running on any host


def test_a_two_round_tls_federation_across_separate_hosts(hosts: Hosts) -> None:
    from fedmeta.bench.netns import deploy_consortium

    h = hosts
    c = deploy_consortium(h, coordinator="co", sites=("a", "b"))
    experiment = c.write_experiment({"algorithm": "reptile", "rounds": 2, "tasks": {"meta_batch": 4},
                                     "eval": {"adapt_steps": 20}, "federation": {"timeout_s": 120}})
    procs = Processes(h.root / "procs")
    try:
        co = c.start_coordinator(procs)
        for host in ("a", "b"):
            c.start_site(procs, host)
        run = subprocess.run(c.run_argv(experiment, name="hosts", timeout=420), env=c.env,
                             capture_output=True, text=True, timeout=480, check=False)
        if run.returncode != 0:
            logs = {m: procs.procs[m].log_path.read_text()[-3000:] for m in ("site-a", "site-b")}
            pytest.fail(f"fedmeta run failed:\n{run.stdout[-4000:]}\n{run.stderr[-1000:]}\n{logs}")
        summary = json.loads((c.run_folder("hosts") / "summary.json").read_text())
        assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
        rounds = c.rounds("hosts")
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
        # the CA key's passphrase is on no host; the coordinator's key passphrase on its own only
        assert not h.can_read("a", h.own("co") / "key.pass") and h.can_read("co", h.own("co") / "key.pass")
        assert f"{h.address('co')}:9092" in co.log_path.read_text()  # the Fleet API's own address
    finally:
        procs.refresh_children()
        procs.stop_all()
    assert procs.leftovers() == []
