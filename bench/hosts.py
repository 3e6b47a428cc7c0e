"""``fedmeta bench hosts``: ten hospitals deployed on separate hosts, one of them dying and coming back.

The coordinator and each hospital run on a host of their own (:mod:`fedmeta.bench.netns`: a
network namespace with its own address on a private bridge, and a mount namespace in which the
host sees only its own files), as the two-host test does: ``fedmeta coordinator start`` (a TLS
SuperLink with node authentication and fedmeta's ServerApp executor) on one, ``fedmeta site
start`` (a SuperNode and fedmeta's site worker, each key under its own passphrase) on each of
the others, and ``fedmeta run`` submitting the experiment on the coordinator's host.

Measured, from outside the hosts (``rounds.jsonl`` read every 0.1 s, psutil every 0.5 s):

- **rounds**: each round's wall time (``wall_s``, the coordinator's clock, as in ``fedmeta bench
  deploy``); median and 95th percentile of the rounds before the kill, and of every round;
- **the SuperLink**: its resident memory (peak, and at the end) and its CPU time over the run,
  as seconds and as a share of one core;
- **a site's death**: after ``STEADY`` rounds one hospital's whole ``fedmeta site start``
  (worker, SuperNode and all) is SIGKILLed, as a host losing power would. *Noticed*: from the
  kill to the end of the first round that reports the site missing (the round went on without
  it). The site is then started again; *rejoined*: from that restart to the end of the first
  round in which its update is accepted again. Also recorded: when the SuperLink reported its
  node offline and online again (the Control API, every 0.5 s).
- start-up: provisioning, the coordinator up, every site's node online.

The experiment is fixed (the one of ``fedmeta bench scale``): Reptile, an MLP 32-32, synthetic
EHR sites, ``federation.min_nodes`` at its default (2), one torch thread per process. Once the
site has rejoined, ``AFTER`` more rounds are run and the run is stopped. Goals (the
consortium-scale issue): median round at most 1 s and p95 at most 2 s; a killed site noticed
within 15 s and taking part again within 30 s of its restart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.bench import rows as R

log = logging.getLogger(__name__)

BENCH = "hosts"
SITES, QUICK_SITES = 10, 3
#: rounds before the kill; rounds after the site rejoined; the most rounds of a run
STEADY, QUICK_STEADY = 30, 4
AFTER = 5
MAX_ROUNDS = 300
TARGET_MEDIAN_S, TARGET_P95_S, TARGET_NOTICED_S, TARGET_REJOIN_S = 1.0, 2.0, 15.0, 30.0
RUN = "hosts"


def experiment(rounds: int) -> dict[str, Any]:
    """The experiment (``fedmeta bench scale``'s, over the hosts' shared EHR schema)."""
    return {"algorithm": "reptile", "rounds": rounds, "model": {"hidden": [32, 32]}, "tasks": {"meta_batch": 4},
            "eval": {"bootstrap": 0, "adaptation": "fixed", "adapt_steps": 20}, "engine": {"threads": 1}}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, numpy's default); NaN for no values."""
    return float(np.percentile(list(values), q)) if values else float("nan")


@dataclass
class Seen:
    """A round record and when it was first seen (monotonic seconds)."""

    t: float
    record: dict[str, Any]


def first_after(seen: Sequence[Seen], t0: float, site: str, key: str) -> Seen | None:
    """The first record seen after ``t0`` whose ``key`` list (``missing``, ``accepted``) names ``site``."""
    return next((s for s in seen if s.t > t0 and site in s.record.get(key, [])), None)


@dataclass
class Samples:
    """The SuperLink's resident memory and CPU time, and the load average, over time."""

    rss: list[int] = field(default_factory=list)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (t, user + system seconds)
    load: list[float] = field(default_factory=list)

    def add(self, proc: Any, t: float) -> None:
        import psutil

        try:
            with proc.oneshot():
                self.rss.append(int(proc.memory_info().rss))
                times = proc.cpu_times()
                self.cpu.append((t, float(times.user + times.system)))
        except psutil.Error:
            pass
        self.load.append(os.getloadavg()[0])

    def cpu_share(self) -> tuple[float, float]:
        """(CPU seconds, share of one core) between the first and the last sample."""
        if len(self.cpu) < 2:
            return float("nan"), float("nan")
        (t0, c0), (t1, c1) = self.cpu[0], self.cpu[-1]
        return c1 - c0, (c1 - c0) / (t1 - t0) if t1 > t0 else float("nan")


def _superlink(coordinator_pid: int) -> Any:
    import psutil

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for p in psutil.Process(coordinator_pid).children(recursive=True):
            try:
                if "fedmeta.deploy.superlink" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise RuntimeError("no SuperLink process under the coordinator")


def measure(n_sites: int, steady: int, out_dir: Path) -> dict[str, Any]:
    """Deploy, run, kill a site after ``steady`` rounds, restart it; returns every figure."""
    from fedmeta.bench.netns import deploy_consortium, separate_hosts
    from fedmeta.deploy.control import Control
    from fedmeta.deploy.processes import Processes

    sites = [f"s{i + 1}" for i in range(n_sites)]
    victim = sites[0]
    res: dict[str, Any] = {"sites": n_sites, "steady_rounds": steady, "load_start": os.getloadavg()[0]}
    t0 = time.monotonic()
    with separate_hosts(["co", *sites]) as h:
        c = deploy_consortium(h, coordinator="co", sites=sites)
        name = c.sites[victim]
        config = c.write_experiment({**experiment(MAX_ROUNDS),
                                     "federation": {"timeout_s": 120, "eval_timeout_s": 120}})
        res["provision_s"] = time.monotonic() - t0
        procs = Processes(h.root / "procs")
        control = None
        run_log = h.root / "run.log"
        try:
            t1 = time.monotonic()
            co = c.start_coordinator(procs)
            res["coordinator_s"] = time.monotonic() - t1
            superlink = _superlink(co.pid)
            control = Control(h.private("co") / "state" / "superlink.sock")
            ids = {n.name: n.node_id for n in control.nodes()}
            t1 = time.monotonic()
            for host in sites:
                c.start_site(procs, host)
            while {n.node_id for n in control.nodes() if n.status == "online"} < set(ids.values()):
                if time.monotonic() - t1 > 300:
                    raise RuntimeError("not every site came online within 300 s")
                time.sleep(0.3)
            res["sites_online_s"] = time.monotonic() - t1
            with open(run_log, "w") as out:
                run = subprocess.Popen(c.run_argv(config, name=RUN, timeout=3600), env=c.env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            samples = Samples()
            seen: list[Seen] = []
            t_kill = t_noticed = t_restart = t_rejoined = None
            t_offline = t_online = None
            run_id = None
            t_sample = 0.0
            while run.poll() is None:
                now = time.monotonic()
                if now - t_sample >= 0.5:
                    samples.add(superlink, now)
                    t_sample = now
                    if t_kill is not None and t_rejoined is None:
                        status = {n.node_id: n.status for n in control.nodes()}.get(ids[name])
                        if t_offline is None and status != "online":
                            t_offline = now
                        elif t_offline is not None and t_online is None and status == "online":
                            t_online = now
                for record in c.rounds(RUN)[len(seen):]:
                    seen.append(Seen(now, record))
                if run_id is None:
                    m = re.search(r"submitted run (\d+)", run_log.read_text(errors="replace"))
                    run_id = int(m.group(1)) if m else None
                if t_kill is None and len(seen) >= steady:
                    procs.kill(f"site-{victim}")
                    t_kill = time.monotonic()
                elif t_kill is not None and t_noticed is None and (s := first_after(seen, t_kill, name, "missing")):
                    t_noticed = s.t
                    c.start_site(procs, victim)
                    t_restart = time.monotonic()
                elif t_restart is not None and t_rejoined is None and (s := first_after(seen, t_restart, name,
                                                                                         "accepted")):
                    t_rejoined = s.t
                if t_rejoined is not None and len([s for s in seen if s.t > t_rejoined]) >= AFTER and run_id:
                    control.stop_run(run_id)
                    break
                if len(seen) >= MAX_ROUNDS or now - t0 > 3000:
                    break
                time.sleep(0.1)
            samples.add(superlink, time.monotonic())
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        finally:
            procs.refresh_children()
            if control is not None:
                control.close()
            procs.stop_all()
            keep = out_dir / "runs" / "logs"
            shutil.rmtree(keep, ignore_errors=True)
            if (h.root / "procs" / "logs").exists():
                shutil.copytree(h.root / "procs" / "logs", keep)
            if run_log.exists():
                shutil.copyfile(run_log, keep / "run.log")
            if c.run_folder(RUN).exists():
                shutil.copyfile(c.run_folder(RUN) / "rounds.jsonl", keep / "rounds.jsonl")
        res["leftovers"] = procs.leftovers() + h.pids()
    walls = [float(s.record["wall_s"]) for s in seen]
    before = walls[:steady]
    cpu_s, share = samples.cpu_share()
    res.update({
        "rounds": len(seen), "round_s": walls, "round_s_median": statistics.median(before) if before else float("nan"),
        "round_s_p95": percentile(before, 95), "round_s_max": max(before, default=float("nan")),
        "all_round_s_median": statistics.median(walls) if walls else float("nan"),
        "all_round_s_p95": percentile(walls, 95),
        "superlink_rss_peak_mb": max(samples.rss, default=0) / 2**20,
        "superlink_rss_end_mb": (samples.rss[-1] if samples.rss else 0) / 2**20,
        "superlink_cpu_s": cpu_s, "superlink_cpu_share": share,
        "run_wall_s": samples.cpu[-1][0] - samples.cpu[0][0] if len(samples.cpu) > 1 else float("nan"),
        "load_max": max(samples.load, default=float("nan")), "load_end": os.getloadavg()[0],
        "killed": name,
    })

    def since(a: float | None, b: float | None) -> float:
        return b - a if a is not None and b is not None else float("nan")

    res.update({"noticed_s": since(t_kill, t_noticed), "rejoined_s": since(t_restart, t_rejoined),
                "back_after_kill_s": since(t_kill, t_rejoined), "offline_after_kill_s": since(t_kill, t_offline),
                "online_after_restart_s": since(t_restart, t_online)})
    missing = [s.record["round"] for s in seen if name in s.record.get("missing", [])]
    if t_kill is not None:
        killed_round = next((s.record["round"] for s in seen if s.t > t_kill), None)
        res["kill_round"] = killed_round
        res["outage_rounds"] = len([s for s in seen if s.t > t_kill and (t_rejoined is None or s.t < t_rejoined)])
        res["missing_rounds"] = missing
        res["noticed_round_s"] = next((float(s.record["wall_s"]) for s in seen if s.t > t_kill
                                       and name in s.record.get("missing", [])), float("nan"))
    return res


def _f(v: float, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    n_sites, steady = (QUICK_SITES, QUICK_STEADY) if quick else (SITES, STEADY)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    timer = R.Timer()
    r = measure(n_sites, steady, out_dir)
    keys = ("round_s_median", "round_s_p95", "round_s_max", "all_round_s_median", "all_round_s_p95",
            "superlink_rss_peak_mb", "superlink_rss_end_mb", "superlink_cpu_s", "superlink_cpu_share",
            "noticed_s", "rejoined_s", "back_after_kill_s", "offline_after_kill_s", "online_after_restart_s",
            "noticed_round_s", "provision_s", "coordinator_s", "sites_online_s", "run_wall_s",
            "load_start", "load_max", "load_end")
    rows = [R.row(BENCH, f"{n_sites} sites", k, r.get(k), site="mean", sites=n_sites) for k in keys]
    rows += [R.row(BENCH, f"{n_sites} sites", "round_s", v, site="mean", round=i + 1)
             for i, v in enumerate(r["round_s"])]
    met = {
        "median": r["round_s_median"] <= TARGET_MEDIAN_S, "p95": r["round_s_p95"] <= TARGET_P95_S,
        "noticed": r["noticed_s"] <= TARGET_NOTICED_S, "rejoined": r["rejoined_s"] <= TARGET_REJOIN_S,
    }
    lines = [
        f"**{n_sites} hospitals on separate hosts (network + mount namespaces), TLS SuperLink, "
        f"{os.cpu_count()} cores, load average {r['load_start']:.1f} at the start, up to {r['load_max']:.1f} "
        f"during the run, {r['load_end']:.1f} at the end**", "",
        "| | median (s) | p95 (s) | slowest (s) | rounds |", "|---|---|---|---|---|",
        f"| rounds before the kill | {_f(r['round_s_median'])} | {_f(r['round_s_p95'])} | {_f(r['round_s_max'])} "
        f"| {min(steady, r['rounds'])} |",
        f"| every round of the run | {_f(r['all_round_s_median'])} | {_f(r['all_round_s_p95'])} | "
        f"{_f(max(r['round_s'], default=float('nan')))} | {r['rounds']} |", "",
        "| SuperLink | |", "|---|---|",
        f"| resident memory, peak / at the end | {_f(r['superlink_rss_peak_mb'], 0)} / "
        f"{_f(r['superlink_rss_end_mb'], 0)} MB |",
        f"| CPU over the run ({_f(r['run_wall_s'], 0)} s) | {_f(r['superlink_cpu_s'], 1)} s, "
        f"{_f(100 * r['superlink_cpu_share'], 0)} % of one core |", "",
        f"| {r['killed']} SIGKILLed (site start, worker, SuperNode) | s |", "|---|---|",
        f"| noticed: kill -> end of the first round reporting it missing (round {r.get('kill_round', '–')}, "
        f"{_f(r.get('noticed_round_s', float('nan')))} s long) | {_f(r['noticed_s'])} |",
        f"| the SuperLink reports its node offline, after the kill | {_f(r['offline_after_kill_s'])} |",
        f"| restarted -> its node online at the SuperLink | {_f(r['online_after_restart_s'])} |",
        f"| rejoined: restart -> end of the first round accepting its update | {_f(r['rejoined_s'])} |",
        f"| kill -> taking part again | {_f(r['back_after_kill_s'])} |", "",
        f"start-up: provisioning {_f(r['provision_s'], 1)} s, coordinator up {_f(r['coordinator_s'], 1)} s, "
        f"every site online {_f(r['sites_online_s'], 1)} s; rounds without the site: {r.get('outage_rounds', '–')}; "
        f"leftover processes: {len(r['leftovers'])}", "",
        f"goals: median round <= {TARGET_MEDIAN_S:g} s {'met' if met['median'] else 'NOT met'}; "
        f"p95 <= {TARGET_P95_S:g} s {'met' if met['p95'] else 'NOT met'}; noticed within "
        f"{TARGET_NOTICED_S:g} s {'met' if met['noticed'] else 'NOT met'}; rejoined within {TARGET_REJOIN_S:g} s "
        f"{'met' if met['rejoined'] else 'NOT met'}",
    ]
    R.emit("\n".join(lines), out_dir, BENCH)
    (out_dir / "runs").mkdir(exist_ok=True)
    (out_dir / "runs" / "figures.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    rows.append(R.row(BENCH, "all", "runtime_s", timer(), site="mean"))
    R.save_rows(rows, out_dir / f"{BENCH}.json")
    return rows
