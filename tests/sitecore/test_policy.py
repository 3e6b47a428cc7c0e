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
    ({"require_dp": True}, [], r"requires differential privacy"),
    ({"require_dp": True, "max_epsilon": 5.0}, ["privacy.dp=true", "rounds=30"],
     r"the run's ε = .* after 30 rounds exceeds this site's max_epsilon = 5"),
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
    with pytest.raises(PolicyRefusal, match=r"a task of support \+ query = 10 patients is below"):
        check_sizes(SitePolicy(), cfg, site, phase="train")
    fedavg = _cfg("algorithm=fedavg", "fedavg.local_steps=1", "fedavg.batch_size=8")
    with pytest.raises(PolicyRefusal, match="a FedAvg round would use 8 patients"):
        check_sizes(SitePolicy(), fedavg, site, phase="train")
    check_sizes(SitePolicy(min_patients=8), fedavg, site, phase="train")
