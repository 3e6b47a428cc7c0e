"""Point metrics of one site's test split, computed with scikit-learn.

- :func:`binary_metrics`: accuracy at 0.5, AUROC and mean log-loss of positive-class risks (the
  three numbers every summary carries; :mod:`fedmeta.common.clinical` adds the clinical ones);
- :func:`multiclass_metrics`: accuracy, macro one-vs-rest AUROC and mean cross-entropy of logits;
- :class:`BinaryCounts`: the additive part of the binary metrics (confusion counts at a threshold,
  summed log-loss and squared error), so that shards and sites combine by adding counts and
  dividing once — never by averaging averages. AUROC and AUPRC are rank statistics and do not
  decompose into sums; they are computed on pooled predictions.

AUROC is ``P(score_pos > score_neg) + ½ P(tie)`` (:func:`sklearn.metrics.roc_auc_score`); it is
undefined (NaN) when the split holds a single class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

EPS = 1e-7


def _as_binary(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = sorted(set(np.unique(y).tolist()) - {0, 1})
        raise ValueError(f"binary labels must be 0 or 1, got {bad[:5]}")
    return y.astype(np.int64)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for binary labels ``y``; NaN with a single class."""
    labels = _as_binary(y)
    if labels.size == 0 or labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, np.asarray(score, dtype=np.float64).reshape(-1)))


def binary_metrics(y: np.ndarray, p_pos: np.ndarray, *, eps: float = EPS) -> dict[str, float]:
    """Accuracy at 0.5, AUROC and mean log-loss of positive-class probabilities ``p_pos``.

    Log-loss ``−(1/n) Σ y log p + (1 − y) log(1 − p)`` with ``p`` clipped to ``[eps, 1 − eps]``.
    """
    labels = _as_binary(y).astype(np.float64)
    p = np.clip(np.asarray(p_pos, dtype=np.float64).reshape(-1), eps, 1 - eps)
    if labels.shape != p.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {p.shape} differ in shape")
    c = BinaryCounts.from_predictions(labels, p, threshold=0.5, eps=eps)
    return {"accuracy": c.accuracy, "auroc": auroc(labels, p), "loss": c.log_loss}


def multiclass_metrics(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy, macro one-vs-rest AUROC and mean cross-entropy of class ``logits`` ``(n, C)``.

    AUROC is NaN unless every one of the ``C`` classes occurs in ``y`` (and ``C ≥ 2``).
    """
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {z.shape} do not match {labels.shape[0]} labels")
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n_classes = z.shape[1]
    auc = math.nan
    if n_classes >= 2 and np.unique(labels).size == n_classes:
        prob = np.exp(logp)
        if n_classes == 2:
            auc = float(roc_auc_score(labels, prob[:, 1]))
        else:
            auc = float(roc_auc_score(labels, prob, multi_class="ovr", average="macro",
                                      labels=np.arange(n_classes)))
    return {
        "accuracy": float(np.mean(z.argmax(axis=1) == labels)),
        "auroc": auc,
        "loss": float(-np.mean(logp[np.arange(len(labels)), labels])),
    }


@dataclass(frozen=True)
class BinaryCounts:
    """Sums and counts behind the threshold metrics, addable across shards and sites.

    At threshold ``t`` a patient is predicted positive when ``p ≥ t``:
    sensitivity ``tp/(tp+fn)``, specificity ``tn/(tn+fp)``, PPV ``tp/(tp+fp)``,
    NPV ``tn/(tn+fn)``, accuracy ``(tp+tn)/n``; Brier score ``(1/n) Σ (p − y)²`` and log-loss from
    their sums. A ratio with a zero denominator is NaN.
    """

    tp: int
    fp: int
    tn: int
    fn: int
    log_loss_sum: float
    brier_sum: float

    @classmethod
    def from_predictions(cls, y: np.ndarray, p: np.ndarray, *, threshold: float,
                         eps: float = EPS) -> BinaryCounts:
        labels = _as_binary(y).astype(bool)
        prob = np.asarray(p, dtype=np.float64).reshape(-1)
        if labels.shape != prob.shape:
            raise ValueError(f"labels {labels.shape} and probabilities {prob.shape} differ in shape")
        pred = prob >= threshold
        clipped = np.clip(prob, eps, 1 - eps)
        ll = -np.where(labels, np.log(clipped), np.log(1 - clipped))
        return cls(
            tp=int(np.sum(pred & labels)), fp=int(np.sum(pred & ~labels)),
            tn=int(np.sum(~pred & ~labels)), fn=int(np.sum(~pred & labels)),
            log_loss_sum=float(ll.sum()), brier_sum=float(np.sum((prob - labels) ** 2)),
        )

    def __add__(self, other: BinaryCounts) -> BinaryCounts:
        return BinaryCounts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn,
                            self.fn + other.fn, self.log_loss_sum + other.log_loss_sum,
                            self.brier_sum + other.brier_sum)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def events(self) -> int:
        return self.tp + self.fn

    @staticmethod
    def _ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    @property
    def prevalence(self) -> float:
        return self._ratio(self.events, self.n)

    @property
    def accuracy(self) -> float:
        return self._ratio(self.tp + self.tn, self.n)

    @property
    def sensitivity(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return self._ratio(self.tn, self.tn + self.fn)

    @property
    def log_loss(self) -> float:
        return self._ratio(self.log_loss_sum, self.n)

    @property
    def brier(self) -> float:
        return self._ratio(self.brier_sum, self.n)
