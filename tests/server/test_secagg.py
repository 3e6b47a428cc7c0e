"""SecAgg+ carries the sites' updates: the securely aggregated mean equals the plain weighted mean,
and the outer step follows the algorithm's direction."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedmeta.common.config import OuterConfig
from fedmeta.server.secagg import SecAggSettings, SecureMean, secagg_settings

SHAPES = [(13, 8), (8,), (8, 2), (2,)]
N_SITES = 4


def _site_delta(pid: int) -> tuple[list[np.ndarray], int]:
    rng = np.random.default_rng(100 + pid)
    delta = [rng.normal(0, 0.01, s) for s in SHAPES]
    return delta, 20 * (pid + 1)  # sites of 20, 40, 60, 80 examples


def test_settings_fit_the_modulus_and_bound() -> None:
    s = secagg_settings(n_sites=4, l2_bound=0.5, max_examples=1000)
    assert s.num_shares == 4 and s.reconstruction_threshold == 3
    assert s.clipping_range == 0.5 and s.max_weight == 1000.0
    assert 4 * s.quantization_range < s.modulus_range == 2**32
    assert s.quantization_range == 2**28
    assert s.resolution == pytest.approx(1.0 / 2**28)
    with pytest.raises(ValueError, match="at least 3 sites"):
        secagg_settings(n_sites=2, l2_bound=1.0, max_examples=10)
    with pytest.raises(ValueError, match="dropout_tolerance must be in"):
        secagg_settings(n_sites=3, l2_bound=1.0, max_examples=10, dropout_tolerance=2)


def _fit(arrays: list[np.ndarray]) -> FitRes:
    return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), 10, {})


def test_sgd_outer_step_is_reptiles_and_adam_is_honoured() -> None:
    theta = [np.array([1.0, 2.0]), np.array([[0.5]])]
    mean = [np.array([0.2, -0.4]), np.array([[1.0]])]
    sgd = SecureMean(theta=theta, outer=OuterConfig(lr=0.5), min_sites=3)
    params, metrics = sgd.aggregate_fit(1, [(None, _fit(mean))], [])  # type: ignore[list-item]
    np.testing.assert_allclose(sgd.theta[0], [1.1, 1.8])  # θ + β Δ̄, β = 0.5
    np.testing.assert_allclose(sgd.theta[1], [[1.0]])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [1.1, 1.8])
    np.testing.assert_allclose(theta[0], [1.0, 2.0])  # untouched
    assert metrics == {"num-sites": 1, "num-examples": 10}
    # Adam's first step moves every coordinate by lr in the direction of Δ̄ (m̂/√v̂ = sign).
    adam = SecureMean(theta=theta, outer=OuterConfig(optimizer="adam", lr=0.1), min_sites=3)
    adam.aggregate_fit(1, [(None, _fit(mean))], [])  # type: ignore[list-item]
    np.testing.assert_allclose(adam.theta[0], [1.1, 1.9], atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        sgd.aggregate_fit(2, [(None, _fit([np.zeros(3), np.zeros((1, 1))]))], [])  # type: ignore[list-item]


@pytest.mark.ray
def test_secaggplus_mean_of_deltas_equals_plain_weighted_mean() -> None:
    import sys

    import ray.cloudpickle
    from flwr.simulation import run_simulation

    # Ray workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    from fedmeta.client.secagg import make_secagg_client_app
    from fedmeta.server.secagg import SecureMean, make_secagg_server_app

    def local_delta(msg, context):  # type: ignore[no-untyped-def]
        delta, n = _site_delta(int(context.node_config["partition-id"]))
        return delta, n, None  # no bounds of its own: the app's l2_bound applies

    deltas = [_site_delta(p) for p in range(N_SITES)]
    total = sum(n for _, n in deltas)
    plain = [sum(d[i] * n for d, n in deltas) / total for i in range(len(SHAPES))]
    unweighted = [sum(d[i] for d, _ in deltas) / N_SITES for i in range(len(SHAPES))]

    seen: list[tuple[int, list[np.ndarray]]] = []
    theta0 = [np.zeros(s) for s in SHAPES]
    strategy = SecureMean(theta=theta0, outer=OuterConfig(lr=1.0), min_sites=N_SITES,
                             on_round=lambda r, mean, th: seen.append((r, mean)))
    settings = secagg_settings(n_sites=N_SITES, l2_bound=0.5, max_examples=100)
    run_simulation(
        server_app=make_secagg_server_app(strategy, rounds=2, settings=settings),
        client_app=make_secagg_client_app(local_delta, l2_bound=0.5),
        num_supernodes=N_SITES,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    assert [r for r, _ in seen] == [1, 2]
    tol = 4 * settings.resolution * settings.max_weight / 20  # a few steps, rescaled by weight
    for _, mean in seen:
        for got, want, unw in zip(mean, plain, unweighted, strict=True):
            np.testing.assert_allclose(got, want, atol=tol, rtol=0)
            assert np.max(np.abs(got - unw)) > 100 * tol  # the weighting really happened
    for got, want in zip(strategy.theta, plain, strict=True):
        np.testing.assert_allclose(got, 2 * want, atol=2 * tol, rtol=0)


def test_settings_dataclass_is_frozen() -> None:
    s = SecAggSettings(num_shares=3, reconstruction_threshold=2, clipping_range=1.0,
                       quantization_range=2**20, max_weight=10.0)
    with pytest.raises(AttributeError):
        s.num_shares = 4  # type: ignore[misc]


def test_a_mean_meta_gradient_is_stepped_against() -> None:
    theta = [np.array([1.0, 2.0])]
    mean = [np.array([0.2, -0.4])]
    sgd = SecureMean(theta=theta, outer=OuterConfig(lr=0.5), min_sites=3, update_kind="gradient")
    sgd.aggregate_fit(1, [(None, _fit(mean))], [])  # type: ignore[list-item]
    np.testing.assert_allclose(sgd.theta[0], [0.9, 2.2])  # θ − β ḡ
    with pytest.raises(ValueError, match="update_kind"):
        SecureMean(theta=theta, outer=OuterConfig(), min_sites=3, update_kind="hessian")


def test_which_algorithms_secure_aggregation_carries_is_the_records_word() -> None:
    from fedmeta.common import algorithms
    from fedmeta.common.config import load_config
    from fedmeta.common.data.registry import data_spec
    from fedmeta.server.secagg_app import refusal, settings_for

    def cfg_for(name: str):  # type: ignore[no-untyped-def]
        return load_config(None, [f"algorithm={name}"] + (["model.name=linear"] if name == "glm" else []))

    spec = data_spec(load_config(None, []).data)
    carried = {a for a in algorithms.names() if refusal(cfg_for(a), spec) is None}
    assert carried == {"reptile", "maml", "fomaml", "protonet", "matching", "matching-fce", "relation"}
    for name, words in (("fedavg", "weighted by the site's training rows"), ("metasgd", "learned per-parameter rates"),
                        ("glm", "Hessian sums"), ("auto", "chooses among candidates")):
        why = refusal(cfg_for(name), spec)
        assert why is not None and words in why
    meds = load_config(None, ["algorithm=reptile", "data.source=synth-meds"])
    assert "agree on their features" in str(refusal(meds, data_spec(meds.data)))
    # a site's weight is bounded by what its algorithm's reply may claim: one round's task examples
    cfg = load_config(None, ["algorithm=maml", "tasks.meta_batch=4", "tasks.meta_batches=2",
                             "tasks.support=10", "tasks.query=15"])
    assert settings_for(cfg, spec, 4).max_weight == 4 * 2 * 25


def test_an_algorithm_that_cannot_be_carried_must_say_why() -> None:
    from fedmeta.common.algorithms.base import Algorithm

    with pytest.raises(ValueError, match="say why"):
        Algorithm(name="x", title="x", paper="x", update_kind="gradient", site_step=lambda w: None,  # type: ignore[arg-type,return-value]
                  procedure="newton")
