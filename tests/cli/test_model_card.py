"""The model card holds the numbers it was given, and says where they are thin."""

import numpy as np
import pytest
import torch

from fedmeta.cli.model_card import card_path, fmt, render_model_card
from fedmeta.common.bundle import ModelSpec, Provenance, SiteModelBundle
from fedmeta.common.clinical.calibration import Calibration
from fedmeta.common.clinical.metrics import clinical_metrics
from fedmeta.common.clinical.thresholds import Threshold
from fedmeta.common.models import init_params
from fedmeta.common.preprocessing import HeartPreprocessing

SPEC = ModelSpec("linear", {"in_features": 13, "out_features": 2})


def _bundle(counts=None, adaptation=None) -> SiteModelBundle:
    torch.manual_seed(0)
    params = {k: v.numpy() for k, v in init_params(SPEC.build()).items()}
    prov = Provenance("Hungary", "runs/r1/final.safetensors", "ab" * 32, "reptile",
                      ("Cleveland", "Switzerland"), 10, counts or {"0": 6, "1": 4})
    return SiteModelBundle(SPEC, params, HeartPreprocessing((0.0,) * 13, (1.0,) * 13), "heart_disease",
                           ("0", "1"), prov, calibration=Calibration("intercept", -0.4123, 1.0, 10, 4),
                           threshold=Threshold(0.4, "prevalence", 10, 4, 0.75, 0.5),
                           adaptation=adaptation or {"choice": {"scope": "intercept", "text": "intercept only (λ = 0)"},
                                                     "scheme": "leave-one-out, 10 folds", "rule": "1se",
                                                     "warnings": ["4 patients with and 6 without the outcome"]})


def test_card_holds_every_number_it_was_given():
    rng = np.random.default_rng(0)
    y = np.array([1] * 8 + [0] * 30)
    p = np.clip(0.3 * y + rng.random(38) * 0.6, 0, 1)
    m = clinical_metrics(y, p, threshold=0.4, rng=np.random.default_rng(1), n_boot=100)
    before = clinical_metrics(y, np.full(38, 0.5), threshold=0.5, rng=np.random.default_rng(1), n_boot=0)
    card = render_model_card(_bundle(), m, before=before)
    for key in ("auroc", "auprc", "brier", "sensitivity", "specificity", "ppv", "npv", "calibration_slope"):
        v = m[key]
        assert f"| {fmt(v['value'])} |" in card, key
        if np.isfinite(v["lo"]):
            assert f"{fmt(v['lo'])} – {fmt(v['hi'])}" in card, key
    assert "38 patients, 8 events" in card and "100 stratified bootstrap" in card
    assert "only 8 events (< 10)" in card  # the metrics' warning reaches the limits
    assert "0.400" in card and "`prevalence`" in card and "a = -0.412" in card
    assert "Hungary" in card and "Cleveland, Switzerland" in card and "intercept only (λ = 0)" in card
    assert "Adapted on only 10 labelled patients" in card and "Fewer than 10 labelled patients in class(es) 0, 1" in card
    assert "| before adaptation |" in card and f"| {fmt(before['auroc']['value'])} |" in card


def test_card_without_metrics_and_with_a_missing_class():
    card = render_model_card(_bundle(counts={"0": 0, "1": 10}))
    assert "No labelled patient of class(es) 0" in card and "No held-out evaluation" in card
    assert fmt(float("nan")) == "undefined" and fmt(None) == "undefined" and fmt(3) == "3"


@pytest.mark.parametrize("name", ["site.fedmeta", "a/b.fedmeta"])
def test_card_path_is_beside_the_bundle(name):
    assert str(card_path(name)).endswith(name + ".md")
