"""Benchmark: a deployed round against the same round in one process.

The same experiment (Fed-Heart-Disease, three of its hospitals, the default Reptile settings,
``ROUNDS`` rounds) runs twice in one command:

- **in process**: ``fedmeta simulate --backend local`` (the coordinator and the sites' ClientApp
  in this process, every message serialised as on the wire);
- **deployed**: ``fedmeta deploy local`` — a TLS SuperLink with node authentication and one
  ``fedmeta site start`` per hospital on 127.0.0.1 (each a SuperNode in ``process`` isolation and
  fedmeta's long-running site worker), with encrypted keys, exactly what hospitals run.

Each run's ``rounds.jsonl`` holds the wall time of every round (``wall_s``: from the round's
start to its aggregate, the coordinator's clock). Reported: the median round of each, their
ratio, the deployed start-up (provisioning, SuperLink, sites online) and the whole run. The
issue's target: the median deployed round at most 2.5x the in-process one and at most 8 s on
2 cores with 3 sites. Both runs use one torch thread per process (``engine.threads = 1``).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from fedmeta.bench import plots
from fedmeta.bench import rows as R

log = logging.getLogger(__name__)

BENCH = "deploy"
#: Three hospitals whose test splits hold at least 20 patients: a deployed site's policy
#: (``min_patients``, default 20) makes Switzerland (16 test patients) decline the run.
SITES = ("Cleveland", "Hungary", "VA Long Beach")
ROUNDS = 10
#: The deployed round's goals (BENCHMARKS.md §8): a median round of at most 8 s (Flower's own
#: minimal deployed round is of that order: seconds, dominated by its polls) and at most 2.5x the
#: same round in one process. §8 explains why the ratio is not met and is no longer a goal: it
#: compares a 50 ms model step against a chain of message hops.
TARGET_RATIO, TARGET_S = 2.5, 8.0


def settings(quick: bool) -> int:
    """Rounds per run."""
    return 2 if quick else ROUNDS


def overrides(rounds: int) -> list[str]:
    """The experiment both runs share (the deployed one serves these three sites)."""
    return ["algorithm=reptile", f"rounds={rounds}", "federation.min_nodes=3", f"data.sites={list(SITES)!r}"]


def round_times(run_dir: Path) -> list[float]:
    """Wall seconds of each round of a finished run folder (``rounds.jsonl``)."""
    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
    return [float(x["wall_s"]) for x in lines]


def compare(local: list[float], deployed: list[float]) -> dict[str, float]:
    """Medians of each and their ratio (deployed / in process)."""
    m_local, m_deployed = statistics.median(local), statistics.median(deployed)
    return {"local_median_s": m_local, "deployed_median_s": m_deployed,
            "ratio": m_deployed / m_local if m_local > 0 else float("inf")}


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    from fedmeta.cli.simulate import simulate
    from fedmeta.common.config import load_config
    from fedmeta.deploy.local import deploy_local

    rounds = settings(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    timer = R.Timer()
    cfg = load_config(None, overrides(rounds))
    t0 = time.monotonic()
    simulate(cfg, out_dir / "local", backend="local", progress=lambda _: None)
    local_total = time.monotonic() - t0
    result = deploy_local(sites=len(SITES), rounds=None, out=out_dir / "deployed",
                          overrides=overrides(rounds), stream=False, say=lambda _: None)
    local, deployed = round_times(out_dir / "local"), round_times(out_dir / "deployed")
    c = compare(local, deployed)
    rows = [
        R.row(BENCH, "in process", "round_s_median", c["local_median_s"], site="mean", rounds=rounds),
        R.row(BENCH, "deployed", "round_s_median", c["deployed_median_s"], site="mean", rounds=rounds),
        R.row(BENCH, "deployed / in process", "ratio", c["ratio"], site="mean"),
        R.row(BENCH, "in process", "run_s", local_total, site="mean"),
        R.row(BENCH, "deployed", "run_s", result.run_s, site="mean"),
        R.row(BENCH, "deployed", "startup_s", result.provision_s + result.startup_s, site="mean"),
    ]
    rows += [R.row(BENCH, "in process", "round_s", v, site="mean", round=i + 1) for i, v in enumerate(local)]
    rows += [R.row(BENCH, "deployed", "round_s", v, site="mean", round=i + 1) for i, v in enumerate(deployed)]
    met = c["ratio"] <= TARGET_RATIO and c["deployed_median_s"] <= TARGET_S
    table = "\n".join([
        f"**A round deployed vs in process ({len(SITES)} sites, {rounds} rounds, one machine)**", "",
        "| | median round (s) | whole run (s) | start-up (s) |", "|---|---|---|---|",
        f"| in process (`simulate --backend local`) | {c['local_median_s']:.2f} | {local_total:.1f} | – |",
        f"| deployed (TLS SuperLink + `site start` x{len(SITES)}) | {c['deployed_median_s']:.2f} | "
        f"{result.run_s:.1f} | {result.provision_s + result.startup_s:.1f} |", "",
        f"ratio {c['ratio']:.2f} (target <= {TARGET_RATIO}); deployed median {c['deployed_median_s']:.2f} s "
        f"(target <= {TARGET_S} s): {'met' if met else 'NOT met'}",
    ])
    R.emit(table, out_dir, BENCH)
    plots.plot_lines({"in process": (list(range(1, len(local) + 1)), local),
                      "deployed": (list(range(1, len(deployed) + 1)), deployed)},
                     out_dir / "deploy_round_s.png", xlabel="round", ylabel="seconds",
                     title="Round wall time" + (" [quick]" if quick else ""))
    rows.append(R.row(BENCH, "all", "runtime_s", timer(), site="mean"))
    R.save_rows(rows, out_dir / f"{BENCH}.json")
    return rows
