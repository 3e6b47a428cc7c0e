"""Clinical metrics against scikit-learn, bootstrap intervals and warnings."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fedmeta.common.clinical.calibration import logit, sigmoid
from fedmeta.common.clinical.metrics import (
    METRICS,
    clinical_metrics,
    json_ready,
    outcome_metrics,
    wilson_interval,
)


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = sigmoid(-1.0 + 1.8 * y + rng.normal(0, 1.2, n))
    return y, p


def test_every_point_value_matches_scikit_learn():
    y, p = _data()
    t = 0.35
    m = clinical_metrics(y, p, threshold=t, rng=np.random.default_rng(0), n_boot=0)
    pred = (p >= t).astype(int)
    ref = {
        "auroc": roc_auc_score(y, p), "auprc": average_precision_score(y, p),
        "brier": brier_score_loss(y, p), "log_loss": log_loss(y, p),
        "sensitivity": recall_score(y, pred), "specificity": recall_score(y, pred, pos_label=0),
        "ppv": precision_score(y, pred), "npv": precision_score(y, pred, pos_label=0),
        "accuracy": accuracy_score(y, pred),
        "calibration_slope": LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000)
        .fit(logit(p)[:, None], y).coef_[0, 0],
    }
    for k, v in ref.items():
        assert abs(m[k]["value"] - v) < 1e-6, k
    assert m["n"] == 400 and m["events"] == int(y.sum()) and m["non_events"] == 400 - int(y.sum())
    assert m["prevalence"]["value"] == y.mean()
    assert set(METRICS) <= set(m)


def test_bootstrap_intervals_are_stratified_seeded_and_cover_the_point():
    y, p = _data(200, 1)
    a = clinical_metrics(y, p, threshold=0.4, rng=np.random.default_rng(7), n_boot=200)
    b = clinical_metrics(y, p, threshold=0.4, rng=np.random.default_rng(7), n_boot=200)
    for k in METRICS:
        assert a[k] == b[k], k
    for k in ("auroc", "brier", "sensitivity", "specificity", "accuracy"):
        assert a[k]["lo"] < a[k]["value"] < a[k]["hi"], k
    # stratified: prevalence never varies, so no resample loses a class and AUROC is always defined
    assert a["auroc"]["undefined"] == 0 and a["auroc"]["hi"] - a["auroc"]["lo"] > 0.01


def test_undefined_resamples_are_skipped_and_counted():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    m = clinical_metrics(y, p, threshold=0.95, rng=np.random.default_rng(0), n_boot=50)
    assert np.isnan(m["ppv"]["value"]) and m["ppv"]["undefined"] == 50  # nobody flagged
    assert m["auroc"]["value"] == 1.0 and m["auroc"]["lo"] == m["auroc"]["hi"] == 1.0
    assert np.isnan(m["calibration_slope"]["value"]) and m["calibration_slope"]["undefined"] == 50


def test_warnings_for_few_events_and_single_class():
    y = np.array([1] * 4 + [0] * 40)
    p = np.linspace(0.05, 0.6, 44)
    m = clinical_metrics(y, p, threshold=0.5, rng=np.random.default_rng(0), n_boot=20)
    assert any("only 4 events (< 10)" in w for w in m["warnings"])
    assert m["sensitivity"]["basis"] == 4 and m["specificity"]["basis"] == 40
    one = clinical_metrics(np.zeros(5, dtype=int), np.full(5, 0.2), threshold=0.5,
                           rng=np.random.default_rng(0), n_boot=10)
    assert np.isnan(one["auroc"]["value"]) and one["warnings"][0].startswith("single class")
    assert one["specificity"]["value"] == 1.0 and one["brier"]["value"] == pytest.approx(0.04)


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(2, 10)
    assert abs(lo - 0.05668) < 1e-4 and abs(hi - 0.50984) < 1e-4
    assert np.isnan(wilson_interval(0, 0)[0])


def test_every_outcome_of_a_multi_outcome_site_is_scored_on_its_labelled_rows():
    y1, p1 = _data(120, 2)
    y2, p2 = _data(120, 3)
    y2 = y2.copy()
    y2[:30] = -1  # unknown labels of the second outcome
    y = np.stack([y1, y2], axis=1)
    p = np.stack([p1, p2], axis=1)
    out = outcome_metrics(y, p, ("mortality", "aki"), thresholds={"mortality": 0.3, "aki": 0.5},
                          rng=np.random.default_rng(0), n_boot=0)
    assert set(out) == {"mortality", "aki"}
    assert out["aki"]["n"] == 90 and out["aki"]["threshold"] == 0.5
    assert abs(out["aki"]["auroc"]["value"] - roc_auc_score(y2[30:], p2[30:])) < 1e-12
    assert abs(out["mortality"]["auroc"]["value"] - roc_auc_score(y1, p1)) < 1e-12


@pytest.mark.parametrize("y, p, kw, match", [
    ([0, 2], [0.1, 0.2], {}, "labels must be 0 or 1"),
    ([0, 1], [0.1], {}, "differ in shape"),
    ([0, 1], [0.1, 1.2], {}, r"in \[0, 1\]"),
    ([], [], {}, "at least one labelled patient"),
    ([0, 1], [0.1, 0.2], {"level": 1.0}, "level must be"),
    ([0, 1], [0.1, 0.2], {"n_boot": -1}, "n_boot must be"),
])
def test_bad_inputs_are_refused(y, p, kw, match):
    with pytest.raises(ValueError, match=match):
        clinical_metrics(np.array(y), np.array(p), threshold=0.5, rng=np.random.default_rng(0), **kw)


def test_outcome_metrics_shape_check_and_json_ready():
    with pytest.raises(ValueError, match="must both be"):
        outcome_metrics(np.zeros((3, 2)), np.zeros((3, 1)), ("a", "b"), thresholds=0.5,
                        rng=np.random.default_rng(0))
    assert json_ready({"a": float("nan"), "b": [np.float64(1.5)]}) == {"a": None, "b": [1.5]}


def test_vectorised_bootstrap_equals_scikit_learn_on_materialised_resamples():
    from fedmeta.common.clinical.metrics import (
        bootstrap_metrics,
        point_metrics,
        stratified_resample_counts,
    )

    rng = np.random.default_rng(11)
    y = (rng.random(60) < 0.35).astype(int)
    p = np.round(np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1), 1)  # rounded: many ties
    counts = stratified_resample_counts(y, 25, np.random.default_rng(3))
    assert (counts[:, y == 1].sum(axis=1) == y.sum()).all() and (counts.sum(axis=1) == 60).all()
    boots = bootstrap_metrics(y, p, counts, threshold=0.45)
    for b in range(25):
        idx = np.repeat(np.arange(60), counts[b].astype(int))
        ref = point_metrics(y[idx], p[idx], threshold=0.45)
        for k in METRICS:
            if np.isnan(ref[k]):
                assert np.isnan(boots[k][b]), (k, b)
            else:
                assert abs(boots[k][b] - ref[k]) < 1e-7, (k, b, boots[k][b], ref[k])


def test_docstring_example_runs():
    import doctest

    import fedmeta.common.clinical.metrics as M

    assert doctest.testmod(M).failed == 0
