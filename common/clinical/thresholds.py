"""Decision thresholds: when does a risk become "treat as positive"?

A patient is flagged when ``risk ≥ t``. Policies, each stated in the bundle and the model card:

- ``prevalence`` (default): ``t = π``, the event rate of the labelled rows. For *calibrated*
  risks this is Youden's point: Youden's index ``J = sensitivity + specificity − 1`` (Youden 1950,
  "Index for rating diagnostic tests", Cancer 3:32) is maximal where the ROC curve's slope, the
  likelihood ratio ``f₁(s)/f₀(s)``, equals 1, and a calibrated risk ``p`` satisfies
  ``p/(1 − p) = LR · π/(1 − π)``, so ``LR = 1`` exactly at ``p = π``. It needs no ranking of the
  few labelled rows, so it is stable where the empirical Youden point is not.
- ``youden``: the empirical maximiser of ``J`` on the given (held-out) risks; ties go to the
  higher threshold; the threshold is placed midway between the last flagged and the first
  unflagged risk.
- ``sensitivity:S``: the highest threshold whose sensitivity on the given risks is at least
  ``S`` (e.g. ``sensitivity:0.9`` for a rule-out test), placed midway as above.
- ``fixed:T``: ``t = T`` (``fixed:0.5`` is the usual "more likely than not").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from fedmeta.common.metrics import BinaryCounts

POLICIES: tuple[str, ...] = ("prevalence", "youden", "sensitivity:S", "fixed:T")


@dataclass(frozen=True)
class ThresholdPolicy:
    """A parsed policy: ``kind`` in prevalence / youden / sensitivity / fixed, ``value`` for the
    last two."""

    kind: str
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> ThresholdPolicy:
        """``prevalence``, ``youden``, ``sensitivity:0.9`` or ``fixed:0.5``; ``ValueError`` naming
        the text and the allowed forms otherwise."""
        t = text.strip().lower()
        if t in ("prevalence", "youden"):
            return cls(t)
        kind, sep, rest = t.partition(":")
        if sep and kind in ("sensitivity", "fixed"):
            try:
                v = float(rest)
            except ValueError:
                v = math.nan
            lo_ok = v > 0 if kind == "sensitivity" else v >= 0
            if lo_ok and v <= 1 and (kind == "sensitivity" or v < 1):
                return cls(kind, v)
            bound = "(0, 1]" if kind == "sensitivity" else "[0, 1)"
            raise ValueError(f"threshold policy {text!r}: {kind} needs a number in {bound}, got {rest!r}")
        raise ValueError(f"unknown threshold policy {text!r}; use one of {list(POLICIES)} "
                         "(e.g. 'sensitivity:0.9', 'fixed:0.5')")

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


@dataclass(frozen=True)
class Threshold:
    """A chosen threshold, the policy that chose it, and what it achieved on the rows it was
    chosen on (``n``, ``events``, sensitivity and specificity there; NaN if undefined)."""

    value: float
    policy: str
    n: int = 0
    events: int = 0
    sensitivity: float = math.nan
    specificity: float = math.nan
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "policy": self.policy, "n": self.n, "events": self.events,
                "sensitivity": _json_float(self.sensitivity),
                "specificity": _json_float(self.specificity), "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Threshold:
        def num(k: str) -> float:
            v = d.get(k)
            return math.nan if v is None else float(v)

        return cls(float(d["value"]), str(d["policy"]), int(d.get("n", 0)), int(d.get("events", 0)),
                   num("sensitivity"), num("specificity"), str(d.get("note", "")))


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _midway(scores_desc: np.ndarray, t: float) -> float:
    """Midpoint between ``t`` (an observed risk, flagged) and the next lower observed risk."""
    lower = scores_desc[scores_desc < t]
    return float((t + lower[0]) / 2) if lower.size else float(t)


def choose_threshold(y: np.ndarray, risk: np.ndarray, policy: str | ThresholdPolicy) -> Threshold:
    """Choose the threshold on labelled ``(y, risk)`` (held-out, calibrated risks) by ``policy``.

    ``youden`` and ``sensitivity:S`` need both classes; with one class they fall back to
    ``prevalence`` and say so in ``note``.
    """
    pol = policy if isinstance(policy, ThresholdPolicy) else ThresholdPolicy.parse(policy)
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if labels.shape != r.shape:
        raise ValueError(f"labels {labels.shape} and risks {r.shape} differ in shape")
    if labels.size == 0:
        raise ValueError("choose_threshold needs at least one labelled row")
    n, events = int(labels.size), int(labels.sum())
    note = ""
    kind = pol.kind
    if kind in ("youden", "sensitivity") and events in (0, n):
        note = f"{pol} needs both classes ({events} events in {n}); used prevalence instead"
        kind = "prevalence"
    if kind == "fixed":
        assert pol.value is not None
        t = pol.value
    elif kind == "prevalence":
        t = events / n
    else:
        fpr, tpr, thr = roc_curve(labels, r, drop_intermediate=False)
        desc = np.unique(r)[::-1]
        if kind == "youden":
            i = int(np.argmax(tpr - fpr))  # first maximum: the highest threshold among ties
            if tpr[i] - fpr[i] <= 0:
                note = "no threshold separates the classes (Youden J ≤ 0); used prevalence instead"
                t = events / n
                c = BinaryCounts.from_predictions(labels, r, threshold=t)
                return Threshold(float(t), str(pol), n, events, c.sensitivity, c.specificity, note)
        else:
            assert pol.value is not None
            i = int(np.flatnonzero(tpr >= pol.value - 1e-12)[0])
        t = _midway(desc, float(thr[i])) if math.isfinite(thr[i]) else float(desc[0]) + 1e-12
        t = min(max(t, 0.0), 1.0)
    c = BinaryCounts.from_predictions(labels, r, threshold=t)
    return Threshold(float(t), str(pol), n, events, c.sensitivity, c.specificity, note)
