"""Benchmark 3: a synthetic MIMIC-style consortium, new hospitals and a new outcome, by AUROC.

Data: ``configs/ehr-synth.yaml`` (:mod:`fedmeta.common.data.synth_ehr`): 20 hospitals sharing
physiology but differing in case-mix, prevalence, lab calibration and missingness; four binary
outcomes per stay (mortality, length of stay > 7 days, 30-day readmission, acute kidney injury).
A meta-learning task is a (hospital, outcome) pair.

Two settings, both scored at hospitals that never took part in training (:data:`HELD_OUT`):

1. **held-out hospitals**: the federation trains on the other 16; each held-out hospital adapts to
   each of the four outcomes from K labelled patients (K in :data:`KS`, :data:`DRAWS` random
   draws) and is scored by AUROC on its test split;
2. **held-out outcome**: the same, but acute kidney injury is also removed from every training
   hospital's labels (a derived data source, see :func:`register_without_outcome`), so AKI is a
   new prediction task at a new hospital.

Methods: fedmeta Reptile and FOMAML (tasks over all training outcomes); FedAvg + fine-tuning
(note: fedmeta's FedAvg client trains on a site's *first* outcome, mortality, so its model is a
mortality model fine-tuned to the target outcome, the usual transfer baseline); local training
(logistic regression on the K patients alone, L2 as scikit-learn's default ``C = 1``).

Settings are those of ``configs/ehr-synth.yaml`` (fixed by the data's author before these runs),
with :data:`HELD_OUT` four hospitals instead of two for more held-out sites; adaptation is
``eval.adapt_steps`` steps of ``eval.adapt_lr`` for every method. Nothing is tuned here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedmeta.bench import fitting, plots, runner
from fedmeta.bench import rows as R
from fedmeta.common.config import DataConfig, ExperimentConfig
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.data.registry import DataSpec, Source, _source, register_source
from fedmeta.common.experiment import build_model_for
from fedmeta.common.params import NDArrays

log = logging.getLogger(__name__)

BENCH = "ehr"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ehr-synth.yaml"
HELD_OUT: tuple[str, ...] = ("hospital-17", "hospital-18", "hospital-19", "hospital-20")
NEW_OUTCOME = "aki"
KS: tuple[int, ...] = (10, 20, 50)
DRAWS = 20
METHODS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("reptile", "fedmeta Reptile + adaptation", ("algorithm=reptile",)),
    ("fomaml", "fedmeta FOMAML + adaptation", ("algorithm=fomaml",)),
    ("fedavg", "FedAvg + fine-tuning", ("algorithm=fedavg",)),
)
LOCAL = "local training (K patients, logistic regression)"


def register_without_outcome(source: str, outcome: str) -> str:
    """Register ``SOURCE-no-OUTCOME``: the same sites with ``outcome``'s column removed from both
    splits, so no training hospital ever sees a label for it. Returns the new source's name."""
    base = _source(DataConfig(source=source))
    name = f"{source}-no-{outcome}"

    def spec(cfg: DataConfig) -> DataSpec:
        s = base.spec(cfg.model_copy(update={"source": source}))
        if outcome not in s.outcomes:
            raise ValueError(f"{source} has no outcome {outcome!r}: {s.outcomes}")
        return replace(s, outcomes=tuple(o for o in s.outcomes if o != outcome))

    def load(cfg: DataConfig, site: str) -> Site:
        full = base.load(cfg.model_copy(update={"source": source}), site)
        assert isinstance(full, TabularSite)
        keep = [i for i, o in enumerate(full.outcomes) if o != outcome]
        return replace(full, y_train=full.y_train[:, keep], y_test=full.y_test[:, keep],
                       outcomes=tuple(full.outcomes[i] for i in keep))

    register_source(name, Source(spec, load))
    return name


def settings(quick: bool) -> tuple[list[int], int, int, tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """(training seeds, rounds, draws, Ks, held-out hospitals, method keys)."""
    if quick:
        return [0], 2, 2, (20,), HELD_OUT[-1:], ("reptile", "fedavg")
    return [0, 1, 2], 30, DRAWS, KS, HELD_OUT, tuple(m[0] for m in METHODS)


def _draws(y: np.ndarray, k: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """K patients with a known label, both classes present (a K-shot task the site can label)."""
    known = np.flatnonzero(y >= 0)
    out: list[np.ndarray] = []
    while len(out) < n:
        idx = rng.choice(known, size=min(k, len(known)), replace=False)
        if len(np.unique(y[idx])) == 2:
            out.append(idx)
    return out


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    """Run benchmark 3; rows per (setting, method, outcome, K) for each held-out hospital and mean."""
    runner.quiet()
    seeds, rounds, n_draws, ks, held_out, keys = settings(quick)
    timer = R.Timer()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    no_new = register_without_outcome("synth-ehr", NEW_OUTCOME)
    holdout = "data.holdout=[" + ",".join(held_out) + "]"
    outcomes = runner.spec_of(runner.config([f"rounds={rounds}", holdout], CONFIG)).outcomes
    per_draw: list[R.Row] = []
    for seed in seeds:  # the data (and so the held-out sites) are the same for every seed
        base = [f"rounds={rounds}", holdout, f"seed={seed}"]
        if quick:  # four sites a round, and a one-step closing evaluation the benchmark does not use
            base += ["federation.fraction=0.25", "federation.min_nodes=4", "eval.adapt_steps=1"]
        per_draw += _run_seed(seed, base, n_draws=n_draws, ks=ks, held_out=held_out, keys=keys,
                              no_new=no_new, out_dir=out_dir)
    by = ("setting", "method", "metric", "outcome", "site", "k")
    per_site = R.aggregate_seeds(per_draw, by=by)
    # the mean over held-out hospitals, and its spread over training seeds (each seed's mean over
    # hospitals and draws), so that a difference between methods can be read against it
    by_seed = R.aggregate_seeds(per_draw, by=("setting", "method", "metric", "outcome", "k", "seed"))
    means: list[R.Row] = []
    for group in sorted({(r["setting"], r["method"], r["outcome"], r["k"]) for r in per_site}):
        vals = [r["value"] for r in per_site
                if (r["setting"], r["method"], r["outcome"], r["k"]) == group and r["value"] is not None]
        seed_means = [r["value"] for r in by_seed
                      if (r["setting"], r["method"], r["outcome"], r["k"]) == group and r["value"] is not None]
        means.append(R.row(BENCH, group[1], "auroc", float(np.mean(vals)) if vals else None, setting=group[0],
                           outcome=group[2], k=group[3], site="mean", n=len(seed_means),
                           std=float(np.std(seed_means)) if seed_means else None))
    result = per_site + means + [R.row(BENCH, "all", "runtime_s", timer(), site="mean", rounds=rounds,
                                       draws=n_draws)]
    _report(result, out_dir, ks, outcomes, quick=quick)
    R.save_rows(result, out_dir / f"{BENCH}.json")
    return result


def _run_seed(seed: int, base: list[str], *, n_draws: int, ks: tuple[int, ...], held_out: tuple[str, ...],
              keys: tuple[str, ...], no_new: str, out_dir: Path) -> list[R.Row]:
    """One training seed: every method trained in both settings, then each held-out hospital's
    K-shot AUROC per draw (the draws depend on the seed and are shared by every method)."""
    ref_cfg = runner.config(base, CONFIG)
    spec = runner.spec_of(ref_cfg)
    sites = runner.load_sites(ref_cfg, held_out)
    states: dict[tuple[str, str], tuple[ExperimentConfig, NDArrays]] = {}
    for key, _label, overrides in METHODS:
        if key not in keys:
            continue
        for setting, source in (("held-out hospitals", "synth-ehr"), ("held-out outcome", no_new)):
            if key == "fedavg" and setting == "held-out outcome":
                states[(key, setting)] = states[(key, "held-out hospitals")]  # trains on mortality only
                continue
            cfg = runner.config([*base, *overrides, f"data.source={source}"], CONFIG)
            _, state, _ = runner.run_federated(cfg, out_dir / "runs" / f"{key}-{source}-s{seed}")
            states[(key, setting)] = (cfg, state)
    local_cfg = runner.config([*base, "model.name=linear"], CONFIG)
    lmodel, ltheta0 = fitting.model_and_init(local_cfg, spec)
    per_draw: list[R.Row] = []
    for hi, (name, site) in enumerate(sites.items()):
        assert isinstance(site, TabularSite)
        for oi, outcome in enumerate(spec.outcomes):
            settings_here = ["held-out hospitals"] + (["held-out outcome"] if outcome == NEW_OUTCOME else [])
            x_tr, y_all = site.x_train, site.y_train[:, oi]
            x_te, y_te = fitting.test_rows(site, oi)
            for k in ks:
                picks = _draws(y_all, k, n_draws, np.random.default_rng([seed, hi, oi, k, 2029]))
                for d, idx in enumerate(picks):
                    xs, ys = x_tr[idx], y_all[idx]
                    local = fitting.fit(lmodel, ltheta0, xs, ys, steps=500, lr=0.1, proximal=1.0 / len(ys))
                    s_local = fitting.score(lmodel, local, x_te, y_te)
                    for setting in settings_here:
                        tag = {"k": k, "site": name, "outcome": outcome, "setting": setting, "seed": seed, "draw": d}
                        per_draw.append(R.row(BENCH, LOCAL, "auroc", s_local["auroc"], **tag))
                        for key, label, _ in METHODS:
                            if (key, setting) not in states:
                                continue
                            cfg, state = states[(key, setting)]
                            model = build_model_for(cfg, spec)
                            phi = fitting.adapt_state(model, state, xs, ys, steps=cfg.eval.adapt_steps,
                                                lr=cfg.eval.adapt_lr, proximal=cfg.eval.proximal,
                                                cfg=cfg)
                            per_draw.append(R.row(BENCH, label, "auroc", fitting.score(model, phi, x_te, y_te)["auroc"],
                                                  **tag))
    return per_draw


def _report(rows: list[R.Row], out_dir: Path, ks: tuple[int, ...], outcomes: tuple[str, ...], *,
            quick: bool) -> None:
    means = [r for r in rows if r.get("site") == "mean" and r.get("k") is not None]
    for k in ks:
        sub = [r for r in means if r["k"] == k and r["setting"] == "held-out hospitals"]
        R.emit(R.pivot_table(sub, metric="auroc", columns=list(outcomes), column_key="outcome",
                             title=f"Held-out hospitals, K = {k}: AUROC by outcome (mean of held-out hospitals; "
                                   "± std over training seeds)"),
               out_dir, BENCH)
    sub = [r for r in means if r["setting"] == "held-out outcome"]
    R.emit(R.pivot_table(sub, metric="auroc", columns=list(ks), column_key="k",
                         title=f"Held-out outcome ({NEW_OUTCOME}, never labelled in training) at held-out "
                               "hospitals: AUROC vs K (± std over training seeds)"), out_dir, BENCH)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for setting in ("held-out hospitals", "held-out outcome"):
        for m in dict.fromkeys(r["method"] for r in means):
            pts: dict[int, list[float]] = {}
            for r in means:
                if r["method"] == m and r["setting"] == setting and r["value"] is not None:
                    pts.setdefault(r["k"], []).append(r["value"])
            if pts:
                xs = sorted(pts)
                series[f"{m} [{setting}]"] = ([float(x) for x in xs], [float(np.mean(pts[x])) for x in xs])
    plots.plot_lines(series, out_dir / "ehr_auroc_vs_k.png", xlabel="K labelled patients", ylabel="AUROC",
                 title="Synthetic EHR consortium: new hospitals / new outcome" + (" [quick]" if quick else ""),
                 logx=True)
