"""Site metrics against scikit-learn."""

import numpy as np
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from fedmeta.common.metrics import auroc, binary_metrics


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
