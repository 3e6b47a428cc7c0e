"""Benchmark 1: Fed-Heart-Disease under FLamby's protocol, every hospital scored on its own test split.

Protocol (FLamby, du Terrail et al. 2022, ``fed_heart_disease``): the four UCI hospitals prepared
as in :mod:`fedmeta.common.data.heart`, train fraction 0.66 with ``random_state=43``, accuracy at
0.5 on each hospital's test split, averaged unweighted over the hospitals, 5 training seeds.

Methods, all in the same harness and from the same θ₀ per seed:

- ``pooled``: one model trained centrally on the union of the training splits (the upper bound
  FLamby reports for a single global model);
- ``local``: one model per hospital, trained on its own training split only;
- ``FedAvg`` (McMahan et al. 2017) and ``FedAvg + fine-tuning`` (the same global model adapted
  with ``eval.adapt_steps`` local steps, as FLamby's "100 local fine-tuning steps");
- ``FedYogi`` (Reddi et al. 2021): FedAvg clients, Yogi on the server, and its fine-tuned variant;
- fedmeta's ``Reptile`` (Nichol et al. 2018), ``FOMAML`` and ``MAML`` (Finn et al. 2017) and
  ``Meta-SGD`` (Li et al. 2017), each followed by local adaptation on the hospital's training split.

FLamby's published figures (one global model, mean of 5 seeds) are added as reference rows
``flamby-published:*`` (they were measured on FLamby's own pipeline, not re-run here).

Hyperparameters: the settings in :data:`BASE` and each method's ``overrides`` are fixed a priori;
where a method lists ``candidates``, :func:`fedmeta.bench.runner.select` picks one on a validation
split carved from the hospitals' *training* splits (seed 0), before any test split is scored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedmeta.bench import fitting, plots, runner, sources
from fedmeta.bench import rows as R
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.heart import HOSPITALS
from fedmeta.common.experiment import site_rng
from fedmeta.common.params import NDArrays
from fedmeta.sitecore.evaluate import evaluate_site

log = logging.getLogger(__name__)

BENCH = "flamby"
#: FLamby's published Fed-Heart-Disease accuracies (mean of 5 seeds, one global model scored on
#: every hospital's test split; du Terrail et al. 2022, Table/figure for Fed-Heart-Disease).
PUBLISHED: dict[str, float] = {
    "Pooled": 0.735, "FedYogi": 0.731, "FedAdagrad": 0.731, "FedAdam": 0.726, "Cyclic": 0.718,
    "FedAvg": 0.685, "FedProx": 0.685, "Scaffold": 0.684, "best single hospital": 0.722,
    "FedAvg + 100 fine-tuning steps": 0.735,
}
#: fedmeta's goal on Fed-Heart-Disease: mean test accuracy over the four hospitals of its best
#: method. Its anchors are the rows above (the best published federated method, FedYogi, 0.731;
#: pooled training 0.735) and what the data allow (BENCHMARKS.md, "Bounds": per-hospital
#: recalibrated pooled logistic regression); a result below it is printed as NOT met.
TARGET = 0.85

#: Fixed a priori for every federated method: logistic regression (FLamby's model), 30 rounds,
#: all four hospitals every round, local adaptation of 100 full-batch steps of 0.05.
BASE: tuple[str, ...] = (
    "data.source=fed-heart", "model.name=linear", "federation.min_nodes=4", "eval.adapt_steps=100",
    "eval.adapt_lr=0.05",
)
#: Benchmark 1 adapts as the product does by default: the adaptation policy
#: (:func:`fedmeta.common.adaptation.adapt_with_policy`: none, intercept, last layer or every
#: parameter for up to ``eval.adapt_steps`` steps, chosen by cross-validated log-loss on the
#: hospital's own training rows, then recalibrated). The first published table used exactly 100
#: steps: add ``eval.adaptation=fixed`` to reproduce it.
FIXED_STEPS: tuple[str, ...] = ()
#: Candidates chosen on validation: the network (logistic regression, or an MLP 13-64-64-2) and,
#: for the meta-learners, the adaptation's pull λ toward the global model.
MODELS = (("model.name=linear",), ("model.name=mlp",))
PROX = tuple((*m, p) for m in MODELS for p in ("eval.proximal=0.0", "eval.proximal=0.1"))

_YOGI = ("algorithm=fedavg", "outer.optimizer=yogi", "outer.beta2=0.99", "outer.eps=0.001")
_YOGI_LR = tuple((*m, f"outer.lr={lr}") for m in MODELS for lr in (0.01, 0.03, 0.1))
METHODS: tuple[runner.FedMethod, ...] = (
    runner.FedMethod("fedavg", ("algorithm=fedavg",), "FedAvg", "before", MODELS),
    runner.FedMethod("fedavg-ft", ("algorithm=fedavg",), "FedAvg + fine-tuning", "after", PROX),
    runner.FedMethod("fedyogi", _YOGI, "FedYogi", "before", _YOGI_LR),
    runner.FedMethod("fedyogi-ft", _YOGI, "FedYogi + fine-tuning", "after",
                tuple((*c, p) for c in _YOGI_LR for p in ("eval.proximal=0.0", "eval.proximal=0.1"))),
    runner.FedMethod("reptile", ("algorithm=reptile",), "fedmeta Reptile + adaptation", "after", PROX),
    runner.FedMethod("fomaml", ("algorithm=fomaml",), "fedmeta FOMAML + adaptation", "after", PROX),
    runner.FedMethod("maml", ("algorithm=maml",), "fedmeta MAML + adaptation", "after", PROX),
    runner.FedMethod("metasgd", ("algorithm=metasgd",), "fedmeta Meta-SGD + adaptation", "after", MODELS),
)
#: Centralised references: full-batch gradient descent, fixed a priori (convex problem; 500
#: steps of 0.1 reach a plateau of the training loss on every hospital).
CENTRAL_STEPS, CENTRAL_LR, CENTRAL_L2 = 500, 0.1, 1e-3


#: The smoke test's subset of methods (2 rounds, 1 seed, at most 2 candidates each).
QUICK_METHODS = ("fedavg", "fedavg-ft", "reptile", "metasgd")


def settings(quick: bool) -> tuple[list[int], int]:
    """(seeds, rounds): 5 seeds x 30 rounds, or 1 seed x 2 rounds for the smoke test."""
    return ([0], 2) if quick else ([0, 1, 2, 3, 4], 30)


def central_rows(seed: int, *, benchmark: str = BENCH) -> list[R.Row]:
    """Pooled and per-hospital (local) logistic regression, scored on every hospital's test split."""
    cfg = runner.config([*BASE, f"seed={seed}"])
    spec = runner.spec_of(cfg)
    model, theta0 = fitting.model_and_init(cfg, spec)
    sites = runner.load_sites(cfg, HOSPITALS)
    x_all = np.concatenate([fitting.training_rows(s)[0] for s in sites.values()])
    y_all = np.concatenate([fitting.training_rows(s)[1] for s in sites.values()])
    pooled = fitting.fit(model, theta0, x_all, y_all, steps=CENTRAL_STEPS, lr=CENTRAL_LR, proximal=CENTRAL_L2)
    rows: list[R.Row] = []
    per: dict[str, dict[str, list[float]]] = {"pooled": {"accuracy": [], "auroc": []},
                                              "local": {"accuracy": [], "auroc": []}}
    for name, site in sites.items():
        x_te, y_te = fitting.test_rows(site)
        own = fitting.fit(model, theta0, *fitting.training_rows(site), steps=CENTRAL_STEPS, lr=CENTRAL_LR,
                    proximal=CENTRAL_L2)
        for method, params in (("pooled", pooled), ("local", own)):
            s = fitting.score(model, params, x_te, y_te)
            for m in ("accuracy", "auroc"):
                rows.append(R.row(benchmark, method, m, s[m], site=name, seed=seed))
                per[method][m].append(s[m])
    for method, metrics in per.items():
        for m, values in metrics.items():
            rows.append(R.row(benchmark, method, m, float(np.nanmean(values)), site="mean", seed=seed))
    return rows


def curve_fn(cfg: ExperimentConfig, sites: dict) -> runner.CurveFn:
    """Per-round mean test accuracy before and after adaptation (for the learning curves)."""
    spec = runner.spec_of(cfg)

    def fn(rnd: int, state: NDArrays) -> dict[str, float]:
        res = [evaluate_site(cfg, spec, s, state, rng=site_rng(cfg, n, rnd, "curve")) for n, s in sites.items()]
        return {f"{phase}_accuracy": float(np.mean([r[phase]["accuracy"] for r in res]))  # type: ignore[index]
                for phase in ("before", "after")}

    return fn


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    """Run benchmark 1 and save ``flamby.json``-style rows, tables and plots under ``out_dir``."""
    runner.quiet()
    sources.register_validation_sources("fed-heart")
    seeds, rounds = settings(quick)
    timer = R.Timer()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    rows: list[R.Row] = []
    chosen: dict[str, tuple[str, ...]] = {}
    methods = [m for m in METHODS if not quick or m.key in QUICK_METHODS]
    for method in methods:
        cand, sel_rows = runner.select(method, [*BASE, *FIXED_STEPS, f"rounds={rounds}"], val_source="fed-heart-val",
                                  out_dir=out_dir / "runs", benchmark=BENCH, limit=2 if quick else None)
        chosen[method.key] = cand
        rows += sel_rows
    curves: dict[str, list[dict]] = {}
    for seed in seeds:
        rows += central_rows(seed)
        for method in methods:
            cfg = runner.config([*BASE, *FIXED_STEPS, *method.overrides, *chosen[method.key], f"rounds={rounds}",
                            f"seed={seed}"])
            fn = curve_fn(cfg, runner.load_sites(cfg, HOSPITALS)) if seed == seeds[0] else None
            summary, _, log_rounds = runner.run_federated(cfg, out_dir / "runs" / f"{method.key}-s{seed}", curve=fn)
            if fn is not None:
                curves[method.key] = log_rounds
            rows += R.summary_rows(summary, benchmark=BENCH, method=method.label, phase=method.phase, seed=seed)
    table = R.aggregate_seeds([r for r in rows if r["metric"] != "val_accuracy"])
    for name, value in PUBLISHED.items():
        table.append(R.row(BENCH, f"flamby-published:{name}", "accuracy", value, site="mean", n=5, std=None))
    sel = [r for r in rows if r["metric"] == "val_accuracy"]
    result = table + sel + [R.row(BENCH, "all", "runtime_s", timer(), site="mean",
                                  seeds=len(seeds), rounds=rounds)]
    _report(result, curves, out_dir, chosen, quick=quick)
    R.save_rows(result, out_dir / f"{BENCH}.json")
    return result


def _report(rows: list[R.Row], curves: dict[str, list[dict]], out_dir: Path,
            chosen: dict[str, tuple[str, ...]], *, quick: bool) -> None:
    cols = [*HOSPITALS, "mean"]
    R.emit(R.pivot_table(rows, metric="accuracy", columns=cols,
                         title="Fed-Heart-Disease: accuracy on each hospital's test split (mean ± std over seeds)"),
           out_dir, BENCH)
    R.emit(R.pivot_table([r for r in rows if not r["method"].startswith("flamby-published")], metric="auroc",
                         columns=cols, title="Fed-Heart-Disease: AUROC"), out_dir, BENCH)
    R.emit("Chosen on validation: " + "; ".join(f"{k}: {' '.join(v) or '(fixed)'}" for k, v in chosen.items()),
           out_dir, BENCH)
    means = {r["method"]: r for r in rows if r["metric"] == "accuracy" and r.get("site") == "mean"}
    best = max((r for m, r in means.items() if m.startswith("fedmeta")), key=lambda r: r["value"] or 0.0)
    R.emit(f"Best fedmeta method: {best['method']} {best['value']:.3f} (target {TARGET}: "
           f"{'met' if best['value'] >= TARGET else 'NOT met'})", out_dir, BENCH)
    plots.plot_bars({m: r["value"] for m, r in means.items() if r["value"] is not None},
                out_dir / "flamby_accuracy.png", ylabel="mean accuracy over 4 hospitals",
                title="Fed-Heart-Disease (FLamby protocol)" + (" [quick]" if quick else ""),
                errors={m: r.get("std") or 0.0 for m, r in means.items()}, hline=TARGET)
    series = {}
    labels = {m.key: (m.label, m.phase) for m in METHODS}
    for key, log_rounds in curves.items():
        label, phase = labels[key]
        pts = [(r["round"], r[f"{phase}_accuracy"]) for r in log_rounds if f"{phase}_accuracy" in r]
        series[label] = ([p[0] for p in pts], [p[1] for p in pts])
    plots.plot_lines(series, out_dir / "flamby_learning_curves.png", xlabel="round",
                 ylabel="mean test accuracy (4 hospitals)", title="Learning curves, seed 0")
