"""A site's evaluation: every outcome scored, metrics against scikit-learn, repeated stratified
draws for eval.shots, the site's floor on what is released, and the coordinator's reading of it."""

import math

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from fedmeta.common.adaptation import AdaptationResult, predict_logit
from fedmeta.common.clinical.calibration import sigmoid
from fedmeta.common.config import load_config
from fedmeta.common.data.base import TabularSite
from fedmeta.common.experiment import build_model_for
from fedmeta.common.models import init_params
from fedmeta.common.params import from_numpy, to_numpy
from fedmeta.server.evaluation import parse_evaluation, summary_mean
from fedmeta.sitecore.data import spec_of
from fedmeta.sitecore.evaluate import evaluate_site, is_count, released_metrics

OUTCOMES = ("death", "readmission")


def _site(seed=0, n_train=160, n_test=120, d=6):
    """Two outcomes driven by different features; 10 % of the second outcome's labels unknown."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, d)).astype(np.float32)
    y = np.stack([(x[:, 0] + 0.5 * rng.normal(size=len(x)) > 0.8),
                  (x[:, 1] - x[:, 2] + rng.normal(size=len(x)) > 0)], axis=1).astype(np.int64)
    y[rng.random(len(x)) < 0.1, 1] = -1
    names = tuple(f"f{i}" for i in range(d))
    return TabularSite("A", x[:n_train], y[:n_train], x[n_train:], y[n_train:], names, OUTCOMES)


def _setup(overrides=()):
    cfg = load_config(None, ["algorithm=reptile", "model.name=linear", "eval.bootstrap=50", "eval.adapt_steps=20",
                             "eval.adapt_lr=0.5", *overrides])
    site = _site()
    spec = spec_of(site)
    model = build_model_for(cfg, spec)
    torch.manual_seed(0)
    state = to_numpy(init_params(model))
    return cfg, site, spec, model, state


def test_every_outcome_is_scored_and_before_matches_scikit_learn():
    cfg, site, spec, model, state = _setup()
    result = evaluate_site(cfg, spec, site, state, rng=np.random.default_rng(0), keep_params=True)
    assert set(result["outcomes"]) == set(OUTCOMES)
    theta = from_numpy(state)
    for j, name in enumerate(OUTCOMES):
        known = site.y_test[:, j] >= 0
        y = site.y_test[known, j]
        p = sigmoid(predict_logit(model, theta, torch.from_numpy(site.x_test[known])))
        before = result["outcomes"][name]["before"]
        assert result["outcomes"][name]["n_test"] == known.sum() and result["outcomes"][name]["events"] == y.sum()
        assert before["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert before["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        assert before["loss"] == pytest.approx(log_loss(y, p), abs=1e-9)
        assert before["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y), abs=1e-12)
        assert before["auroc.lo"] <= before["auroc"] <= before["auroc.hi"]
    # "after" of the first outcome: the adapted, recalibrated risks of the kept result
    res = result["result"].adaptation
    assert isinstance(res, AdaptationResult)
    y0 = site.y_test[:, 0]
    p_after = res.calibration.apply(predict_logit(model, res.params, torch.from_numpy(site.x_test)))
    assert result["after"]["auroc"] == pytest.approx(roc_auc_score(y0, p_after), abs=1e-12)
    assert result["after"]["threshold"] == pytest.approx(res.threshold.value)
    flagged = p_after >= res.threshold.value
    assert result["after"]["sensitivity"] == pytest.approx(flagged[y0 == 1].mean(), abs=1e-12)
    assert result["after"]["ppv"] == pytest.approx(y0[flagged].mean(), abs=1e-12)
    # a random initialisation carries no signal: the policy must adapt (and help) on a learnable outcome
    assert result["adapt_scope"] in ("last", "all") and result["after"]["auroc"] > result["before"]["auroc"] + 0.1


def test_shots_report_the_mean_and_spread_over_stratified_draws():
    cfg, site, spec, _, state = _setup(["eval.shots=12", "eval.draws=4"])
    result = evaluate_site(cfg, spec, site, state, rng=np.random.default_rng(1))
    assert result["draws"] == 4 and result["n_train"] == 12
    for phase in ("before", "after"):
        assert result["spread"][phase]["auroc"] >= 0
    assert "auroc.lo" not in result["after"]  # no bootstrap over draws: the spread is the interval
    # θ is the same for every draw: "before" does not vary
    assert result["spread"]["before"]["auroc"] == pytest.approx(0.0, abs=1e-12)


def test_released_metrics_keep_only_numbers_resting_on_the_floor():
    cfg, site, spec, _, state = _setup()
    result = evaluate_site(cfg, spec, site, state, rng=np.random.default_rng(0))
    all_of_it, none_withheld = released_metrics(result, OUTCOMES, floor=1)
    floor = 25
    flat, withheld = released_metrics(result, OUTCOMES, floor=floor)
    assert withheld > none_withheld and withheld == flat["withheld"]
    assert set(flat) < set(all_of_it)
    for key, value in flat.items():
        assert isinstance(value, float) and math.isfinite(value)
        parts = key.split(".")
        if parts[0] in ("before", "after"):
            assert result["basis"][parts[0]][parts[1]] >= floor, key
        if parts[0] == "rel":
            assert flat[".".join([*parts[:3], "n"])] >= floor
    basis = result["basis"]["after"]
    for metric in ("sensitivity", "ppv"):
        assert (f"after.{metric}" in flat) == (basis[metric] >= floor)


def test_the_coordinator_reads_back_what_the_site_released():
    cfg, site, spec, _, state = _setup()
    result = evaluate_site(cfg, spec, site, state, rng=np.random.default_rng(0))
    flat, _ = released_metrics(result, OUTCOMES, floor=1)
    record = MetricRecord({k: int(v) if is_count(k) else v for k, v in flat.items()})
    parsed = parse_evaluation(record, OUTCOMES)
    for phase in ("before", "after"):
        expect = {k: v for k, v in result[phase].items() if math.isfinite(v)}
        assert parsed[phase] == pytest.approx(expect)
    assert parsed["n_test"] == result["n_test"] and parsed["adapt_scope"] == result["adapt_scope"]
    assert set(parsed["outcomes"]) == set(OUTCOMES)
    second = parsed["outcomes"]["readmission"]
    assert second["after"]["auroc"] == pytest.approx(result["outcomes"]["readmission"]["after"]["auroc"])
    bins = parsed["reliability"]["after"]
    assert sum(b["n"] for b in bins) == result["n_test"]
    mean = summary_mean({"A": parsed, "B": parsed})
    assert mean["after"]["auroc"] == pytest.approx(parsed["after"]["auroc"])
    assert mean["outcomes"]["readmission"]["after"]["brier"] == pytest.approx(second["after"]["brier"])


def test_a_reply_without_an_evaluation_is_malformed():
    with pytest.raises(ValueError, match="no evaluation"):
        parse_evaluation(MetricRecord({"withheld": 0}))


def _hand_result(*, events: int, n_test: int, negatives_basis: int) -> dict:
    """An evaluation result by hand: 0.5 everywhere, specificity resting on ``negatives_basis``."""
    metrics = {"accuracy": 0.8, "sensitivity": 0.9, "specificity": 0.7, "ppv": 0.6, "npv": 0.95,
               "prevalence": events / n_test, "auroc": 0.85, "brier": 0.1}
    basis = {"accuracy": n_test, "sensitivity": events, "specificity": negatives_basis, "ppv": 40,
             "npv": 40, "prevalence": n_test, "auroc": min(events, n_test - events), "brier": n_test}
    return {"before": dict(metrics), "after": dict(metrics), "basis": {"before": basis, "after": basis},
            "n_test": n_test, "n_train": 200, "events": events}


def test_nothing_derivable_from_the_released_numbers_rests_below_the_floor():
    """The issue's derivation: a withheld specificity followed from accuracy, sensitivity and
    prevalence. Now the confusion family goes together, and a small event count is not sent."""
    # control: the old rule (each metric on its own basis) kept accuracy, sensitivity and prevalence,
    # from which the withheld specificity follows exactly
    r = _hand_result(events=60, n_test=75, negatives_basis=15)
    acc, sens, prev = r["after"]["accuracy"], r["after"]["sensitivity"], r["after"]["prevalence"]
    assert (acc - prev * sens) / (1 - prev) == pytest.approx(0.4)  # what the attacker computes
    flat, withheld = released_metrics(r, ("o",), floor=20)
    for m in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "prevalence"):
        assert f"after.{m}" not in flat and f"before.{m}" not in flat
    assert flat["after.brier"] == 0.1 and flat["n_test"] == 75 and "after.auroc" not in flat  # 15 pairs-side
    assert "events" not in flat  # 15 non-events < 20: the event count would give it
    assert withheld > 0
    # enough of both: everything is released
    flat, _ = released_metrics(_hand_result(events=60, n_test=100, negatives_basis=40), ("o",), floor=20)
    assert {"after.accuracy", "after.specificity", "after.prevalence", "events"} <= set(flat)


def test_fixed_adaptation_settings_have_one_meaning() -> None:
    """``eval.adapt_steps = 0`` keeps θ in every path (it used to mean ``inner.steps`` for
    multi-class outcomes and in ``adapt``); Meta-SGD adapts with its own rates for inner.steps."""
    from fedmeta.common.config import load_config
    from fedmeta.common.meta.types import InnerConfig
    from fedmeta.sitecore.evaluate import fixed_inner

    cfg = load_config(None, ["eval.adapt_steps=0", "eval.adapt_lr=0.2", "eval.proximal=0.5",
                             "inner.steps=7", "inner.lr=0.03"])
    assert fixed_inner(cfg) == InnerConfig(steps=0, lr=0.2, proximal=0.5)
    assert fixed_inner(cfg, learned_rates=True) == InnerConfig(steps=7, lr=0.03, proximal=0.0)
