"""Clinical metrics of one outcome at one site, each with a bootstrap 95 % interval and its n.

:func:`clinical_metrics` reports, for labels ``y`` and predicted risks ``p`` at a decision
threshold ``t`` (flag when ``p ≥ t``):

- ``n``, ``events``, ``non_events``; ``prevalence`` with Wilson's score interval (Wilson 1927);
- discrimination: AUROC and AUPRC (average precision), :mod:`sklearn.metrics`;
- overall accuracy of the risks: Brier score ``(1/n) Σ (p − y)²`` and log-loss;
- calibration (:mod:`.calibration`): intercept (slope fixed at 1), slope of
  ``logit P(y=1) = a + b·logit(p)`` (Van Calster et al. 2019) and the expected calibration error;
- at the threshold: sensitivity, specificity, PPV, NPV and accuracy
  (:class:`fedmeta.common.metrics.BinaryCounts`).

Each metric comes as ``{"value", "lo", "hi", "undefined", "basis"}``: the point value, a
percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) from ``n_boot`` **stratified**
resamples (events and non-events resampled separately with replacement, so every resample keeps
the site's class counts), the number of resamples on which the metric was undefined (skipped,
e.g. a PPV with no flagged patient or a calibration slope of separated classes), and the number
of patients the metric rests on (events for sensitivity, flagged patients for PPV, …).
``warnings`` names every number that rests on fewer than ``min_events`` (10) patients of the
class it needs, and single-class splits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from fedmeta.common.clinical.calibration import (
    calibration_intercept_slope,
    expected_calibration_error,
    logit,
    newton_fits,
    reliability_curve,
)
from fedmeta.common.metrics import EPS, BinaryCounts

MIN_EVENTS = 10
#: Metrics in the order reports print them.
METRICS: tuple[str, ...] = (
    "auroc", "auprc", "brier", "log_loss", "calibration_intercept", "calibration_slope", "ece",
    "sensitivity", "specificity", "ppv", "npv", "accuracy",
)
_RANKING = ("auroc", "auprc", "calibration_intercept", "calibration_slope")


def wilson_interval(k: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``k/n``:
    ``(p̂ + z²/2n ± z √(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def point_metrics(y: np.ndarray, p: np.ndarray, *, threshold: float, n_bins: int = 10) -> dict[str, float]:
    """Every metric of :data:`METRICS` on ``(y, p)``, NaN where undefined."""
    c = BinaryCounts.from_predictions(y, p, threshold=threshold)
    both = 0 < c.events < c.n
    cal_a, cal_b = calibration_intercept_slope(y, p) if both else (math.nan, math.nan)
    return {
        "auroc": float(roc_auc_score(y, p)) if both else math.nan,
        "auprc": float(average_precision_score(y, p)) if both else math.nan,
        "brier": c.brier,
        "log_loss": c.log_loss,
        "calibration_intercept": cal_a,
        "calibration_slope": cal_b,
        "ece": expected_calibration_error(y, p, n_bins=n_bins),
        "sensitivity": c.sensitivity,
        "specificity": c.specificity,
        "ppv": c.ppv,
        "npv": c.npv,
        "accuracy": c.accuracy,
    }


def stratified_resample_counts(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` multiplicities of a stratified bootstrap: in each resample the events are
    drawn with replacement from the events and the non-events from the non-events."""
    labels = np.asarray(y).reshape(-1)
    counts = np.zeros((n_boot, labels.size), dtype=np.float64)
    for c in (0, 1):
        g = np.flatnonzero(labels == c)
        if g.size and n_boot:
            idx = g[rng.integers(0, g.size, size=(n_boot, g.size))]
            np.add.at(counts, (np.repeat(np.arange(n_boot), g.size), idx.ravel()), 1.0)
    return counts


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def bootstrap_metrics(y: np.ndarray, p: np.ndarray, counts: np.ndarray, *, threshold: float,
                      n_bins: int = 10, start: tuple[float, float] = (0.0, 1.0)) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` on each resample given as multiplicities ``counts``
    ``(B, n)`` — the same values :func:`point_metrics` gives on the materialised resample, but
    as weighted sums, so a thousand resamples cost a few matrix products:

    - threshold counts, Brier, log-loss and the reliability bins: ``counts @ indicator``;
    - AUROC: ``Σ_i c_i (#{neg < s_i} + ½ #{neg = s_i}) / (n₊ n₋)`` from cumulative
      multiplicities of the sorted negatives (Mann–Whitney);
    - AUPRC: average precision ``Σ_k (R_k − R_{k−1}) P_k`` over distinct thresholds, descending,
      from cumulative multiplicities (scikit-learn's definition);
    - calibration intercept and slope: weighted Newton fits started at ``start``.
    """
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    risk = np.asarray(p, dtype=np.float64).reshape(-1)
    w = np.asarray(counts, dtype=np.float64)
    yb = labels.astype(bool)
    pred = risk >= threshold
    n = w.sum(axis=1)
    tp, fp = w @ (pred & yb), w @ (pred & ~yb)
    tn, fn = w @ (~pred & ~yb), w @ (~pred & yb)
    events, non_events = tp + fn, tn + fp
    clipped = np.clip(risk, EPS, 1 - EPS)
    row_ll = -np.where(yb, np.log(clipped), np.log(1 - clipped))
    out: dict[str, np.ndarray] = {
        "brier": _ratio(w @ (risk - labels) ** 2, n), "log_loss": _ratio(w @ row_ll, n),
        "sensitivity": _ratio(tp, events), "specificity": _ratio(tn, non_events),
        "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "accuracy": _ratio(tp + tn, n),
    }
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, risk, side="right") - 1, 0, n_bins - 1)
    onehot = np.eye(n_bins)[bins]
    gaps = np.abs(w @ (onehot * labels[:, None]) - w @ (onehot * risk[:, None])).sum(axis=1)
    out["ece"] = _ratio(gaps, n)
    both = (events > 0) & (non_events > 0)
    pos, neg = np.flatnonzero(yb), np.flatnonzero(~yb)
    auroc = np.full(len(w), np.nan)
    if pos.size and neg.size:
        order = np.argsort(risk[neg], kind="stable")
        sorted_neg = risk[neg][order]
        cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w[:, neg][:, order], axis=1)], axis=1)
        lo = np.searchsorted(sorted_neg, risk[pos], side="left")
        hi = np.searchsorted(sorted_neg, risk[pos], side="right")
        wins = (w[:, pos] * (cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo]))).sum(axis=1)
        auroc = np.where(both, _ratio(wins, events * non_events), np.nan)
    out["auroc"] = auroc
    desc = np.argsort(-risk, kind="stable")
    ends = np.flatnonzero(np.append(np.diff(risk[desc]) != 0, True))
    tps = np.cumsum(w[:, desc] * yb[desc], axis=1)[:, ends]
    fps = np.cumsum(w[:, desc] * ~yb[desc], axis=1)[:, ends]
    recall = _ratio(tps, events[:, None])
    precision = np.where(tps + fps > 0, _ratio(tps, tps + fps), 0.0)
    gain = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
    out["auprc"] = np.where(both, (gain * precision).sum(axis=1), np.nan)
    z = logit(risk)
    yf = labels.astype(np.float64)
    a_ci, _, ok_a = newton_fits(z, yf, w, slope=False, a0=start[0])
    _, slope, ok_b = newton_fits(z, yf, w, slope=True, b0=start[1])
    out["calibration_intercept"] = np.where(both & ok_a, a_ci, np.nan)
    out["calibration_slope"] = np.where(both & ok_b, slope, np.nan)
    return out


def _basis(c: BinaryCounts) -> dict[str, int]:
    """How many patients of the class each metric needs stand behind it."""
    pair = min(c.events, c.n - c.events)
    return {
        "auroc": pair, "auprc": pair, "calibration_intercept": pair, "calibration_slope": pair,
        "brier": c.events, "log_loss": c.events, "ece": c.events, "accuracy": c.events,
        "sensitivity": c.events, "specificity": c.n - c.events,
        "ppv": c.tp + c.fp, "npv": c.tn + c.fn,
    }


def clinical_metrics(
    y: np.ndarray,
    p: np.ndarray,
    *,
    threshold: float,
    rng: np.random.Generator,
    n_boot: int = 1000,
    level: float = 0.95,
    n_bins: int = 10,
    min_events: int = MIN_EVENTS,
) -> dict[str, Any]:
    """Clinical metrics of binary labels ``y`` and risks ``p`` at ``threshold`` (module docstring).

    >>> import numpy as np
    >>> m = clinical_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.5,
    ...                      rng=np.random.default_rng(0), n_boot=0)
    >>> m["n"], m["events"], m["auroc"]["value"], m["sensitivity"]["value"]
    (4, 2, 0.75, 0.5)
    """
    labels = np.asarray(y).reshape(-1)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    labels = labels.astype(np.int64)
    risk = np.asarray(p, dtype=np.float64).reshape(-1)
    if labels.shape != risk.shape:
        raise ValueError(f"labels {labels.shape} and risks {risk.shape} differ in shape")
    if labels.size == 0:
        raise ValueError("clinical_metrics needs at least one labelled patient")
    if not np.isfinite(risk).all() or risk.min() < 0 or risk.max() > 1:
        raise ValueError("risks must be finite and in [0, 1]")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    counts = BinaryCounts.from_predictions(labels, risk, threshold=threshold)
    point = point_metrics(labels, risk, threshold=threshold, n_bins=n_bins)
    counts_b = stratified_resample_counts(labels, n_boot, rng)
    a0, b0 = point["calibration_intercept"], point["calibration_slope"]
    start = (a0 if math.isfinite(a0) else 0.0, b0 if math.isfinite(b0) else 1.0)
    boots = bootstrap_metrics(labels, risk, counts_b, threshold=threshold, n_bins=n_bins, start=start)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    basis = _basis(counts)
    out: dict[str, Any] = {
        "n": counts.n, "events": counts.events, "non_events": counts.n - counts.events,
        "threshold": float(threshold), "n_boot": n_boot, "level": level,
    }
    pl, ph = wilson_interval(counts.events, counts.n, level=level)
    out["prevalence"] = {"value": counts.prevalence, "lo": pl, "hi": ph, "undefined": 0,
                         "basis": counts.n}
    for m in METRICS:
        vals = boots[m][np.isfinite(boots[m])]
        lo, hi = (float(np.percentile(vals, lo_q)), float(np.percentile(vals, hi_q))) if vals.size else (math.nan, math.nan)
        if not math.isfinite(point[m]):
            lo = hi = math.nan
        out[m] = {"value": point[m], "lo": lo, "hi": hi, "undefined": int(n_boot - vals.size),
                  "basis": basis[m]}
    out["reliability"] = reliability_curve(labels, risk, n_bins=n_bins).to_dict()
    out["warnings"] = _warnings(counts, basis, min_events)
    return out


def _warnings(c: BinaryCounts, basis: Mapping[str, int], min_events: int) -> list[str]:
    w: list[str] = []
    if c.events in (0, c.n):
        cls = "events" if c.events == c.n else "non-events"
        w.append(f"single class: all {c.n} patients are {cls}; AUROC, AUPRC and calibration are "
                 "undefined")
        return w
    if c.events < min_events:
        w.append(f"only {c.events} events (< {min_events}) behind AUROC, AUPRC, calibration, Brier "
                 "score, log-loss, accuracy and sensitivity: treat them as unreliable")
    if c.n - c.events < min_events:
        w.append(f"only {c.n - c.events} non-events (< {min_events}) behind AUROC, AUPRC, calibration "
                 "and specificity: treat them as unreliable")
    for m, what in (("ppv", "flagged patients"), ("npv", "unflagged patients")):
        if basis[m] < min_events:
            w.append(f"only {basis[m]} {what} (< {min_events}) behind {m.upper()}")
    return w


def outcome_metrics(
    y: np.ndarray,
    p: np.ndarray,
    outcomes: Sequence[str],
    *,
    thresholds: Mapping[str, float] | float,
    rng: np.random.Generator,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """:func:`clinical_metrics` for **every** outcome of a multi-outcome site.

    ``y`` ``(n, O)`` with ``-1`` for an unknown label (each outcome is scored on its labelled
    rows only), ``p`` ``(n, O)`` risks, ``thresholds`` one per outcome or one for all. An outcome
    with no labelled patient gets ``{"n": 0, "warnings": [...]}``.
    """
    labels = np.asarray(y)
    risks = np.asarray(p, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != risks.shape or labels.shape[1] != len(outcomes):
        raise ValueError(f"labels {labels.shape} and risks {risks.shape} must both be "
                         f"(n, {len(outcomes)}) for outcomes {list(outcomes)}")
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(outcomes):
        known = labels[:, j] >= 0
        t = thresholds[name] if isinstance(thresholds, Mapping) else thresholds
        if not known.any():
            out[name] = {"n": 0, "events": 0, "warnings": [f"outcome {name!r}: no labelled patient"]}
            continue
        out[name] = clinical_metrics(labels[known, j], risks[known, j], threshold=float(t), rng=rng, **kwargs)
    return out


def json_ready(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by ``None`` (strict JSON) and numpy scalars by
    Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
