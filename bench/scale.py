"""``fedmeta bench scale``: the same experiment on 10, 50 and 200 simulated hospitals.

Each size runs ``fedmeta simulate`` (Flower's simulation engine on Ray, synthetic EHR sites, one
CPU per site actor) in its own process, sampled every 0.2 s with psutil:

- **time per round**: the median of ``rounds.jsonl``'s ``wall_s`` (the final evaluation of every
  site is not a round, and is reported as the run's remainder);
- **time to first round**: from the process start to the first round's record;
- **peak memory**: of the coordinator's process (the ServerApp and the simulation driver) and of
  the whole run (that process and every process it started: Ray's raylet, GCS and site actors),
  as resident set sizes summed at each sample;
- **growth**: each size's round time divided by the previous size's, against the ratio of their
  site counts (at most linear: a ratio no larger than the sites').

The experiment is fixed for every size: Reptile (not ``auto``, which would add candidates), an
MLP 32-32, 10 rounds (2 with ``--quick``), every site each round, evaluation without bootstrap.
Goals (the consortium-scale issue): 200 hospitals x 10 rounds in under 10 minutes and 8 GB on 2
cores, the round time growing at most linearly from 50 to 200 sites.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedmeta.bench import rows as R

log = logging.getLogger(__name__)

BENCH = "scale"
SIZES = (10, 50, 200)
QUICK_SIZES = (4, 10)
TARGET_S, TARGET_GB = 600.0, 8.0


def overrides(n_sites: int, rounds: int) -> list[str]:
    return ["algorithm=reptile", "data.source=synth-ehr", f"data.synth_sites={n_sites}", f"rounds={rounds}",
            "model.hidden=[32,32]", "tasks.meta_batch=4", "eval.bootstrap=0", "eval.adaptation=fixed",
            "eval.adapt_steps=20", f"federation.min_nodes={n_sites}", "engine.threads=1",
            f"federation.timeout_s={timeout_s(n_sites)}"]


def timeout_s(n_sites: int) -> int:
    """How long the coordinator waits for every site's greeting (and a round's replies): the
    default 120 s is too short for 200 Ray actors on 2 cores, which greet about 2.5 per second
    (measured: 49 of 200 had answered after 120 s, and the run stopped there)."""
    return max(120, 3 * n_sites)


def _tree_rss(proc: object) -> tuple[int, int]:
    """(resident bytes of ``proc``, of ``proc`` and all its descendants)."""
    import psutil

    assert isinstance(proc, psutil.Process)
    try:
        own = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = own
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return own, total


def measure(n_sites: int, rounds: int, out_dir: Path, *, timeout_s: float = 3600.0) -> dict[str, float]:
    """Run one size in a child process and sample it; returns its figures."""
    import psutil

    from fedmeta.common.config import load_config
    from fedmeta.common.data.registry import data_spec

    data_spec(load_config(None, overrides(n_sites, rounds)).data)  # generate the sites first, unmeasured
    run = out_dir / f"sites-{n_sites}"
    argv = [sys.executable, "-m", "fedmeta.cli.main", "simulate", "--out", str(run),
            "--set", *overrides(n_sites, rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    with open(out_dir / f"sites-{n_sites}.log", "w") as run_log:
        child = subprocess.Popen(argv, stdout=run_log, stderr=subprocess.STDOUT, env=env)
        proc = psutil.Process(child.pid)
        peak_own = peak_total = 0
        first_round_s = float("nan")
        rounds_file = run / "rounds.jsonl"
        try:
            while child.poll() is None:
                own, total = _tree_rss(proc)
                peak_own, peak_total = max(peak_own, own), max(peak_total, total)
                if math.isnan(first_round_s) and rounds_file.exists() and rounds_file.stat().st_size:
                    first_round_s = time.monotonic() - t0
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"{n_sites} sites: over {timeout_s:.0f} s")
                time.sleep(0.2)
        finally:
            if child.poll() is None:
                for p in proc.children(recursive=True):
                    p.kill()
                child.kill()
    run_s = time.monotonic() - t0
    if child.returncode != 0:
        raise RuntimeError(f"{n_sites} sites: simulate exited {child.returncode}; see {run_log.name}")
    records = [json.loads(x) for x in rounds_file.read_text().splitlines() if x.strip()]
    round_s = [float(r["wall_s"]) for r in records]
    return {"sites": n_sites, "rounds": len(records), "round_s_median": statistics.median(round_s),
            "round_s_max": max(round_s), "first_round_s": first_round_s, "run_s": run_s,
            "rest_s": run_s - first_round_s - sum(round_s[1:]),
            "peak_coordinator_mb": peak_own / 2**20, "peak_total_mb": peak_total / 2**20}


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    sizes, rounds = (QUICK_SIZES, 2) if quick else (SIZES, 10)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    timer = R.Timer()
    load = os.getloadavg()
    results, failed = [], []
    for n in sizes:
        try:
            results.append(measure(n, rounds, out_dir))
        except (RuntimeError, TimeoutError) as e:  # a size that breaks is a result too: say it, go on
            failed.append(f"{n} sites: {e}")
            log.error("%s", failed[-1])
    rows: list[R.Row] = [R.row(BENCH, why.split(":")[0], "failed", None, site="mean", reason=why) for why in failed]
    for r in results:
        for metric in ("round_s_median", "round_s_max", "first_round_s", "run_s", "peak_coordinator_mb",
                       "peak_total_mb"):
            rows.append(R.row(BENCH, f"{r['sites']} sites", metric, r[metric], site="mean", sites=r["sites"],
                              rounds=r["rounds"]))
    lines = [f"**{rounds} rounds of Reptile on synthetic EHR sites, Ray, {os.cpu_count()} cores "
             f"(load average {load[0]:.1f} at the start)**", "",
             "| sites | median round (s) | slowest round (s) | to first round (s) | whole run (s) | "
             "peak coordinator (MB) | peak run (MB) | round time vs previous size |",
             "|---|---|---|---|---|---|---|---|"]
    for prev, r in zip((None, *results[:-1]), results, strict=True):
        growth = ("–" if prev is None else
                  f"x{r['round_s_median'] / prev['round_s_median']:.2f} for x{r['sites'] / prev['sites']:.0f} sites")
        lines.append(f"| {r['sites']} | {r['round_s_median']:.2f} | {r['round_s_max']:.2f} | "
                     f"{r['first_round_s']:.1f} | {r['run_s']:.1f} | {r['peak_coordinator_mb']:.0f} | "
                     f"{r['peak_total_mb']:.0f} | {growth} |")
        if prev is not None:
            rows.append(R.row(BENCH, f"{r['sites']} sites", "round_growth_per_site_growth",
                              (r["round_s_median"] / prev["round_s_median"]) / (r["sites"] / prev["sites"]),
                              site="mean", sites=r["sites"]))
    lines += [f"- failed: {why}" for why in failed]
    if not quick and results and results[-1]["sites"] == sizes[-1]:
        big = results[-1]
        met = big["run_s"] <= TARGET_S and big["peak_total_mb"] <= TARGET_GB * 1024
        lines += ["", f"{big['sites']} sites x {rounds} rounds: {big['run_s']:.0f} s (goal < {TARGET_S:.0f} s), "
                      f"peak {big['peak_total_mb'] / 1024:.2f} GB (goal < {TARGET_GB:.0f} GB): "
                      f"{'met' if met else 'NOT met'}"]
    R.emit("\n".join(lines), out_dir, BENCH)
    rows.append(R.row(BENCH, "all", "runtime_s", timer(), site="mean"))
    R.save_rows(rows, out_dir / f"{BENCH}.json")
    return rows
