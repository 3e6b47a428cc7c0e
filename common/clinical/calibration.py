"""Calibration: how far predicted risks agree with observed event rates, and how to repair them.

Measures (Van Calster et al. 2019, "Calibration: the Achilles heel of predictive analytics",
BMC Medicine 17:230), with ``z = logit(p) = log(p / (1 − p))``:

- **calibration slope** ``b`` of the logistic recalibration model ``logit P(y=1) = a + b·z``,
  fitted by maximum likelihood. ``b = 1`` is ideal; ``b < 1`` means risks too extreme
  (overfitting), ``b > 1`` too modest.
- **calibration intercept** (calibration-in-the-large) ``a'`` of ``logit P(y=1) = a' + z``, the
  slope fixed at 1 (``z`` an offset). ``a' = 0`` is ideal; ``a' > 0``: risks too low on average.
- **expected calibration error** (Naeini, Cooper & Hauskrecht 2015)
  ``ECE = Σ_b (n_b / n) |ȳ_b − p̄_b|`` over ``n_bins`` equal-width risk bins.

Repair: **Platt scaling** (Platt 1999, "Probabilistic outputs for support vector machines"),
``p' = σ(a + b·s)`` for a model score ``s`` (here the positive-class logit), fitted on held-out
predictions with Platt's smoothed targets ``t₊ = (N₊ + 1)/(N₊ + 2)``, ``t₋ = 1/(N₋ + 2)`` so that
the fit stays finite when the scores separate the classes; ``method="intercept"`` fixes ``b = 1``.

All fits are Newton–Raphson on the (weighted) log-likelihood, at most two parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

log = logging.getLogger(__name__)

CalibrationMethod = Literal["platt", "intercept", "none"]
CALIBRATION_METHODS: tuple[str, ...] = ("platt", "intercept", "none")
#: A fitted slope or intercept beyond this magnitude means the likelihood has no finite maximum
#: (the risks separate the classes): the value is reported as undefined (NaN).
DIVERGED = 50.0


def logit(p: np.ndarray, *, eps: float = 1e-7) -> np.ndarray:
    """``log(p / (1 − p))`` with ``p`` clipped to ``[eps, 1 − eps]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + e^{−z})``, computed without overflow."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _loglik(z: np.ndarray, t: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row of ``w``: ``Σ w (t log σ(η) + (1 − t) log(1 − σ(η)))``, ``η = a + b z``, stably."""
    eta = a[:, None] + b[:, None] * z[None, :]
    return np.sum(w * (t[None, :] * eta - np.logaddexp(0.0, eta)), axis=1)


def newton_fits(z: np.ndarray, t: np.ndarray, weights: np.ndarray, *, slope: bool,
                a0: float = 0.0, b0: float = 1.0, max_iter: int = 100, tol: float = 1e-10
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One logistic fit per row of case weights ``(B, n)``: maximise
    ``Σ w (t log σ(a + b z) + (1 − t) log(1 − σ(a + b z)))`` over ``a`` (and ``b`` when
    ``slope``; else ``b = b0`` fixed) by Newton's method with step halving, so that each fit's
    log-likelihood never decreases; ``t`` may be soft targets in [0, 1]. Returns ``(a, b,
    converged)`` arrays; a fit whose parameters pass ``±DIVERGED`` (no finite maximum) or whose
    Hessian is singular is not converged."""
    w_case = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_fits = w_case.shape[0]
    a = np.full(n_fits, float(a0))
    b = np.full(n_fits, float(b0))
    ok = np.zeros(n_fits, dtype=bool)
    active = np.ones(n_fits, dtype=bool)
    ll = _loglik(z, t, a, b, w_case)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        wc = w_case[idx]
        prob = sigmoid(a[idx, None] + b[idx, None] * z[None, :])
        r = wc * (t[None, :] - prob)
        h = wc * prob * (1 - prob)
        g0, h00 = r.sum(axis=1), h.sum(axis=1)
        if slope:
            g1, h01, h11 = (r * z).sum(axis=1), (h * z).sum(axis=1), (h * z * z).sum(axis=1)
            det = h00 * h11 - h01 * h01
            singular = ~(det > 1e-12 * np.maximum(h00 * h11, 1e-300))
            safe = np.where(singular, 1.0, det)
            da, db = (h11 * g0 - h01 * g1) / safe, (h00 * g1 - h01 * g0) / safe
        else:
            singular = ~(h00 > 1e-300)
            da, db = g0 / np.where(singular, 1.0, h00), np.zeros_like(g0)
        if singular.any():
            active[idx[singular]] = False
        keep = ~singular
        idx, da, db = idx[keep], da[keep], db[keep]
        scale = np.ones(idx.size)
        for _ in range(40):  # step halving until the log-likelihood does not decrease
            new_ll = _loglik(z, t, a[idx] + scale * da, b[idx] + scale * db, w_case[idx])
            worse = new_ll < ll[idx] - 1e-12
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        a[idx] += scale * da
        b[idx] += scale * db
        ll[idx] = new_ll
        step = scale * np.maximum(np.abs(da), np.abs(db))
        diverged = np.maximum(np.abs(a[idx]), np.abs(b[idx])) > DIVERGED
        done = (step < tol) & ~diverged
        ok[idx[done]] = True
        active[idx[done | diverged]] = False
    return a, b, ok


def _newton(z: np.ndarray, t: np.ndarray, *, slope: bool, a0: float = 0.0, b0: float = 1.0,
            weights: np.ndarray | None = None) -> tuple[float, float, bool]:
    """A single :func:`newton_fits` fit (case weights default to 1)."""
    w = np.ones((1, z.size)) if weights is None else np.asarray(weights, dtype=np.float64)[None, :]
    a, b, ok = newton_fits(z, t, w, slope=slope, a0=a0, b0=b0)
    return float(a[0]), float(b[0]), bool(ok[0])


def calibration_intercept_slope(y: np.ndarray, p: np.ndarray, *, weights: np.ndarray | None = None,
                                start: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """``(a', b)``: calibration intercept (slope fixed at 1) and calibration slope of risks ``p``.

    ``weights`` are case weights (a bootstrap resample as multiplicities); ``start`` the initial
    ``(a', b)`` of Newton's method. NaN where undefined: a single class, or a likelihood without
    finite maximum (the risks separate the classes perfectly, common on tiny test sets).
    """
    labels = np.asarray(y, dtype=np.float64).reshape(-1)
    z = logit(p).reshape(-1)
    present = labels if weights is None else labels[np.asarray(weights) > 0]
    if present.size == 0 or present.min() == present.max():
        return math.nan, math.nan
    a_ci, _, ok_a = _newton(z, labels, slope=False, a0=start[0], weights=weights)  # b stays 1: z is an offset
    _, b, ok_b = _newton(z, labels, slope=True, b0=start[1], weights=weights)
    return (a_ci if ok_a else math.nan), (b if ok_b else math.nan)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, *, n_bins: int = 10) -> float:
    """``Σ_b (n_b/n) |ȳ_b − p̄_b|`` over equal-width bins of ``[0, 1]`` (the last bin closed)."""
    curve = reliability_curve(y, p, n_bins=n_bins)
    n = curve.count.sum()
    if n == 0:
        return math.nan
    keep = curve.count > 0
    gap = np.abs(curve.event_sum[keep] - curve.risk_sum[keep])  # n_b |ȳ_b − p̄_b|
    return float(gap.sum() / n)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per risk bin: patient count, summed predicted risk and event count (sums and counts, so
    curves of shards or sites add up); ``edges`` are the ``n_bins + 1`` bin edges."""

    edges: np.ndarray
    count: np.ndarray
    risk_sum: np.ndarray
    event_sum: np.ndarray

    def __add__(self, other: ReliabilityCurve) -> ReliabilityCurve:
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("reliability curves with different bins cannot be added")
        return ReliabilityCurve(self.edges, self.count + other.count,
                                self.risk_sum + other.risk_sum, self.event_sum + other.event_sum)

    @property
    def mean_risk(self) -> np.ndarray:
        """Mean predicted risk per bin (NaN for an empty bin)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.risk_sum / np.maximum(self.count, 1), np.nan)

    @property
    def observed(self) -> np.ndarray:
        """Observed event rate per bin (NaN for an empty bin)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.event_sum / np.maximum(self.count, 1), np.nan)

    def to_dict(self) -> dict[str, list[float]]:
        return {"edges": self.edges.tolist(), "count": self.count.tolist(),
                "risk_sum": self.risk_sum.tolist(), "event_sum": self.event_sum.tolist()}


def reliability_curve(y: np.ndarray, p: np.ndarray, *, n_bins: int = 10) -> ReliabilityCurve:
    """Bin risks into ``n_bins`` equal-width bins of ``[0, 1]``; bin ``k`` holds
    ``edges[k] ≤ p < edges[k+1]`` (the last bin includes 1)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    labels = np.asarray(y, dtype=np.float64).reshape(-1)
    risk = np.asarray(p, dtype=np.float64).reshape(-1)
    if labels.shape != risk.shape:
        raise ValueError(f"labels {labels.shape} and risks {risk.shape} differ in shape")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, risk, side="right") - 1, 0, n_bins - 1)
    return ReliabilityCurve(
        edges,
        np.bincount(idx, minlength=n_bins).astype(np.int64),
        np.bincount(idx, weights=risk, minlength=n_bins),
        np.bincount(idx, weights=labels, minlength=n_bins),
    )


@dataclass(frozen=True)
class Calibration:
    """A fitted recalibration ``p' = σ(a + b·s)`` of a positive-class logit ``s``.

    ``method`` says how it was fitted (``none``: ``a = 0, b = 1``, the identity); ``n`` and
    ``events`` the held-out predictions it was fitted on.
    """

    method: CalibrationMethod = "none"
    a: float = 0.0
    b: float = 1.0
    n: int = 0
    events: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of {CALIBRATION_METHODS}")
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.b <= 0:
            raise ValueError(f"calibration needs finite a and b > 0 (b ≤ 0 would reverse the "
                             f"ranking), got a={self.a}, b={self.b}")

    def apply(self, score: np.ndarray) -> np.ndarray:
        """Calibrated risks ``σ(a + b·score)``."""
        return sigmoid(self.a + self.b * np.asarray(score, dtype=np.float64))

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "a": self.a, "b": self.b, "n": self.n,
                "events": self.events, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        method = str(d["method"])
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method {method!r} is not one of {CALIBRATION_METHODS}")
        return cls(cast(CalibrationMethod, method), float(d["a"]), float(d["b"]), int(d.get("n", 0)),
                   int(d.get("events", 0)), str(d.get("note", "")))


def platt_targets(y: np.ndarray) -> np.ndarray:
    """Platt's (1999) smoothed targets: ``(N₊ + 1)/(N₊ + 2)`` for events, ``1/(N₋ + 2)`` otherwise."""
    labels = np.asarray(y).reshape(-1).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return np.where(labels, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def fit_calibration(score: np.ndarray, y: np.ndarray, *, method: CalibrationMethod) -> Calibration:
    """Fit ``σ(a + b·score)`` to held-out ``(score, y)`` with Platt's smoothed targets.

    ``platt``: ``a`` and ``b``; ``intercept``: ``a`` only (``b = 1``); ``none``: the identity.
    A Platt fit whose slope is not positive (the held-out scores rank the classes the wrong way
    round, or not at all) or that does not converge falls back to ``intercept``, which never
    changes the ranking; the reason is kept in ``note``.
    """
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    n, events = int(labels.size), int(labels.sum())
    if method == "none" or n == 0:
        return Calibration("none", n=n, events=events)
    t = platt_targets(labels)
    note = ""
    if method == "platt":
        a, b, ok = _newton(s, t, slope=True)
        if ok and b > 1e-3:
            return Calibration("platt", float(a), float(b), n, events)
        note = (f"Platt slope {b:.3g} not positive on {n} held-out predictions" if ok
                else f"Platt fit did not converge on {n} held-out predictions")
        note += "; fell back to intercept-only recalibration"
        log.info("calibration: %s", note)
    a, _, ok = _newton(s, t, slope=False)
    if not ok:
        return Calibration("none", n=n, events=events, note=(note + "; " if note else "")
                           + "intercept fit did not converge; risks left uncalibrated")
    return Calibration("intercept", float(a), 1.0, n, events, note)
