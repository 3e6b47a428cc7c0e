"""The Yogi server optimiser (FedYogi, Reddi et al. 2021) against updates worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmeta.common.config import OuterConfig, load_config
from fedmeta.common.errors import ConfigError
from fedmeta.server.outer import OuterOptimizer, Yogi


def _yogi_cfg(lr: float = 0.1) -> OuterConfig:
    return OuterConfig(optimizer="yogi", lr=lr, beta1=0.9, beta2=0.99, eps=1e-3)


def test_first_step_by_hand() -> None:
    # m = 0.1 g; v = τ² + 0.01 g² (v₀ = τ² < g², so sign = -1); θ -= lr m / (√v + τ)
    opt = OuterOptimizer({"w": np.array([1.0, -2.0], dtype=np.float32)}, _yogi_cfg())
    theta = opt.step({"w": np.array([0.5, -1.0], dtype=np.float32)})
    v = np.array([1e-6 + 0.01 * 0.25, 1e-6 + 0.01 * 1.0])
    m = np.array([0.05, -0.1])
    expected = np.array([1.0, -2.0]) - 0.1 * m / (np.sqrt(v) + 1e-3)
    assert theta["w"] == pytest.approx(expected, rel=1e-5)
    # the same numbers written out: 1 - 0.1 * 0.05 / (sqrt(0.002501) + 0.001) = 0.901980...
    assert float(theta["w"][0]) == pytest.approx(1 - 0.005 / (math.sqrt(0.002501) + 0.001), rel=1e-6)


def test_second_moment_shrinks_additively_when_gradients_get_small() -> None:
    # After g = 1, v = τ² + 0.01; then g = 0.01 (g² < v): v ← v − 0.01·g², not v·0.99 as Adam does.
    opt = OuterOptimizer({"w": np.zeros(1, dtype=np.float32)}, _yogi_cfg())
    opt.step({"w": np.ones(1, dtype=np.float32)})
    opt.step({"w": np.full(1, 0.01, dtype=np.float32)})
    state = opt.state_arrays()
    v = 1e-6 + 0.01 - 0.01 * 1e-4
    assert float(state["w::exp_avg_sq"][0]) == pytest.approx(v, rel=1e-5)
    assert float(state["w::exp_avg"][0]) == pytest.approx(0.9 * 0.1 + 0.1 * 0.01, rel=1e-5)
    assert float(state["w::step"]) == 2


def test_state_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(0)
    grads = [{"w": rng.normal(size=3).astype(np.float32)} for _ in range(4)]
    a = OuterOptimizer({"w": np.ones(3, dtype=np.float32)}, _yogi_cfg())
    for g in grads[:2]:
        a.step(g)
    b = OuterOptimizer(a.params(), _yogi_cfg())
    b.load_state_arrays(a.state_arrays())
    for g in grads[2:]:
        ta, tb = a.step(g), b.step(g)
    np.testing.assert_array_equal(ta["w"], tb["w"])


def test_config_accepts_yogi_and_rejects_unknown() -> None:
    assert load_config(None, ["outer.optimizer=yogi"]).outer.optimizer == "yogi"
    with pytest.raises(ConfigError, match="outer.optimizer"):
        load_config(None, ["outer.optimizer=yogo"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0, "betas": (0.9, 0.99), "eps": 1e-3}, "lr"),
        ({"lr": 0.1, "betas": (1.0, 0.99), "eps": 1e-3}, "betas"),
        ({"lr": 0.1, "betas": (0.9, 0.99), "eps": 0.0}, "eps"),
    ],
)
def test_bad_settings_raise(kwargs: dict, match: str) -> None:
    import torch

    with pytest.raises(ValueError, match=match):
        Yogi([torch.zeros(1)], **kwargs)
