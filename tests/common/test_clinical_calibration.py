"""Calibration measures and Platt recalibration against scikit-learn and hand computations."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression

from fedmeta.common.clinical.calibration import (
    Calibration,
    calibration_intercept_slope,
    expected_calibration_error,
    fit_calibration,
    logit,
    platt_targets,
    reliability_curve,
    sigmoid,
)


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < sigmoid(-0.4 + 0.7 * z)).astype(int)  # truth: a = -0.4, b = 0.7
    return y, sigmoid(z)


def test_calibration_slope_matches_unpenalised_sklearn_fit():
    y, p = _miscalibrated(2000, 0)
    _, slope = calibration_intercept_slope(y, p)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logit(p)[:, None], y)
    assert abs(slope - ref.coef_[0, 0]) < 1e-6
    assert 0.6 < slope < 0.8


def test_calibration_intercept_solves_the_offset_score_equation():
    y, p = _miscalibrated(2000, 1)
    a, _ = calibration_intercept_slope(y, p)
    # with z an offset, the MLE of a' makes predicted and observed events agree
    assert abs(np.sum(sigmoid(a + logit(p))) - y.sum()) < 1e-6
    # constant risks: a' = logit(observed rate) - logit(risk), by hand
    y2 = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    a2, b2 = calibration_intercept_slope(y2, np.full(10, 0.5))
    assert abs(a2 - np.log(0.2 / 0.8)) < 1e-8 and np.isnan(b2)  # slope undefined: no spread in z


def test_calibration_of_well_calibrated_risks_is_near_ideal():
    rng = np.random.default_rng(3)
    p = rng.uniform(0.02, 0.98, 20000)
    y = (rng.random(p.size) < p).astype(int)
    a, b = calibration_intercept_slope(y, p)
    assert abs(a) < 0.05 and abs(b - 1) < 0.05


def test_calibration_is_undefined_for_one_class_or_separated_classes():
    assert all(np.isnan(calibration_intercept_slope(np.ones(5), np.linspace(0.1, 0.9, 5))))
    _, b = calibration_intercept_slope(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert np.isnan(b)


def test_ece_by_hand():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.15, 0.95])
    # bins: [0, .1): |0 - .05| x1;  [.1, .2): |.5 - .15| x2;  [.9, 1]: |1 - .95| x1
    assert abs(expected_calibration_error(y, p) - (0.05 + 0.7 + 0.05) / 4) < 1e-12


def test_reliability_curve_matches_sklearn_and_adds():
    rng = np.random.default_rng(4)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(int)
    curve = reliability_curve(y, p, n_bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    keep = curve.count > 0
    assert np.allclose(curve.observed[keep], prob_true) and np.allclose(curve.mean_risk[keep], prob_pred)
    halves = reliability_curve(y[:200], p[:200]) + reliability_curve(y[200:], p[200:])
    assert np.array_equal(halves.count, curve.count) and np.allclose(halves.event_sum, curve.event_sum)
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        reliability_curve(y, p, n_bins=0)


def _soft_logistic(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Reference: soft targets as two weighted copies of each row, unpenalised sklearn fit."""
    xs = np.concatenate([s, s])[:, None]
    ys = np.concatenate([np.ones_like(t), np.zeros_like(t)])
    w = np.concatenate([t, 1 - t])
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(xs, ys, sample_weight=w)
    return float(ref.intercept_[0]), float(ref.coef_[0, 0])


def test_platt_fit_matches_weighted_sklearn_with_platts_targets():
    rng = np.random.default_rng(5)
    s = rng.normal(0, 2, 60)
    y = (rng.random(60) < sigmoid(0.5 + 0.4 * s)).astype(int)
    cal = fit_calibration(s, y, method="platt")
    a, b = _soft_logistic(s, platt_targets(y))
    assert cal.method == "platt" and abs(cal.a - a) < 1e-6 and abs(cal.b - b) < 1e-6
    n_pos, n_neg = y.sum(), (1 - y).sum()
    assert np.allclose(platt_targets(y), np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)))


def test_intercept_fit_and_fallback_when_the_platt_slope_is_negative():
    s = np.array([2.0, 1.0, -1.0, -2.0, 1.5, -1.5])
    y = np.array([0, 0, 1, 1, 0, 1])  # scores rank the classes the wrong way round
    cal = fit_calibration(s, y, method="platt")
    assert cal.method == "intercept" and cal.b == 1.0 and "fell back" in cal.note
    t = platt_targets(y)
    assert abs(np.sum(sigmoid(cal.a + s)) - t.sum()) < 1e-8  # the intercept's score equation
    assert np.allclose(cal.apply(s), sigmoid(cal.a + s))


def test_separable_scores_still_give_a_finite_platt_fit():
    s = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    cal = fit_calibration(s, np.array([0, 0, 0, 1, 1, 1]), method="platt")
    assert cal.method == "platt" and np.isfinite(cal.b) and cal.b > 0


def test_calibration_rejects_reversing_or_unknown_settings():
    with pytest.raises(ValueError, match="b > 0"):
        Calibration("platt", 0.0, -1.0)
    with pytest.raises(ValueError, match="is not one of"):
        Calibration("isotonic", 0.0, 1.0)  # type: ignore[arg-type]
    assert Calibration.from_dict(Calibration("platt", 0.3, 0.8, 20, 5).to_dict()) == Calibration("platt", 0.3, 0.8, 20, 5)


def test_reliability_diagram_writes_a_png(tmp_path):
    from fedmeta.cli.plots import reliability_diagram

    y, p = _miscalibrated(300, 6)
    out = reliability_diagram({"site A": reliability_curve(y, p), "site B": reliability_curve(y[:100], p[:100])},
                              tmp_path / "r" / "reliability.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
