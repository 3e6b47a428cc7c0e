"""How high the Fed-Heart-Disease targets can go: bounds computed with the test split's help.

Not a method and never used to choose anything: these rows answer "what would a model of this
family score if it were allowed to look at the test labels?", to put benchmarks 1 and 2's targets
(0.85 and 0.83) next to what the data supports. Logistic regression (scikit-learn, lbfgs), on the
same prepared splits as the benchmarks:

- ``others' LR + intercept on all training patients``: the pooled model of the other three
  hospitals with its intercept refitted (maximum likelihood) on **every** training patient of the
  held-out hospital: benchmark 2's best reference with K = all instead of K = 10, no test labels;
- ``others' LR + test-chosen intercept (oracle)``: the same model with the intercept that
  maximises the held-out hospital's test accuracy;
- ``per-hospital LR, L2 chosen on the test split (oracle)``: benchmark 1's per-hospital model with
  the regularisation strength C (from a grid) that maximises each hospital's test accuracy.

A hospital whose training split holds one class (Switzerland: 30 positives) predicts that class.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from fedmeta.bench import fitting, plots, runner
from fedmeta.bench import rows as R
from fedmeta.common.data.heart import HOSPITALS

log = logging.getLogger(__name__)

BENCH = "ceiling"
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
OFFSETS = np.linspace(-8.0, 8.0, 1601)  # intercept shifts searched by the oracle


def _fit_intercept(z: np.ndarray, y: np.ndarray, b: float) -> float:
    """Maximum-likelihood intercept for fixed scores ``z`` (Newton's method, 1-D)."""
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(z + b)))
        step = (p - y).sum() / max((p * (1 - p)).sum(), 1e-9)
        b -= step
        if abs(step) < 1e-10:
            break
    return b


def _lr(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float] | None:
    if len(np.unique(y)) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=c, max_iter=10_000).fit(x, y)
    return m.coef_[0], float(m.intercept_[0])


def _accuracy(x: np.ndarray, y: np.ndarray, model: tuple[np.ndarray, float] | None, fallback: int) -> float:
    pred = np.full(len(y), fallback) if model is None else (x @ model[0] + model[1] > 0).astype(int)
    return float((pred == y).mean())


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    """Compute the bounds (seconds; ``quick`` is the same computation)."""
    del quick
    runner.quiet()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    cfg = runner.config(["data.source=fed-heart"])
    sites = runner.load_sites(cfg, HOSPITALS)
    rows: list[R.Row] = []
    per: dict[str, list[float]] = {}

    def add(method: str, site: str, value: float, **extra: object) -> None:
        rows.append(R.row(BENCH, method, "accuracy", value, site=site, **extra))
        per.setdefault(method, []).append(value)

    for held in HOSPITALS:
        others = [s for n, s in sites.items() if n != held]
        x_o = np.concatenate([fitting.training_rows(s)[0] for s in others])
        y_o = np.concatenate([fitting.training_rows(s)[1] for s in others])
        w, b0 = _lr(x_o, y_o, 1.0) or (np.zeros(x_o.shape[1]), 0.0)
        x_tr, y_tr = fitting.training_rows(sites[held])
        x_te, y_te = fitting.test_rows(sites[held])
        majority = int(np.round(y_tr.mean()))
        add("others' LR, unadapted", held, _accuracy(x_te, y_te, (w, b0), majority))
        b_all = _fit_intercept(x_tr @ w, y_tr.astype(float), b0)
        add("others' LR + intercept on all training patients", held, _accuracy(x_te, y_te, (w, b_all), majority),
            patients=int(len(y_tr)))
        oracle = max(_accuracy(x_te, y_te, (w, b0 + off), majority) for off in OFFSETS)
        add("others' LR + test-chosen intercept (oracle)", held, oracle)
        by_c = {c: _accuracy(x_te, y_te, _lr(x_tr, y_tr, c), majority) for c in C_GRID}
        add("per-hospital LR, C = 1", held, by_c[1.0])
        best_c = max(by_c, key=lambda c: by_c[c])
        add("per-hospital LR, L2 chosen on the test split (oracle)", held, by_c[best_c], c=best_c)
    for method, values in per.items():
        rows.append(R.row(BENCH, method, "accuracy", float(np.mean(values)), site="mean"))
    R.emit(R.pivot_table(rows, metric="accuracy", columns=[*HOSPITALS, "mean"],
                         title="Fed-Heart-Disease: bounds with the test split's help (not methods), accuracy"),
           out_dir, BENCH)
    plots.plot_bars({r["method"]: r["value"] for r in rows if r["site"] == "mean"}, out_dir / "ceiling.png",
                ylabel="mean accuracy over 4 hospitals", title="Bounds (logistic regression)")
    R.save_rows(rows, out_dir / f"{BENCH}.json")
    return rows
