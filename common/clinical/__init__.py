"""Clinical evaluation of risk models: calibration, decision thresholds and metrics with
bootstrap intervals (:mod:`.calibration`, :mod:`.thresholds`, :mod:`.metrics`)."""

from fedmeta.common.clinical.calibration import (
    Calibration,
    ReliabilityCurve,
    calibration_intercept_slope,
    expected_calibration_error,
    fit_calibration,
    logit,
    reliability_curve,
    sigmoid,
)
from fedmeta.common.clinical.metrics import (
    METRICS,
    MIN_EVENTS,
    clinical_metrics,
    json_ready,
    outcome_metrics,
    point_metrics,
    wilson_interval,
)
from fedmeta.common.clinical.thresholds import Threshold, ThresholdPolicy, choose_threshold

__all__ = [
    "METRICS", "MIN_EVENTS", "Calibration", "ReliabilityCurve", "Threshold", "ThresholdPolicy",
    "calibration_intercept_slope", "choose_threshold", "clinical_metrics",
    "expected_calibration_error", "fit_calibration", "json_ready", "logit", "outcome_metrics",
    "point_metrics", "reliability_curve", "sigmoid", "wilson_interval",
]
