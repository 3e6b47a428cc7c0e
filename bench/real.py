"""``fedmeta bench real``: fedmeta against a statistician's logistic regression on real cohorts.

For each real cohort (Fed-Heart-Disease and the cohorts of :mod:`fedmeta.bench.cohorts`, read
through ``site.yaml`` like any hospital's data), every method is scored by the same code
(:func:`fedmeta.sitecore.evaluate.score_risks`) on the same held-out rows: each hospital's own
test split, which no method and no choice saw.

Methods, per hospital: fedmeta's default (``auto``: chosen by the sites' validation log-loss),
the federated GLM as fitted (it equals pooled logistic regression) and after each site's
adaptation, Reptile (MLP 64-64, the previous default; and linear), FedAvg (MLP 64-64) with
adaptation, and scikit-learn's logistic regression (defaults: ``C = 1``) fitted on the pooled
training rows of every hospital and on each hospital's own.

A new hospital: leave one hospital out; the others run fedmeta's default; the new hospital adapts
the result on K of its labelled patients (drawn stratified, the same K for every method) and is
scored on its test split. Against: the others' pooled logistic regression as it is, and with its
intercept refitted on the same K patients. K = 10, 40 and all of its training rows.

Rows: ``{"benchmark": "real", "cohort", "method", "site", "metric", "value"[, "k"]}``; tables and
the list of wins and losses are printed and saved under ``out_dir``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fedmeta.bench.cohorts import COHORTS, write_cohort
from fedmeta.bench.rows import Row, emit, row
from fedmeta.bench.runner import quiet
from fedmeta.common.config import ExperimentConfig, load_config
from fedmeta.common.data.base import TabularSite
from fedmeta.common.data.registry import data_spec, load_site

METRICS = ("auroc", "loss", "brier", "calibration_slope")
#: fedmeta methods: label -> overrides; "glm" is reported twice (as fitted, and adapted)
METHODS: dict[str, list[str]] = {
    "fedmeta auto (default)": [],
    "federated GLM": ["algorithm=glm", "model.name=linear"],
    "fedmeta Reptile MLP 64-64": ["algorithm=reptile", "model.name=mlp", "model.hidden=[64, 64]"],
    "fedmeta Reptile linear": ["algorithm=reptile", "model.name=linear"],
    "FedAvg MLP 64-64 + adaptation": ["algorithm=fedavg", "model.name=mlp", "model.hidden=[64, 64]"],
}
POOLED, LOCAL = "sklearn pooled LR", "sklearn local LR"


def _data_overrides(cohort: str, data_root: Path) -> list[str]:
    if cohort == "fed-heart":
        return ["data.source=fed-heart"]
    return ["data.source=ehr", f"data.path={write_cohort(COHORTS[cohort], data_root)}"]


def _score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from fedmeta.sitecore.evaluate import score_risks

    s = score_risks(y.astype(np.int64), np.clip(p, 1e-7, 1 - 1e-7), threshold=0.5,
                    rng=np.random.default_rng(0), n_boot=0)
    return {m: float(s.values[m]) for m in METRICS}


def _lr(x: np.ndarray, y: np.ndarray) -> LogisticRegression | float:
    """scikit-learn's logistic regression with its defaults, or the prevalence when one class."""
    if len(set(y.tolist())) < 2:
        return float(y.mean())
    return LogisticRegression(max_iter=5000).fit(x.astype(np.float64), y)


def _proba(model: LogisticRegression | float, x: np.ndarray) -> np.ndarray:
    if isinstance(model, float):
        return np.full(len(x), model)
    return model.predict_proba(x.astype(np.float64))[:, 1]


def refit_intercept(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    """The intercept shift that maximises the likelihood of ``(x, y)`` with the slopes fixed
    (Newton's method in one variable; a one-class sample gets no shift)."""
    if len(set(y.tolist())) < 2:
        return 0.0
    z = model.decision_function(x.astype(np.float64))
    b = 0.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-(z + b)))
        step = np.sum(p - y) / max(np.sum(p * (1 - p)), 1e-12)
        b -= step
        if abs(step) < 1e-12:
            break
    return b


def _draw(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K patients drawn as a site draws them (:func:`fedmeta.sitecore.evaluate.draw_shots`:
    stratified, at random when its rows hold one class); all rows for K = 0."""
    from fedmeta.sitecore.evaluate import draw_shots

    return draw_shots(y, k, rng, "the outcome")[0] if 0 < k < len(y) else np.arange(len(y))


def _sites(cfg: ExperimentConfig) -> dict[str, TabularSite]:
    out = {}
    for name in data_spec(cfg.data).sites:
        site = load_site(cfg.data, name)
        assert isinstance(site, TabularSite)
        out[name] = site
    return out


def _federated(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    from fedmeta.cli.simulate import simulate

    return simulate(cfg, out, backend="local", progress=lambda _t: None)


def _mean(values: Sequence[float | None]) -> float:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(ok)) if ok else math.nan


def per_hospital(cohort: str, base: list[str], out_dir: Path) -> list[Row]:
    rows: list[Row] = []
    cfg = load_config(None, base)
    sites = _sites(cfg)
    x_all = np.vstack([s.x_train for s in sites.values()])
    y_all = np.concatenate([s.y_train[:, 0] for s in sites.values()])
    pooled = _lr(x_all, y_all)
    for name, s in sites.items():
        y_te = s.y_test[:, 0]
        for method, model in ((POOLED, pooled), (LOCAL, _lr(s.x_train, s.y_train[:, 0]))):
            for metric, value in _score(y_te, _proba(model, s.x_test)).items():
                rows.append(row("real", method, metric, value, cohort=cohort, site=name))
    for method, overrides in METHODS.items():
        t0 = time.monotonic()
        slug = "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-")
        summary = _federated(load_config(None, [*base, *overrides]), out_dir / "runs" / cohort / slug)
        phases = (("federated GLM (as fitted)", "before"), ("federated GLM + site adaptation", "after")) \
            if method == "federated GLM" else ((method, "after"),)
        for label, phase in phases:
            for name, result in summary["sites"].items():
                for metric in METRICS:
                    rows.append(row("real", label, metric, float(result[phase].get(metric, math.nan)),
                                    cohort=cohort, site=name))
        if "selection" in summary:
            sel = summary["selection"]
            rows.append(row("real", method, "chosen", None, cohort=cohort, site="*",
                            chosen=sel["chosen"], rounds=sel["rounds"], val_log_loss=sel["val_log_loss"]))
        rows.append(row("real", method, "wall_s", time.monotonic() - t0, cohort=cohort, site="*"))
    return rows


def new_hospital(cohort: str, base: list[str], out_dir: Path, *, shots: Sequence[int], draws: int) -> list[Row]:
    """Leave each hospital out in turn; it adapts fedmeta's default on K of its patients."""
    from safetensors.numpy import load_file

    from fedmeta.common import algorithms
    from fedmeta.common.config import config_from_dict
    from fedmeta.common.experiment import build_model_for
    from fedmeta.sitecore.evaluate import evaluate_outcome

    rows: list[Row] = []
    sites = _sites(load_config(None, base))
    for held, s in sites.items():
        others = [o for o in sites if o != held]
        folder = out_dir / "runs" / cohort / f"new-{held}"
        summary = _federated(load_config(None, [*base, f"data.holdout=[{json.dumps(held)}]",
                                                f"federation.min_nodes={min(2, len(others))}"]), folder)
        cfg = config_from_dict(json.loads((folder / "config.json").read_text()))
        spec = data_spec(cfg.data)
        model = build_model_for(cfg, spec)
        params = {k: torch.from_numpy(v.copy()) for k, v in load_file(str(folder / "final.safetensors")).items()}
        algorithm = algorithms.get(cfg.algorithm)
        x_o = np.vstack([sites[o].x_train for o in others])
        y_o = np.concatenate([sites[o].y_train[:, 0] for o in others])
        pooled = _lr(x_o, y_o)
        y_tr, y_te = s.y_train[:, 0], s.y_test[:, 0]
        for k in shots:
            n_draws = draws if 0 < k < len(y_tr) else 1
            scores: dict[str, list[dict[str, float]]] = {}
            for d in range(n_draws):
                rng = np.random.default_rng([17, d, k])
                idx = _draw(y_tr, k, rng)
                cfg_k = load_config(None, ["eval.shots=0", "eval.bootstrap=0"], base=cfg.to_dict())
                res = evaluate_outcome(cfg_k, model, params, None, algorithm=algorithm,
                                       x_tr=torch.from_numpy(s.x_train[idx]), y_tr=y_tr[idx],
                                       x_te=torch.from_numpy(s.x_test), y_te=y_te, outcome=cohort, rng=rng)
                scores.setdefault("fedmeta auto (default) + adaptation", []).append(
                    {m: float(res.after.values[m]) for m in METRICS})
                p = _proba(pooled, s.x_test)
                scores.setdefault("others' pooled LR", []).append(_score(y_te, p))
                if isinstance(pooled, LogisticRegression):
                    b = refit_intercept(pooled, s.x_train[idx], y_tr[idx])
                    z = pooled.decision_function(s.x_test.astype(np.float64)) + b
                    scores.setdefault("others' pooled LR + refitted intercept", []).append(
                        _score(y_te, 1 / (1 + np.exp(-z))))
                scores.setdefault("new hospital's own LR", []).append(
                    _score(y_te, _proba(_lr(s.x_train[idx], y_tr[idx]), s.x_test)))
            label_k = k if 0 < k < len(y_tr) else "all"
            for method, draws_scores in scores.items():
                for metric in METRICS:
                    rows.append(row("real-new", method, metric, _mean([d[metric] for d in draws_scores]),
                                    cohort=cohort, site=held, k=label_k, chosen=summary.get("selection", {}).get("chosen")))
    return rows


def _table(rows: Sequence[Row], cohort: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["cohort"] == cohort and r["benchmark"] == "real"
                                 and r["metric"] in METRICS))
    sites = list(dict.fromkeys(r["site"] for r in rows if r["cohort"] == cohort and r["site"] != "*"
                               and r["benchmark"] == "real"))
    lines = [f"**{cohort}: mean over hospitals of each hospital's held-out rows** "
             f"(AUROC per hospital: {', '.join(sites)})", "",
             "| method | AUROC | log-loss | Brier | calibration slope | AUROC per hospital |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        def values(metric: str, m: str = m) -> list[float]:
            return [r["value"] for r in rows if r["cohort"] == cohort and r["method"] == m
                    and r["metric"] == metric and r["benchmark"] == "real"]
        per_site = " / ".join(f"{v:.3f}" for v in values("auroc"))
        lines.append(f"| {m} | {_mean(values('auroc')):.3f} | {_mean(values('loss')):.3f} | "
                     f"{_mean(values('brier')):.3f} | {_mean(values('calibration_slope')):.2f} | {per_site} |")
    chosen = [r for r in rows if r["cohort"] == cohort and r["metric"] == "chosen"]
    if chosen:
        lines += ["", f"`auto` chose {chosen[0]['chosen']} ({chosen[0]['rounds']} rounds, validation "
                      f"log-loss {chosen[0]['val_log_loss']:.4f})."]
    return "\n".join(lines)


def _new_table(rows: Sequence[Row], cohort: str) -> str:
    sub = [r for r in rows if r["benchmark"] == "real-new" and r["cohort"] == cohort]
    if not sub:
        return ""
    ks = list(dict.fromkeys(r["k"] for r in sub))
    methods = list(dict.fromkeys(r["method"] for r in sub))
    lines = [f"**{cohort}: a new hospital with K labelled patients (mean over hospitals left out; AUROC / log-loss)**",
             "", "| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m in methods:
        cells = []
        for k in ks:
            a = _mean([r["value"] for r in sub if r["method"] == m and r["k"] == k and r["metric"] == "auroc"])
            ll = _mean([r["value"] for r in sub if r["method"] == m and r["k"] == k and r["metric"] == "loss"])
            cells.append(f"{a:.3f} / {ll:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: Sequence[Row], cohorts: Sequence[str]) -> str:
    """The targets, met or not, per cohort (fedmeta's default against pooled logistic regression)."""
    lines = ["**Targets: fedmeta's default against scikit-learn's pooled logistic regression**", ""]
    for c in cohorts:
        def m(method: str, metric: str, c: str = c) -> float:
            return _mean([r["value"] for r in rows if r["benchmark"] == "real" and r["cohort"] == c
                          and r["method"] == method and r["metric"] == metric])
        auto, pooled = "fedmeta auto (default)", POOLED
        a, pa = m(auto, "auroc"), m(pooled, "auroc")
        ll, pll = m(auto, "loss"), m(pooled, "loss")
        slope = m(auto, "calibration_slope")
        lines.append(f"- {c}: AUROC {a:.3f} vs {pa:.3f} ({'met' if a >= pa - 0.005 else 'NOT met'}, "
                     f"{a - pa:+.3f}); log-loss {ll:.3f} vs {pll:.3f} ({'met' if ll <= pll + 0.005 else 'NOT met'}, "
                     f"{ll - pll:+.3f}); calibration slope {slope:.2f} "
                     f"({'met' if 0.8 <= slope <= 1.2 else 'NOT met'})")
        new = [r for r in rows if r["benchmark"] == "real-new" and r["cohort"] == c]
        for k in dict.fromkeys(r["k"] for r in new):
            def n(method: str, metric: str, k: Any = k, new: list[Row] = new) -> float:
                return _mean([r["value"] for r in new if r["method"] == method and r["k"] == k and r["metric"] == metric])
            fa, oa = n("fedmeta auto (default) + adaptation", "auroc"), n("others' pooled LR", "auroc")
            fl, rl = n("fedmeta auto (default) + adaptation", "loss"), n("others' pooled LR + refitted intercept", "loss")
            lines.append(f"  - new hospital, K = {k}: AUROC {fa:.3f} vs others' pooled {oa:.3f} "
                         f"({'met' if fa >= oa else 'NOT met'}); log-loss {fl:.3f} vs refitted-intercept "
                         f"{rl:.3f} ({'met' if fl <= rl else 'NOT met'})")
    return "\n".join(lines)


def run(*, quick: bool, out_dir: Path) -> list[Row]:
    quiet()
    cohorts = ["fed-heart", "gbsg2"] if quick else ["fed-heart", "actg175", "gbsg2", "flchain"]
    shots: Sequence[int] = (10,) if quick else (10, 40, 0)
    fast = ["eval.bootstrap=0"] + (["rounds=3", "selection.every=3", "eval.repeats=1",
                                    "selection.candidates=[glm, reptile-linear]"] if quick else [])
    rows: list[Row] = []
    t0 = time.monotonic()
    for cohort in cohorts:
        base = [*_data_overrides(cohort, out_dir / "data"), *fast]
        rows += per_hospital(cohort, base, out_dir)
        rows += new_hospital(cohort, base, out_dir, shots=shots, draws=2 if quick else 10)
        emit(_table(rows, cohort) + "\n\n" + _new_table(rows, cohort), out_dir, f"real_{cohort}")
    emit(verdicts(rows, cohorts), out_dir, "real_targets")
    rows.append(row("real", "*", "wall_s", time.monotonic() - t0, cohort="*", site="*"))
    return rows
