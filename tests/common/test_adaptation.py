"""The adaptation policy: candidates, cross-validation, refit, calibration, threshold, shots."""

import doctest

import numpy as np
import pytest
import torch

import fedmeta.common.adaptation as A
from fedmeta.common.adaptation import (
    AdaptationSettings,
    Candidate,
    adapt_with_policy,
    cv_folds,
    describe_shots,
    positive_logit,
    predict_logit,
    repeated_shots,
    stratified_shots,
    support_head,
)
from fedmeta.common.errors import DataError
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.matching import MATCHING
from fedmeta.common.meta.protonet import PROTOTYPES
from fedmeta.common.meta.relation import RELATION
from fedmeta.common.meta.types import InnerConfig
from fedmeta.common.models import build_model, init_params


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _site(n: int, seed: int, *, prevalence: float = 0.4, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.linspace(-1, 1, d, dtype=torch.float64)
    logit = x @ w + float(np.log(prevalence / (1 - prevalence)))
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)).long()
    return x, y


def _mlp(d: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("mlp", in_features=d, hidden=(8,), out_features=2).double()
    return model, init_params(model)


def test_fold_trajectories_match_inner_adapt():
    model, theta = _mlp()
    x, y = _site(30, 1)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :7] = False  # fold 1 fits on rows 7..29
    traj, _ = A._trajectories(model, theta, list(theta), x, y, mask, lr=0.1, proximal=0.3,
                              record=[3, 10], lrs=None)
    for steps in (3, 10):
        for f, rows in ((0, slice(None)), (1, slice(7, None))):
            ref = adapt(model, theta, x[rows], y[rows], InnerConfig(steps=steps, lr=0.1, proximal=0.3))
            want = positive_logit(torch.func.functional_call(model, ref, (x,)))
            assert torch.allclose(traj[steps][f], want, atol=1e-10), (steps, f)


def test_metasgd_rates_replace_the_step_size():
    model, theta = _mlp()
    x, y = _site(20, 2)
    ones = torch.ones(1, 20, dtype=torch.bool)
    lrs = {k: torch.full_like(v, 0.07) for k, v in theta.items()}
    a, _ = A._trajectories(model, theta, list(theta), x, y, ones, lr=0.07, proximal=0.0, record=[5], lrs=None)
    b, _ = A._trajectories(model, theta, list(theta), x, y, ones, lr=1.0, proximal=0.0, record=[5], lrs=lrs)
    assert torch.allclose(a[5], b[5], atol=1e-12)


def test_last_layer_scope_moves_only_the_output_layer():
    model, theta = _mlp()
    x, y = _site(25, 3)
    st = AdaptationSettings()
    s0 = predict_logit(model, theta, x)
    phi = A._refit(model, theta, x, y, Candidate("last", 20, 0.0), st, None, s0, y.numpy().astype(float))
    changed = {k for k in theta if not torch.equal(theta[k], phi[k])}
    assert changed == {"net.2.weight", "net.2.bias"}


def test_intercept_only_recovers_a_shifted_prevalence_by_hand():
    model = build_model("linear", in_features=3, out_features=2).double()
    theta = {k: torch.zeros_like(v) for k, v in init_params(model).items()}  # every risk 0.5
    x = torch.randn(50, 3, dtype=torch.float64)
    y = torch.tensor([1] * 10 + [0] * 40)
    st = AdaptationSettings(scopes=("none", "intercept"), proximal=(0.0,), calibration="none")
    res = adapt_with_policy(model, theta, x, y, settings=st, rng=np.random.default_rng(0))
    assert res.choice == Candidate("intercept", 0, 0.0)
    bias = res.params["linear.bias"]
    assert abs(float(bias[1] - bias[0]) - np.log(0.2 / 0.8)) < 1e-9  # logit of the prevalence
    risk = 1 / (1 + np.exp(-predict_logit(model, res.params, x)))
    assert abs(risk.mean() - 0.2) < 1e-9
    none, chosen = res.row(Candidate("none")), res.row(res.choice)
    assert abs(none.log_loss - np.log(2)) < 1e-12 and chosen.log_loss < none.log_loss


@pytest.mark.parametrize("rule", ["min", "1se"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_choice_is_never_worse_than_not_adapting_on_the_cv_criterion(rule, seed):
    model, theta = _mlp(seed=seed)
    x, y = _site(24, 10 + seed, prevalence=0.3)
    st = AdaptationSettings(max_steps=40, rule=rule, min_refit_events=0)
    res = adapt_with_policy(model, theta, x, y, settings=st, rng=np.random.default_rng(seed))
    none = res.row(Candidate("none"))
    assert res.row(res.choice).log_loss <= none.log_loss
    best = min(r.log_loss for r in res.cv)
    if rule == "min":
        assert res.row(res.choice).log_loss == best
    scopes = {r.candidate.scope for r in res.cv}
    assert scopes == {"none", "intercept", "last", "all"}
    assert len(res.cv) == 1 + 3 + 2 * len(st.steps) * 3


def test_leave_one_out_with_few_labels_and_repeated_folds_with_many():
    st = AdaptationSettings()
    rng = np.random.default_rng(0)
    masks, reps, scheme = cv_folds(np.array([0, 1] * 5), st, rng)
    assert scheme == "leave-one-out, 10 folds" and masks.shape == (10, 10) and not masks.diagonal().any()
    y = np.array([0] * 70 + [1] * 30)
    masks, reps, scheme = cv_folds(y, st, rng)
    assert scheme == "3 x stratified 5-fold" and masks.shape == (15, 100)
    for r in range(3):
        held = ~masks[reps == r]
        assert (held.sum(axis=0) == 1).all()  # every row held out once per repeat
        assert all(abs(int(h[y == 1].sum()) - 6) <= 1 for h in held)  # stratified: 30/5 events
    _, _, scheme = cv_folds(np.array([0] * 97 + [1] * 3), st, rng)
    assert scheme.startswith("leave-one-out")  # too few events for 5 folds


def test_policy_uses_loo_at_k10_and_thresholds_calibrated_oof_risks():
    model, theta = _mlp()
    x, y = _site(10, 4, prevalence=0.5)
    res = adapt_with_policy(model, theta, x, y, settings=AdaptationSettings(max_steps=20),
                            rng=np.random.default_rng(0))
    assert res.scheme == "leave-one-out, 10 folds" and res.n == 10
    assert res.class_counts == (int((y == 0).sum()), int((y == 1).sum()))
    assert res.calibration.method == "intercept"  # < 10 per class: no Platt slope
    assert res.threshold.policy == "prevalence" and res.threshold.value == int(y.sum()) / 10
    assert res.oof_risk.shape == (10,) and any("very few patients" in w for w in res.warnings)
    # fewer than 10 in the smaller class: only "do not adapt" and "intercept only" compete
    assert {r.candidate.scope for r in res.cv} == {"none", "intercept"}
    summary = res.summary()
    assert summary["choice"]["scope"] == res.choice.scope and len(summary["cv"]) == len(res.cv)


def test_youden_and_sensitivity_policies_and_platt_with_enough_events():
    model, theta = _mlp()
    x, y = _site(80, 5, prevalence=0.4)
    for policy in ("youden", "sensitivity:0.9"):
        res = adapt_with_policy(model, theta, x, y, rng=np.random.default_rng(1),
                                settings=AdaptationSettings(max_steps=20, threshold=policy))
        assert res.threshold.policy == policy and res.scheme == "3 x stratified 5-fold"
        assert res.calibration.method in ("platt", "intercept")
        if policy.startswith("sensitivity"):
            assert res.threshold.sensitivity >= 0.9


def test_a_single_class_keeps_theta_and_warns():
    model, theta = _mlp()
    x, _ = _site(8, 6)
    res = adapt_with_policy(model, theta, x, torch.ones(8, dtype=torch.long), rng=np.random.default_rng(0))
    assert res.choice.scope == "none" and res.threshold.value == 0.5 and "all 8" in res.warnings[0]
    assert res.calibration.method == "intercept" and abs(res.oof_risk.mean() - 9 / 10) < 1e-8  # (8+1)/(8+2)
    assert all(torch.equal(res.params[k], theta[k]) for k in theta)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"scopes": ("none", "bias")}, "unknown scope"),
    ({"proximal": (-1.0,)}, "proximal strengths"),
    ({"rule": "best"}, "rule must be"),
    ({"threshold": "median"}, "unknown threshold policy"),
    ({"folds": 1}, "folds >= 2"),
    ({"step_fractions": (0.0,)}, "step_fractions"),
    ({"min_refit_events": -1}, "min_refit_events"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptationSettings(**kwargs)


def test_bad_labels_are_refused():
    model, theta = _mlp()
    x, _ = _site(4, 0)
    with pytest.raises(DataError, match="0/1 outcomes"):
        adapt_with_policy(model, theta, x, torch.tensor([0, 1, 2, 1]), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="4 rows but 3 labels"):
        adapt_with_policy(model, theta, x, torch.tensor([0, 1, 1]), rng=np.random.default_rng(0))


def test_stratified_shots_hold_every_class_in_proportion():
    rng = np.random.default_rng(0)
    y = np.array([1] * 31 + [0] * 969)  # 3.1 % prevalence
    for _ in range(20):
        idx = stratified_shots(y, 10, rng)
        assert len(set(idx.tolist())) == 10 and int(y[idx].sum()) == 1
    assert int(y[stratified_shots(y, 100, rng)].sum()) == 3  # 100 x 0.031 = 3.1
    half = np.array([0, 1] * 20)
    assert int(half[stratified_shots(half, 10, rng)].sum()) == 5
    three = np.repeat([0, 1, 2], [50, 30, 20])
    counts = np.bincount(three[stratified_shots(three, 10, rng, classes=(0, 1, 2))], minlength=3)
    assert counts.tolist() == [5, 3, 2]
    assert sorted(stratified_shots(half, 50, rng).tolist()) == list(range(40))
    assert describe_shots(half[:10]) == "10 labelled patients: 5 with the outcome, 5 without"


def test_stratified_shots_refuse_an_absent_class_or_too_few_shots():
    with pytest.raises(DataError, match=r"class 1 is absent \(class counts 0: 20, 1: 0\)"):
        stratified_shots(np.zeros(20, dtype=int), 10, np.random.default_rng(0), outcome="mortality")
    with pytest.raises(DataError, match="need at least 2 patients"):
        stratified_shots(np.array([0, 1, 0]), 1, np.random.default_rng(0))


def test_prototype_head_means_and_leave_one_out_scores():
    torch.manual_seed(0)
    model = build_model("mlp", in_features=4, hidden=(6, 3), out_features=None).double()
    params = init_params(model)
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.tensor([0, 1] * 6)
    head = support_head(PROTOTYPES, model, params, x, y, threshold="prevalence")
    z = torch.func.functional_call(model, params, (x,))
    assert torch.allclose(head.memory["prototypes"][1], z[y == 1].mean(dim=0))
    assert head.class_counts == (6, 6) and head.threshold is not None and head.threshold.value == 0.5
    # the leave-one-out scores behind the calibration, by hand: patient 0 against the prototypes
    # of the other eleven (c_0 = mean of the other five of its class)
    c0, c1 = z[2:12:2].mean(dim=0), z[y == 1].mean(dim=0)
    s0 = -((z[0] - c1) ** 2).sum() + ((z[0] - c0) ** 2).sum()
    loo = support_head(PROTOTYPES, model, params, x[1:], y[1:], threshold="prevalence")
    assert torch.allclose(loo.memory["prototypes"][0], c0)
    assert float(head.logits(model, params, x[:1])[0, 1] - head.logits(model, params, x[:1])[0, 0]) != float(s0)
    assert float(loo.logits(model, params, x[:1])[0, 1] - loo.logits(model, params, x[:1])[0, 0]) == pytest.approx(float(s0))
    with pytest.raises(DataError, match="every class"):
        support_head(PROTOTYPES, model, params, x, torch.zeros(12, dtype=torch.long))


@pytest.mark.parametrize("metric", [MATCHING, RELATION], ids=lambda m: m.name)
def test_support_heads_score_as_the_episode_does(metric):
    """A site's classifier built from its support set scores new rows exactly as an episode with
    that support set scores its queries (the training objective's scores)."""
    torch.manual_seed(0)
    model = (build_model("relation-mlp", in_features=4, hidden=(6,), embed=3) if metric is RELATION
             else build_model("mlp", in_features=4, hidden=(6, 3), out_features=None)).double()
    params = init_params(model)
    x, y, xq = torch.randn(12, 4, dtype=torch.float64), torch.tensor([0, 1] * 6), torch.randn(5, 4, dtype=torch.float64)
    head = support_head(metric, model, params, x, y, threshold="prevalence")
    want = metric.logits(model, params, x, y, xq, n_way=2)
    assert torch.allclose(head.logits(model, params, xq), want)
    assert head.calibration.method in ("platt", "intercept") and head.threshold is not None


def test_docstring_example_runs():
    assert doctest.testmod(A, raise_on_error=False).failed == 0


def test_repeated_shots_are_independent_stratified_draws():
    y = np.array([1] * 12 + [0] * 88)
    draws = repeated_shots(y, 10, 5, np.random.default_rng(0))
    assert len(draws) == 5 and all(int(y[d].sum()) == 1 and len(d) == 10 for d in draws)
    assert len({tuple(sorted(d.tolist())) for d in draws}) == 5
    with pytest.raises(ValueError, match="n_draws must be >= 1"):
        repeated_shots(y, 10, 0, np.random.default_rng(0))


def test_score_adaptation_reports_before_and_after_with_the_summary_keys():
    from sklearn.metrics import roc_auc_score

    model, theta = _mlp()
    x, y = _site(40, 8, prevalence=0.4)
    res = adapt_with_policy(model, theta, x[:20], y[:20], rng=np.random.default_rng(0),
                            settings=AdaptationSettings(max_steps=10))
    out = A.score_adaptation(model, theta, res, x[20:], y[20:].numpy(), rng=np.random.default_rng(1), n_boot=20)
    assert set(out["before"]) == set(out["after"]) == {"accuracy", "auroc", "loss"}
    p_after = res.calibration.apply(predict_logit(model, res.params, x[20:]))
    assert abs(out["after"]["auroc"] - roc_auc_score(y[20:].numpy(), p_after)) < 1e-12
    assert out["clinical"]["after"]["threshold"] == res.threshold.value and out["n_test"] == 20
