"""Site metrics against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from fedmeta.common.metrics import BinaryCounts, auroc, binary_metrics, multiclass_metrics


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.random(200) * 0.7, 0.01, 0.99)
    p[:20] = 0.5  # ties
    m = binary_metrics(y, p)
    assert m["accuracy"] == accuracy_score(y, p >= 0.5)
    assert abs(m["auroc"] - roc_auc_score(y, p)) < 1e-12
    assert abs(m["loss"] - log_loss(y, p)) < 1e-9


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc(np.ones(5), np.linspace(0, 1, 5)))


def test_multiclass_metrics_match_sklearn():
    from sklearn.metrics import roc_auc_score as auc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    m = multiclass_metrics(y, logits)
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert m["accuracy"] == accuracy_score(y, logits.argmax(axis=1))
    assert abs(m["loss"] - log_loss(y, prob)) < 1e-9
    assert abs(m["auroc"] - auc(y, prob, multi_class="ovr", average="macro")) < 1e-12


def test_multiclass_auroc_is_nan_when_a_class_is_absent():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    assert np.isnan(multiclass_metrics(np.array([0, 1, 0]), logits)["auroc"])


def test_binary_counts_match_sklearn_and_add_across_shards():
    from sklearn.metrics import brier_score_loss, confusion_matrix, precision_score, recall_score

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 150)
    p = np.clip(0.35 * y + rng.random(150) * 0.65, 0.0, 1.0)
    t = 0.4
    pooled = BinaryCounts.from_predictions(y, p, threshold=t)
    pred = (p >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert (pooled.tp, pooled.fp, pooled.tn, pooled.fn) == (tp, fp, tn, fn)
    assert abs(pooled.sensitivity - recall_score(y, pred)) < 1e-12
    assert abs(pooled.specificity - recall_score(y, pred, pos_label=0)) < 1e-12
    assert abs(pooled.ppv - precision_score(y, pred)) < 1e-12
    assert abs(pooled.npv - precision_score(y, pred, pos_label=0)) < 1e-12
    assert abs(pooled.brier - brier_score_loss(y, p)) < 1e-12
    assert abs(pooled.log_loss - log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))) < 1e-9
    shards = [BinaryCounts.from_predictions(y[i:i + 50], p[i:i + 50], threshold=t) for i in (0, 50, 100)]
    total = shards[0] + shards[1] + shards[2]
    assert (total.tp, total.fp, total.tn, total.fn) == (pooled.tp, pooled.fp, pooled.tn, pooled.fn)
    assert abs(total.brier - pooled.brier) < 1e-12 and abs(total.log_loss - pooled.log_loss) < 1e-12


def test_binary_counts_ratio_without_denominator_is_nan():
    c = BinaryCounts.from_predictions(np.array([0, 1]), np.array([0.1, 0.2]), threshold=0.9)
    assert np.isnan(c.ppv) and c.npv == 0.5 and c.sensitivity == 0.0


def test_binary_metrics_reject_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="binary labels must be 0 or 1"):
        binary_metrics(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="differ in shape"):
        binary_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2]))
