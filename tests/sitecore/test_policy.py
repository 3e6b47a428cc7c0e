"""The hospital's policy: what its node refuses, with messages that hold rules and counts only."""

from __future__ import annotations

import pytest

from fedmeta.common.config import load_config
from fedmeta.common.data.registry import load_site
from fedmeta.common.yamlio import validate
from fedmeta.sitecore.policy import PolicyRefusal, SitePolicy, check_experiment, check_sizes


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, ["algorithm=reptile", *overrides])


def test_defaults_allow_the_default_experiment() -> None:
    policy = SitePolicy()
    assert policy.min_patients == 20 and "reptile" in policy.algorithms and not policy.require_dp
    cfg = _cfg()
    check_experiment(policy, cfg)
    site = load_site(cfg.data, "Cleveland")  # 200 training, 104 test patients
    check_sizes(policy, cfg, site, phase="train")
    check_sizes(policy, cfg, site, phase="evaluate")


@pytest.mark.parametrize(("policy", "overrides", "message"), [
    ({"algorithms": ["reptile"]}, ["algorithm=maml"], r"algorithm 'maml' is not allowed here \(allowed: reptile\)"),
    ({"max_rounds": 10}, ["rounds=11"], r"rounds = 11 exceeds this site's max_rounds = 10"),
    ({"require_dp": True, "max_epsilon": 10.0, "dp_epsilon_budget": 50.0}, [], r"requires differential privacy"),
    ({"require_dp": True, "max_epsilon": 5.0, "dp_epsilon_budget": 50.0}, ["privacy.dp=true", "rounds=30"],
     r"the run's ε = .* after 30 rounds \(at δ = 1e-05\) exceeds this site's max_epsilon = 5"),
    ({}, ["eval.shots=5"], r"eval.shots = 5 is below this site's min_patients = 20"),
])
def test_experiments_a_site_does_not_allow_are_refused(policy: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(PolicyRefusal, match=message):
        check_experiment(validate(SitePolicy, policy, source="node.yaml"), _cfg(*overrides))


def test_secure_aggregation_needs_the_sites_consent() -> None:
    with pytest.raises(PolicyRefusal, match="secure aggregation runs are not allowed"):
        check_experiment(SitePolicy(allow_secure_aggregation=False), _cfg(), secure_aggregation=True)


def test_a_one_patient_test_split_is_refused_with_counts_only() -> None:
    cfg = _cfg("data.test_fraction=0.005")
    site = load_site(cfg.data, "Switzerland")
    assert site.n_test == 1
    with pytest.raises(PolicyRefusal) as err:
        check_sizes(SitePolicy(), cfg, site, phase="evaluate")
    assert str(err.value) == "the test split would hold 1 patients, below this site's min_patients = 20"
    check_sizes(SitePolicy(), cfg, site, phase="train")  # training on 45 patients is fine


def test_small_tasks_and_small_fedavg_rounds_are_refused() -> None:
    cfg = _cfg("tasks.support=5", "tasks.query=5")
    site = load_site(cfg.data, "Cleveland")
    with pytest.raises(PolicyRefusal, match=r"a task of support \+ query = 10 patients, below this site"):
        check_sizes(SitePolicy(), cfg, site, phase="train")
    fedavg = _cfg("algorithm=fedavg", "fedavg.local_steps=1", "fedavg.batch_size=8")
    with pytest.raises(PolicyRefusal, match="a FedAvg round would use 8 patients"):
        check_sizes(SitePolicy(), fedavg, site, phase="train")
    check_sizes(SitePolicy(min_patients=8), fedavg, site, phase="train")


def test_dp_that_is_not_dp_is_refused() -> None:
    """The hollow-DP symptoms: no ceiling, no noise, a δ of the coordinator's choosing."""
    from fedmeta.common.errors import ConfigError
    from fedmeta.common.privacy import epsilon

    with pytest.raises(ConfigError, match="require_dp needs max_epsilon"):
        validate(SitePolicy, {"require_dp": True, "dp_epsilon_budget": 100.0}, source="node.yaml")
    policy = SitePolicy(require_dp=True, max_epsilon=50.0, dp_epsilon_budget=100.0)
    with pytest.raises(PolicyRefusal, match="privacy.noise_multiplier = 0 adds no noise"):
        check_experiment(policy, _cfg("privacy.dp=true", "privacy.noise_multiplier=0"))
    with pytest.raises(PolicyRefusal, match="privacy.delta = 0.9 exceeds this site's dp_delta = 1e-05"):
        check_experiment(policy, _cfg("privacy.dp=true", "privacy.delta=0.9"))
    # ε is the site's, at its own δ: σ = 1 over 30 rounds is 39.8 at 1e-5 (14.2 at δ = 0.9)
    eps = epsilon(rounds=30, noise_multiplier=1.0, delta=1e-5)
    assert 39 < eps < 41
    with pytest.raises(PolicyRefusal, match=r"ε = 39.8 after 30 rounds \(at δ = 1e-05\) exceeds this site's max_epsilon = 20"):
        check_experiment(SitePolicy(require_dp=True, max_epsilon=20.0, dp_epsilon_budget=100.0),
                         _cfg("privacy.dp=true", "rounds=30"))
    check_experiment(policy, _cfg("privacy.dp=true", "rounds=30"))  # within 50


def test_the_epsilon_budget_is_required_with_require_dp_and_never_defaulted() -> None:
    """A per-run ceiling alone holds per run, and runs are unlimited: require_dp without a budget
    across runs is an error when node.yaml is read, and a budget without require_dp (a run
    without DP would spend nothing against it) is one too."""
    from fedmeta.common.errors import ConfigError

    with pytest.raises(ConfigError, match="require_dp needs dp_epsilon_budget: max_epsilon holds per run"):
        validate(SitePolicy, {"require_dp": True, "max_epsilon": 10.0}, source="node.yaml")
    with pytest.raises(ConfigError, match="dp_epsilon_budget needs require_dp: true"):
        validate(SitePolicy, {"dp_epsilon_budget": 10.0}, source="node.yaml")
    with pytest.raises(ConfigError, match="dp_epsilon_budget"):
        validate(SitePolicy, {"require_dp": True, "max_epsilon": 10.0, "dp_epsilon_budget": 0},
                 source="node.yaml")
    assert SitePolicy().dp_epsilon_budget is None  # DP optional: no budget, none needed
    policy = validate(SitePolicy, {"require_dp": True, "max_epsilon": 10.0, "dp_epsilon_budget": 40.0},
                      source="node.yaml")
    assert policy.dp_epsilon_budget == 40.0


def test_a_site_requiring_dp_releases_no_glm_sums() -> None:
    """The federated GLM's gradient and Hessian sums carry no noise: a site requiring DP refuses
    the algorithm at the greeting."""
    policy = SitePolicy(require_dp=True, max_epsilon=50.0, dp_epsilon_budget=100.0)
    with pytest.raises(PolicyRefusal, match="requires differential privacy, and the federated GLM's sums carry no noise"):
        check_experiment(policy, load_config(None, ["algorithm=glm", "model.name=linear", "privacy.dp=true"]))
    check_experiment(SitePolicy(), load_config(None, ["algorithm=glm", "model.name=linear"]))


@pytest.mark.parametrize(("overrides", "message"), [
    (["inner.steps=15000"], r"inner.steps = 15000 exceeds this site's max_inner_steps = 100"),
    (["algorithm=fedavg", "fedavg.local_steps=5000"], r"fedavg.local_steps = 5000 exceeds this site's max_inner_steps"),
    (["eval.adapt_steps=100000"], r"eval.adapt_steps = 100000 exceeds this site's max_adapt_steps = 1000"),
    (["tasks.meta_batch=1000"], r"tasks.meta_batch x tasks.meta_batches = 1000 exceeds this site's max_tasks = 256"),
    (["eval.bootstrap=100000"], r"eval.bootstrap = 100000 exceeds this site's max_bootstrap = 2000"),
    (["engine.threads=64"], r"engine.threads = 64 exceeds this site's max_threads = 4"),
    (["eval.repeats=300"], r"eval.folds x eval.repeats = 1500 exceeds this site's max_cv_fits = 30"),
])
def test_resource_ceilings_refuse_before_any_data_is_read(overrides: list[str], message: str) -> None:
    with pytest.raises(PolicyRefusal, match=message):
        check_experiment(SitePolicy(), _cfg(*overrides))


def test_a_model_too_large_is_refused_counted_not_built() -> None:
    from fedmeta.sitecore.policy import parameter_count

    cfg = _cfg("model.hidden=[8000, 8000]")
    site = load_site(cfg.data, "Cleveland")  # 13 features
    assert parameter_count(cfg, 13) == (13 * 8000 + 8000) + (8000 * 8000 + 8000) + (8000 * 2 + 2)
    # a Relation Network's relation module (2·8000 -> 16 -> 1) counts too
    relation = _cfg("model.hidden=[8000, 8000]", "algorithm=relation")
    assert parameter_count(relation, 13) == (13 * 8000 + 8000) + (8000 * 8000 + 8000) + (16000 * 16 + 16) + (16 + 1)
    with pytest.raises(PolicyRefusal, match=r"the model has 64136002 parameters, more than this site's "
                                            r"max_parameters = 2000000"):
        check_sizes(SitePolicy(), cfg, site, phase="train")
    from fedmeta.common.data.registry import data_spec
    from fedmeta.common.experiment import build_model_for

    for model in (["model.hidden=[64, 64]"], ["model.hidden=[16]"], ["model.name=linear"],
                  ["algorithm=relation"], ["algorithm=relation", "model.hidden=[8, 4, 3]"]):
        built = build_model_for(_cfg(*model), data_spec(cfg.data))
        assert parameter_count(_cfg(*model), 13) == sum(p.numel() for p in built.parameters())


def test_the_patient_floor_has_one_reader_and_fails_closed_on_a_malformed_value() -> None:
    from fedmeta.common.errors import ConfigError
    from fedmeta.protocol import keys as K
    from fedmeta.sitecore.policy import patient_floor

    assert patient_floor({K.MIN_PATIENTS: 20}) == 20 and patient_floor({K.MIN_PATIENTS: "25"}) == 25
    with pytest.raises(ConfigError, match="node config has no min-patients"):
        patient_floor({"partition-id": 0})  # a node with no floor releases nothing (fails closed)
    assert patient_floor({"partition-id": 0, K.MIN_PATIENTS: K.SIMULATED_FLOOR}) == 1
    for bad in ("twenty", 0, -3, "1.5"):
        with pytest.raises(ConfigError, match="min-patients"):
            patient_floor({K.MIN_PATIENTS: bad})


def test_the_splits_are_the_site_s_own_not_the_coordinator_s() -> None:
    """A test fraction raised by one patient's share adds exactly one patient to the test split:
    two evaluations then differ by that patient's outcome. The site refuses any split but its own."""
    cfg = _cfg("data.test_fraction=0.34")
    site = load_site(cfg.data, "Cleveland")
    nested = load_site(_cfg("data.test_fraction=0.3433").data, "Cleveland")
    assert nested.n_test == site.n_test + 1  # control: the coordinator's nudge adds one patient
    check_experiment(SitePolicy(), cfg)
    for overrides in (["data.test_fraction=0.3433"], ["data.split_seed=44"]):
        with pytest.raises(PolicyRefusal, match=r"are not this site's splits \(0.34, 43\)"):
            check_experiment(SitePolicy(), _cfg(*overrides))
    with pytest.raises(PolicyRefusal, match=r"data.validation_fraction = 0.26 is not one of this site's \(0.25\)"):
        check_experiment(SitePolicy(), _cfg("data.score_on=validation", "data.validation_fraction=0.26"))
    check_experiment(SitePolicy(), _cfg("data.score_on=validation"))
