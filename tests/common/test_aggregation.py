"""Weighted aggregation, robust rules, update validation and the outer optimiser, by hand."""

import numpy as np
import pytest

from fedmeta.common.aggregation import aggregate, trimmed_mean, validate_update
from fedmeta.common.config import OuterConfig
from fedmeta.common.errors import DeltaError
from fedmeta.common.outer import OuterOptimizer
from fedmeta.common.params import clip_update


def test_reptile_outer_update_by_hand():
    # θ = [1, 2]; Δ_1 = [1, 0] with 10 examples, Δ_2 = [0, 3] with 30; β = 0.5
    # Σ w Δ / Σ w = [10/40, 90/40] = [0.25, 2.25]; θ' = θ + 0.5 * that = [1.125, 3.125]
    theta = {"w": np.array([1.0, 2.0], np.float32)}
    agg = aggregate([{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 3.0], np.float32)}], [10, 30])
    np.testing.assert_allclose(agg["w"], [0.25, 2.25])
    opt = OuterOptimizer(theta, OuterConfig(optimizer="sgd", lr=0.5))
    new = opt.step({k: -v for k, v in agg.items()})
    np.testing.assert_allclose(new["w"], [1.125, 3.125])
    assert theta["w"].tolist() == [1.0, 2.0]  # the caller's θ is not mutated


def test_momentum_and_adam_match_torch_reference():
    import torch

    theta = {"w": np.array([0.5, -1.0, 2.0], np.float32)}
    grads = [np.array([0.1, -0.2, 0.3], np.float32), np.array([-0.4, 0.5, 0.0], np.float32)]
    for cfg, ref_cls, kw in (
        (OuterConfig(optimizer="sgd", lr=0.1, momentum=0.9), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (OuterConfig(optimizer="adam", lr=0.01), torch.optim.Adam, {"lr": 0.01}),
    ):
        opt = OuterOptimizer(theta, cfg)
        p = torch.tensor(theta["w"], requires_grad=True)
        ref = ref_cls([p], **kw)
        for g in grads:
            out = opt.step({"w": g})
            p.grad = torch.tensor(g)
            ref.step()
            np.testing.assert_allclose(out["w"], p.detach().numpy(), rtol=1e-6)


def test_optimizer_state_round_trip():
    theta = {"w": np.ones(3, np.float32)}
    a = OuterOptimizer(theta, OuterConfig(optimizer="adam", lr=0.1))
    a.step({"w": np.array([1.0, 2.0, 3.0], np.float32)})
    b = OuterOptimizer(a.params(), OuterConfig(optimizer="adam", lr=0.1))
    b.load_state_arrays(a.state_arrays())
    g = {"w": np.array([-1.0, 0.5, 0.0], np.float32)}
    np.testing.assert_array_equal(a.step(g)["w"], b.step(g)["w"])


def test_median_trimmed_mean_and_clipping():
    ups = [{"w": np.array([v], np.float32)} for v in (0.5, 1.0, 2.0, 100.0)]
    assert aggregate(ups, [1, 1, 1, 1], rule="median")["w"][0] == pytest.approx(1.5)
    assert trimmed_mean(ups, 0.25)["w"][0] == pytest.approx(1.5)
    clipped, _ = clip_update({"a": np.array([3.0, 4.0], np.float32)}, 1.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)
    zero, _ = clip_update({"a": np.zeros(2, np.float32)}, 1.0)
    assert np.all(zero["a"] == 0)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"w": np.array([np.nan, 0.0], np.float32)}, r"site X: w has 1 NaN/Inf"),
        ({"w": np.array([np.inf, 0.0], np.float32)}, r"NaN/Inf"),
        ({"w": np.zeros(3, np.float32)}, r"w has shape \(3,\), expected \(2,\)"),
        ({"w": np.zeros(2, np.float64)}, r"dtype float64, expected float32"),
        ({"v": np.zeros(2, np.float32)}, r"parameter names differ"),
        ({"w": np.array([300.0, 400.0], np.float32)}, r"norm 500 exceeds validation.max_norm = 100"),
    ],
)
def test_validation_rejects_bad_updates(update, message):
    ref = {"w": np.zeros(2, np.float32)}
    with pytest.raises(DeltaError, match=message):
        validate_update(update, ref, max_norm=100.0, source="site X")


def test_outliers_are_clipped_to_the_lower_median_norm_and_others_left_alone():
    from fedmeta.common.aggregation import clip_outliers, lower_median

    ups = [{"w": np.array([v, 0.0], np.float32)} for v in (1.0, 2.0, 3.0, 3e4)]
    assert lower_median([1.0, 2.0, 3.0, 3e4]) == 2.0 and lower_median([5.0, 1e9]) == 5.0
    out = clip_outliers(ups, 4.0)  # bound 4 × 2 = 8: only the last is an outlier
    for u, o in zip(ups[:3], out[:3], strict=True):
        np.testing.assert_array_equal(u["w"], o["w"])
    np.testing.assert_allclose(out[3]["w"], [2.0, 0.0])  # scaled to the median norm, same direction
    # Two sites: the smaller norm is the reference, so one site cannot raise the bound alone.
    pair = clip_outliers([{"w": np.array([1.0], np.float32)}, {"w": np.array([-50.0], np.float32)}], 4.0)
    np.testing.assert_allclose(pair[1]["w"], [-1.0])
