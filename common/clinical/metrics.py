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
    reliability_curve,
)
from fedmeta.common.metrics import BinaryCounts

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
    boots = {m: np.full(n_boot, np.nan) for m in METRICS}
    groups = [np.flatnonzero(labels == c) for c in (0, 1)]
    groups = [g for g in groups if g.size]
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
        for m, v in point_metrics(labels[idx], risk[idx], threshold=threshold, n_bins=n_bins).items():
            boots[m][b] = v
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
