"""Binary classification metrics of one site's test split: accuracy, AUROC and log-loss.

AUROC is the Mann–Whitney statistic ``P(score_pos > score_neg) + ½ P(tie)``, computed from
average ranks; it is undefined (NaN) when the split holds a single class.
"""

from __future__ import annotations

import math

import numpy as np


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = np.asarray(score)[order]
    i = 0
    while i < len(sorted_scores):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y: np.ndarray, p_pos: np.ndarray, *, eps: float = 1e-7) -> dict[str, float]:
    """Accuracy at 0.5, AUROC and mean log-loss of positive-class probabilities ``p_pos``."""
    y = np.asarray(y).astype(np.float64).reshape(-1)
    p = np.clip(np.asarray(p_pos, dtype=np.float64).reshape(-1), eps, 1 - eps)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} differ in shape")
    return {
        "accuracy": float(np.mean((p >= 0.5) == (y == 1))),
        "auroc": auroc(y, p),
        "loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
    }


def multiclass_metrics(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy of class ``logits`` ``(n, C)``."""
    y = np.asarray(y).reshape(-1)
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return {
        "accuracy": float(np.mean(z.argmax(axis=1) == y)),
        "loss": float(-np.mean(logp[np.arange(len(y)), y])),
    }
