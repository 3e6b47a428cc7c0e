"""Threshold policies, checked by hand on tiny examples."""

import numpy as np
import pytest

from fedmeta.common.clinical.thresholds import Threshold, ThresholdPolicy, choose_threshold

Y = np.array([0, 0, 1, 1])
R = np.array([0.1, 0.4, 0.35, 0.8])


def test_prevalence_policy_is_the_event_rate():
    t = choose_threshold(np.array([0, 0, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), "prevalence")
    assert t.value == 0.25 and t.policy == "prevalence"
    assert t.sensitivity == 1.0 and t.specificity == 2 / 3  # 0.3 and 0.4 flagged


def test_youden_takes_the_highest_of_tied_maxima_midway():
    # J: t=0.8 -> 0.5 - 0 = 0.5; t=0.4 -> 0.5 - 0.5 = 0; t=0.35 -> 1 - 0.5 = 0.5. First max: 0.8,
    # placed midway to the next lower risk 0.4.
    t = choose_threshold(Y, R, "youden")
    assert abs(t.value - 0.6) < 1e-12 and t.sensitivity == 0.5 and t.specificity == 1.0


def test_target_sensitivity():
    t = choose_threshold(Y, R, "sensitivity:1.0")  # both events flagged from 0.35 down: midway to 0.1
    assert abs(t.value - 0.225) < 1e-12 and t.sensitivity == 1.0 and t.specificity == 0.5
    t = choose_threshold(Y, R, "sensitivity:0.5")
    assert abs(t.value - 0.6) < 1e-12 and t.sensitivity == 0.5


def test_fixed_policy_and_single_class_fallback():
    assert choose_threshold(Y, R, "fixed:0.3").value == 0.3
    t = choose_threshold(np.ones(3, dtype=int), np.array([0.2, 0.5, 0.9]), "youden")
    assert t.value == 1.0 and "used prevalence" in t.note


def test_youden_without_separation_falls_back_to_prevalence():
    t = choose_threshold(np.array([1, 0]), np.array([0.2, 0.8]), "youden")
    assert t.value == 0.5 and "J ≤ 0" in t.note


@pytest.mark.parametrize("text, match", [
    ("median", "unknown threshold policy"),
    ("sensitivity:1.5", r"needs a number in \(0, 1\]"),
    ("sensitivity:abc", "needs a number"),
    ("fixed:1", r"needs a number in \[0, 1\)"),
    ("sensitivity", "unknown threshold policy"),
])
def test_bad_policies_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        ThresholdPolicy.parse(text)


def test_bad_inputs_and_round_trip():
    with pytest.raises(ValueError, match="at least one labelled row"):
        choose_threshold(np.array([], dtype=int), np.array([]), "youden")
    with pytest.raises(ValueError, match="differ in shape"):
        choose_threshold(Y, R[:3], "youden")
    t = choose_threshold(Y, R, "youden")
    assert Threshold.from_dict(t.to_dict()) == t
    assert str(ThresholdPolicy.parse(" Sensitivity:0.90 ")) == "sensitivity:0.9"
