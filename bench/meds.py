"""``fedmeta bench meds``: speed and peak memory of MEDS tabularisation, against meds-tab.

Data: one synthetic hospital from :mod:`fedmeta.common.data.meds.synth` (the synth-ehr stays
written as MEDS, vitals every 30 minutes): 20,000 stays and about 9.5 million events in shards of
2,000 subjects (``--quick``: 1,000 stays). Windows ``24h`` and ``all``; aggregations
``last, mean, min, max, count`` for numeric codes and ``present, count`` for the others; the
vocabulary is the site's own (codes in at least 20 patients).

Each measurement runs in a fresh Python process (``python -m fedmeta.bench.meds measure``). Its
peak memory is the largest resident set of that process and its worker processes together,
sampled every 50 ms from ``/proc``; its CPU time (user + system) comes from ``wait4``. Metrics:

- ``events_per_s``: events read / the time spent in :func:`tabularise_site` (reading the label
  files and every shard, aggregating), measured inside the process; for meds-tab, / wall time;
- ``events_per_s_per_core``: the same divided by the cores the run was given (P, or 2 for
  meds-tab);
- ``events_per_cpu_s``: events / CPU seconds (user + system) spent in that same work, the
  process and its workers together: the per-core rate that load from other processes on a shared
  machine does not change; for meds-tab, of its whole processes (start-up included);
- ``events_per_s_wall`` and ``wall_s``: the whole process, Python start-up and imports included
  (about 1-2 s here, and again in each worker for P = 2);
- ``peak_rss_mb``.

Rows:

- ``fedmeta tabularise (P processes)``: the whole site, P = 1 and 2 (shards spread over worker
  processes);
- ``fedmeta count_codes``: the site's side of the feature agreement (one pass over the shards);
- ``meds-tab 0.2.0``: ``meds-tab-describe``, ``meds-tab-tabularize-static`` and
  ``meds-tab-tabularize-time-series`` (with the label files, so that it aggregates at the prediction
  times only) on the same windows and the closest aggregations it offers (``code/count``,
  ``value/count``, ``value/sum``, ``value/min``, ``value/max``, ``static/present``; it has no
  ``last`` or ``mean``), run on a subset of ``MEDS_TAB_STAYS`` stays because it is about a thousand
  times slower here; fedmeta is timed on the same subset beside it. meds-tab is found through the
  environment variable ``FEDMETA_MEDS_TAB`` (its ``bin`` folder) or on ``PATH``; when absent the row
  says so. meds-tab anchors each window at the last event at or before the prediction time and
  includes events at the prediction time, so its features differ from fedmeta's (which stop
  strictly before the prediction time); only the speed is compared.

The machine is shared; the 1-minute load average is recorded with every row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BENCH = "meds"
FULL_STAYS = 20_000
QUICK_STAYS = 1_000
MEDS_TAB_STAYS = 1_000
VITALS_EVERY_MIN = 30
WINDOWS = ("24h", "all")
SEED = 0
MIN_SUBJECTS = 20
#: MEDS tabularisation goals: a million events per second per core (so a site's 10^8 events
#: take minutes on one core) in at most 2 GiB, what a hospital's modest server offers; the
#: reference row is MEDS-Tab on a subset of the same stays (BENCHMARKS.md §6).
TARGET_EVENTS_PER_S_PER_CORE = 1_000_000
TARGET_PEAK_MB = 2048
_MEDS_TAB_AGGS = "[static/present,code/count,value/count,value/sum,value/min,value/max]"


# -- rows, table, plot (the row contract of ``fedmeta bench``; kept here so that this benchmark
# depends on no other benchmark module) ------------------------------------------------------------
def row(benchmark: str, method: str, metric: str, value: float | None, **extra: Any) -> dict[str, Any]:
    """One result row; an undefined value (NaN, inf) is stored as ``None`` (strict JSON)."""
    v = None if value is None or not math.isfinite(float(value)) else float(value)
    return {"benchmark": benchmark, "method": method, "metric": metric, "value": v, **extra}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- data -----------------------------------------------------------------------------------------
def make_site(root: Path, *, stays: int, shard_subjects: int) -> Path:
    """Write (or reuse) one synthetic MEDS hospital of ``stays`` stays; returns its site.yaml."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import yaml

    from fedmeta.common.data.meds.synth import CODES, stays_to_meds
    from fedmeta.common.data.meds.writer import GENERATOR_VERSION, write_labels, write_meds_dataset
    from fedmeta.common.data.synth_ehr import OUTCOMES, draw_hospitals, simulate_stays

    stamp = {
        "version": GENERATOR_VERSION, "stays": stays, "seed": SEED,
        "vitals_every_min": VITALS_EVERY_MIN, "shard_subjects": shard_subjects,
    }
    site_yaml = root / "site.yaml"
    if (root / "stamp.json").is_file() and json.loads((root / "stamp.json").read_text()) == stamp:
        return site_yaml
    shutil.rmtree(root, ignore_errors=True)
    params = dataclasses.replace(draw_hospitals(1, seed=SEED)[0], n_stays=stays)
    frame = simulate_stays(params, seed=SEED, site_index=0)
    events, labels = stays_to_meds(
        frame, seed=SEED, site_index=0, coding=CODES, vitals_every_min=VITALS_EVERY_MIN
    )
    shards = write_meds_dataset(root / "meds", events, shard_subjects=shard_subjects)
    write_labels(root / "labels", labels)
    # meds-tab reads one label file per data shard, at the shard's path under its label folder
    first = labels[OUTCOMES[0]]
    for shard in shards:
        sid = pq.read_table(shard, columns=["subject_id"]).column("subject_id")
        mask = pc.is_in(first.column("subject_id"), value_set=pc.unique(sid))
        out = root / "medstab-labels" / "data" / shard.name
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(first.filter(mask), out)
    site_yaml.write_text(
        yaml.safe_dump(
            {
                "kind": "meds", "name": f"synthetic-{stays}", "path": "meds",
                "labels": {o: f"labels/{o}.parquet" for o in OUTCOMES},
                "windows": list(WINDOWS), "min_subjects": MIN_SUBJECTS,
            },
            sort_keys=False,
        )
    )
    (root / "stamp.json").write_text(json.dumps(stamp))
    return site_yaml


# -- measurements in a fresh process --------------------------------------------------------------
def _child(argv: list[str]) -> int:
    """``measure SITE_YAML VOCAB_JSON WORKERS`` or ``count SITE_YAML``: print one JSON line."""
    from fedmeta.common.data.meds.config import load_meds_site_config
    from fedmeta.common.data.meds.site import tabularise_site
    from fedmeta.common.data.meds.vocabulary import Vocabulary, count_codes

    cfg = load_meds_site_config(argv[1])
    t0, cpu0 = time.perf_counter(), time.process_time()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if argv[0] == "count":
        counts = count_codes(cfg)
        out: dict[str, Any] = {"codes": len(counts.subjects)}
    else:
        vocab = Vocabulary.from_json(Path(argv[2]).read_text())
        feats = tabularise_site(cfg, vocab, workers=int(argv[3]))
        out = {"n_events": feats.n_events, "n_samples": int(feats.x.shape[0]),
               "n_features": int(feats.x.shape[1])}
    out["compute_s"] = time.perf_counter() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["compute_cpu_s"] = (time.process_time() - cpu0 + kids.ru_utime - kids0.ru_utime
                            + kids.ru_stime - kids0.ru_stime)
    print(json.dumps(out), flush=True)
    return 0


def _tree_rss_mb(root: int) -> float:
    """Resident memory (MB) of process ``root`` and all its descendants, from ``/proc``."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measured(
    cmd: list[str], *, env: dict[str, str] | None = None
) -> tuple[str, float, float, float]:
    """Run ``cmd``: (stdout, wall s, peak RSS MB, CPU s). The peak is the largest sum of the
    resident memory of the process and its descendants (workers), sampled every 50 ms; the CPU
    time (user + system, from ``wait4``) covers the children it waited for."""
    t0 = time.perf_counter()
    peak = 0.0
    stop = threading.Event()
    with open(os.devnull, "w") as devnull, tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=devnull, text=True, env=env)

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss_mb(proc.pid))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        out = stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}")
    return out, wall, peak, usage.ru_utime + usage.ru_stime


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "2"}


def _fedmeta(site_yaml: Path, vocab_json: Path, workers: int) -> dict[str, Any]:
    out, wall, peak, cpu = _measured(
        [sys.executable, "-m", "fedmeta.bench.meds", "measure", str(site_yaml), str(vocab_json),
         str(workers)],
        env=_env(),
    )
    res = json.loads(out.strip().splitlines()[-1])
    return {**res, "wall_s": wall, "peak_rss_mb": peak, "cpu_s": cpu}


def _count(site_yaml: Path) -> dict[str, Any]:
    out, wall, peak, cpu = _measured(
        [sys.executable, "-m", "fedmeta.bench.meds", "count", str(site_yaml)], env=_env()
    )
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": wall, "peak_rss_mb": peak,
            "cpu_s": cpu}


def meds_tab_bin() -> Path | None:
    """meds-tab's ``bin`` folder: ``$FEDMETA_MEDS_TAB`` or wherever ``meds-tab-describe`` is."""
    env = os.environ.get("FEDMETA_MEDS_TAB")
    if env and (Path(env) / "meds-tab-describe").is_file():
        return Path(env)
    found = shutil.which("meds-tab-describe")
    return Path(found).parent if found else None


def _meds_tab(bin_dir: Path, site_root: Path, work: Path) -> dict[str, Any]:
    """Time meds-tab's three tabularisation steps on ``site_root`` (see the module docstring)."""
    shutil.rmtree(work, ignore_errors=True)
    common = [f"input_dir={site_root / 'meds' / 'data'}", f"output_dir={work}"]
    tab = [
        "tabularization.window_sizes=[1d,full]",
        f"tabularization.aggs={_MEDS_TAB_AGGS}",
        f"tabularization.min_code_inclusion_count={MIN_SUBJECTS}",
    ]
    steps = {
        "describe": [str(bin_dir / "meds-tab-describe"), *common],
        "static": [str(bin_dir / "meds-tab-tabularize-static"), *common, *tab],
        "time_series": [
            str(bin_dir / "meds-tab-tabularize-time-series"), *common, *tab,
            f"input_label_dir={site_root / 'medstab-labels'}",
        ],
    }
    out: dict[str, Any] = {"wall_s": 0.0, "peak_rss_mb": 0.0, "cpu_s": 0.0}
    for name, cmd in steps.items():
        _, wall, peak, cpu = _measured(cmd, env=_env())
        out[f"{name}_s"] = wall
        out["wall_s"] += wall
        out["cpu_s"] += cpu
        out["peak_rss_mb"] = max(out["peak_rss_mb"], peak)
    version = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.metadata as m; print(m.version('meds-tab'))"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    out["version"] = version or "?"
    return out


# -- the benchmark --------------------------------------------------------------------------------
def _rows(method: str, site: str, res: dict[str, Any], *, cores: int, n_events: int,
          **extra: Any) -> list[dict[str, Any]]:
    rate = n_events / res.get("compute_s", res["wall_s"])
    info = {"site": site, "cores": cores, "n_events": n_events, "load_avg_1min": os.getloadavg()[0],
            **extra}
    return [
        row(BENCH, method, "events_per_s", rate, **info),
        row(BENCH, method, "events_per_s_per_core", rate / cores, **info),
        row(BENCH, method, "events_per_cpu_s", n_events / res.get("compute_cpu_s", res["cpu_s"]),
            **info),
        row(BENCH, method, "events_per_s_wall", n_events / res["wall_s"], **info),
        row(BENCH, method, "wall_s", res["wall_s"], **info),
        row(BENCH, method, "peak_rss_mb", res["peak_rss_mb"], **info),
    ]


def _vocabulary(site_yaml: Path, path: Path) -> Any:
    from fedmeta.common.data.meds.config import load_meds_site_config
    from fedmeta.common.data.meds.vocabulary import site_vocabulary

    vocab = site_vocabulary(load_meds_site_config(site_yaml))
    path.write_text(vocab.to_json())
    return vocab


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys((r["method"], r["site"]) for r in rows))
    get = {(r["method"], r["site"], r["metric"]): r for r in rows}
    lines = [
        "| method | site | events | cores | process wall s | events/s | events/s per core "
        "| events per CPU s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, site in keys:
        rate = get.get((m, site, "events_per_s"))
        if rate is None or rate["value"] is None:
            note = next(r for r in rows if r["method"] == m).get("note", "")
            lines.append(f"| {m} | {site} | | | | {note} | | | |")
            continue

        def v(metric: str, fmt: str, m: str = m, site: str = site) -> str:
            x = get[(m, site, metric)]["value"]
            return "n/a" if x is None else format(x, fmt)

        lines.append(
            f"| {m} | {site} | {rate['n_events']:,} | {rate['cores']} | {v('wall_s', '.1f')} | "
            f"{v('events_per_s', ',.0f')} | {v('events_per_s_per_core', ',.0f')} | "
            f"{v('events_per_cpu_s', ',.0f')} | {v('peak_rss_mb', ',.0f')} |"
        )
    lines.append("")
    lines.append(
        f"Targets: >= {TARGET_EVENTS_PER_S_PER_CORE:,} events/s per core, peak < {TARGET_PEAK_MB} MB, "
        "not slower than meds-tab on the same windows. 1-minute load average during the runs: "
        + ", ".join(sorted({f"{r['load_avg_1min']:.1f}" for r in rows if "load_avg_1min" in r}))
        + " (2 shared cores)."
    )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    data = [(f"{r['method']}\n[{r['site']}]", r["value"]) for r in rows
            if r["metric"] == "events_per_s_per_core" and r["value"]]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(data) + 1.5))
    ax.barh([d[0] for d in data], [d[1] for d in data])
    ax.axvline(TARGET_EVENTS_PER_S_PER_CORE, ls="--", color="red", lw=1, label="target")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("events per second per core (log scale)")
    ax.set_title("MEDS tabularisation, windows 24h + all")
    ax.legend(fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(*, quick: bool, out_dir: Path) -> list[dict[str, Any]]:
    """Measure (module docstring); writes ``meds.md`` and ``meds_events_per_s.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stays = QUICK_STAYS if quick else FULL_STAYS
    data = out_dir / "data"
    site_yaml = make_site(data / f"site-{stays}", stays=stays, shard_subjects=2000 if not quick else 250)
    site = f"synthetic-{stays}"
    _vocabulary(site_yaml, data / "vocabulary.json")
    rows: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for workers in (1, 2):
        res = _fedmeta(site_yaml, data / "vocabulary.json", workers)
        first = first or res
        rows += _rows(f"fedmeta tabularise ({workers} process{'es' if workers > 1 else ''})", site,
                      res, cores=workers, n_events=res["n_events"],
                      n_samples=res["n_samples"], n_features=res["n_features"])
        log.info("meds bench: %d workers: %s", workers, res)
    assert first is not None
    cnt = _count(site_yaml)
    rows += _rows("fedmeta count_codes (agreement, site side)", site, cnt, cores=1,
                  n_events=first["n_events"])
    bin_dir = meds_tab_bin()
    if bin_dir is None:
        note = ("meds-tab not found (set FEDMETA_MEDS_TAB to its bin folder); it installs in its own "
                "venv with `pip install meds-tab==0.2.0` (pulls xgboost, hydra, optuna, polars)")
        rows.append(row(BENCH, "meds-tab", "events_per_s", None, site=site, note=note))
    elif quick:
        rows.append(row(BENCH, "meds-tab", "events_per_s", None, site=site,
                        note="skipped in --quick (minutes even on 1,000 stays)"))
    else:
        sub_yaml = make_site(data / f"site-{MEDS_TAB_STAYS}", stays=MEDS_TAB_STAYS, shard_subjects=500)
        sub = f"synthetic-{MEDS_TAB_STAYS}"
        _vocabulary(sub_yaml, data / "vocabulary-subset.json")
        res = _fedmeta(sub_yaml, data / "vocabulary-subset.json", 1)
        rows += _rows("fedmeta tabularise (1 process)", sub, res, cores=1, n_events=res["n_events"],
                      n_samples=res["n_samples"], n_features=res["n_features"])
        mt = _meds_tab(bin_dir, sub_yaml.parent, data / "medstab-out")
        rows += _rows(f"meds-tab {mt['version']} (describe + static + time-series)", sub, mt,
                      cores=2, n_events=res["n_events"],
                      steps_s={k: mt[k] for k in ("describe_s", "static_s", "time_series_s")},
                      note="polars allowed both cores (POLARS_MAX_THREADS=2)")
    text = "## MEDS tabularisation\n\n" + _table(rows)
    print(text, flush=True)
    (out_dir / f"{BENCH}.md").write_text(text + "\n")
    _plot(rows, out_dir / f"{BENCH}_events_per_s.png")
    return rows


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
