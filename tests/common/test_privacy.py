"""Differential privacy: exact clipping, noise of the right scale, ε against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import chi2, norm

from fedmeta.common.params import l2_norm
from fedmeta.common.privacy import (
    add_gaussian_noise,
    clip_update,
    epsilon,
    epsilon_per_round,
    gaussian_rdp_epsilon,
    privatize,
    site_noise_std,
)


def _update() -> dict[str, np.ndarray]:
    # ‖(3, 4)‖ = 5 and ‖12‖ = 12 -> global norm sqrt(9 + 16 + 144) = 13.
    return {"w": np.array([3.0, 4.0], np.float32), "b": np.array([12.0], np.float32)}


def test_l2_norm_is_global_over_tensors() -> None:
    assert l2_norm(_update()) == pytest.approx(13.0, abs=1e-12)


def test_clip_scales_to_exact_norm() -> None:
    clipped, stats = clip_update(_update(), 6.5)
    assert stats.norm == pytest.approx(13.0)
    assert stats.factor == pytest.approx(0.5)
    assert stats.clipped
    assert l2_norm(clipped) == pytest.approx(6.5, rel=1e-7)
    np.testing.assert_allclose(clipped["w"], [1.5, 2.0], rtol=1e-7)
    np.testing.assert_allclose(clipped["b"], [6.0], rtol=1e-7)


def test_clip_leaves_small_and_zero_updates_and_never_mutates() -> None:
    u = _update()
    out, stats = clip_update(u, 100.0)
    assert stats.factor == 1.0 and not stats.clipped
    np.testing.assert_array_equal(out["w"], u["w"])
    out["w"][0] = 99.0
    assert u["w"][0] == 3.0  # the caller's arrays are untouched
    zero, zstats = clip_update({"w": np.zeros(3)}, 1.0)
    assert zstats.norm == 0.0 and zstats.factor == 1.0
    assert np.all(zero["w"] == 0)


def test_clip_rejects_non_positive_bound() -> None:
    with pytest.raises(ValueError, match="clip must be > 0"):
        clip_update(_update(), 0.0)


def test_noise_std_is_statistically_right() -> None:
    # 200k draws of N(0, 0.3²): the sample variance lies in the 99.9 % chi-square interval.
    n, std = 200_000, 0.3
    g = np.random.default_rng(1234)
    noised = add_gaussian_noise({"w": np.zeros(n)}, std, rng=g)["w"]
    var = float(noised.var(ddof=1))
    lo = std**2 * chi2.ppf(0.0005, n - 1) / (n - 1)
    hi = std**2 * chi2.ppf(0.9995, n - 1) / (n - 1)
    assert lo < var < hi
    assert abs(float(noised.mean())) < 4 * std / math.sqrt(n)


def test_noise_is_reproducible_with_a_seed_and_zero_std_is_identity() -> None:
    a = add_gaussian_noise(_update(), 1.0, rng=np.random.default_rng(7))
    b = add_gaussian_noise(_update(), 1.0, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a["w"], b["w"])
    assert a["w"].dtype == np.float32
    same = add_gaussian_noise(_update(), 0.0)
    np.testing.assert_array_equal(same["b"], _update()["b"])
    with pytest.raises(ValueError, match="noise std must be >= 0"):
        add_gaussian_noise(_update(), -1.0)


def test_distributed_noise_sums_to_central_noise() -> None:
    # n sites each adding z·C/√n: the sum's std is z·C.
    n, z, c = 4, 1.2, 0.5
    per_site = site_noise_std(c, z, n_sites=n, distributed=True)
    assert per_site == pytest.approx(z * c / 2)
    assert math.sqrt(n * per_site**2) == pytest.approx(site_noise_std(c, z))
    total = sum(
        privatize({"w": np.zeros(50_000)}, clip=c, noise_multiplier=z, seed=site,
                  n_sites=n, distributed=True)[0]["w"]
        for site in range(n)
    )
    assert float(total.std()) == pytest.approx(z * c, rel=0.02)


def test_epsilon_matches_closed_form_rdp() -> None:
    for rounds, z in [(1, 1.0), (2, 1.0), (10, 1.0), (30, 2.0), (100, 0.8)]:
        assert epsilon(rounds=rounds, noise_multiplier=z, delta=1e-5) == pytest.approx(
            gaussian_rdp_epsilon(rounds=rounds, noise_multiplier=z, delta=1e-5), rel=1e-9
        )


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018, analytic Gaussian mechanism (sensitivity 1): tight ε for one round."""

    def delta_of(eps: float) -> float:
        return float(norm.cdf(-eps * sigma + 1 / (2 * sigma))
                     - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma)))

    return float(brentq(lambda e: delta_of(e) - delta, 1e-6, 100.0))


def test_epsilon_one_round_is_an_upper_bound_close_to_the_exact_gaussian() -> None:
    exact = _exact_gaussian_epsilon(1.0, 1e-5)
    rdp = epsilon(rounds=1, noise_multiplier=1.0, delta=1e-5)
    # dp-accounting's PLD accountant (a separate, tight method) gives 4.37718 for this case.
    assert exact == pytest.approx(4.37718, abs=1e-4)
    assert exact <= rdp <= exact + 0.5
    assert rdp == pytest.approx(4.7285, abs=1e-3)


def test_epsilon_is_monotone_in_rounds_and_noise_and_sampling() -> None:
    eps = epsilon_per_round(rounds=20, noise_multiplier=1.1, delta=1e-5)
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert epsilon(rounds=5, noise_multiplier=2.0, delta=1e-5) < epsilon(
        rounds=5, noise_multiplier=1.0, delta=1e-5
    )
    assert epsilon(rounds=5, noise_multiplier=1.0, delta=1e-5, sampling_rate=0.3) < epsilon(
        rounds=5, noise_multiplier=1.0, delta=1e-5
    )
    assert epsilon(rounds=0, noise_multiplier=1.0, delta=1e-5) == 0.0
    assert epsilon(rounds=3, noise_multiplier=0.0, delta=1e-5) == math.inf


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rounds": -1, "noise_multiplier": 1.0, "delta": 1e-5}, "rounds must be >= 0"),
        ({"rounds": 1, "noise_multiplier": 1.0, "delta": 0.0}, "delta must be in"),
        ({"rounds": 1, "noise_multiplier": 1.0, "delta": 1e-5, "sampling_rate": 0.0},
         "sampling_rate must be in"),
    ],
)
def test_epsilon_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        epsilon(**kwargs)  # type: ignore[arg-type]


def test_privatize_clips_noises_and_keeps_dtype() -> None:
    arrays = {"w": np.array([3.0, 4.0], dtype=np.float32), "b": np.array([12.0], dtype=np.float32)}
    out, stats = privatize(arrays, clip=6.5, noise_multiplier=0.0, seed=1)
    assert stats.factor == pytest.approx(0.5)
    np.testing.assert_allclose(out["w"], [1.5, 2.0], rtol=1e-6)
    assert out["w"].dtype == np.float32 and arrays["w"][0] == 3.0
    a, _ = privatize(arrays, clip=1.0, noise_multiplier=1.0)
    b, _ = privatize(arrays, clip=1.0, noise_multiplier=1.0)
    assert not np.allclose(a["w"], b["w"])  # unseeded: fresh secret noise each call


def test_runs_compose_in_rdp_below_their_summed_epsilon() -> None:
    """Across runs the RDP adds up: ten runs of 10 rounds at z = 1 are one run of 100 rounds
    (ε = 96.1 at δ = 1e-5), against 190.5 for the ten runs' ε summed; runs of different noise
    match the closed form at the summed RDP, T₁/z₁² + T₂/z₂² = 1/z_eff²."""
    from fedmeta.common.privacy import composed_epsilon

    one = epsilon(rounds=10, noise_multiplier=1.0, delta=1e-5)
    assert composed_epsilon([(10, 1.0)], delta=1e-5) == pytest.approx(one, rel=1e-12)
    ten = composed_epsilon([(10, 1.0)] * 10, delta=1e-5)
    assert ten == pytest.approx(epsilon(rounds=100, noise_multiplier=1.0, delta=1e-5), rel=1e-12)
    assert ten == pytest.approx(96.12, abs=0.01) and 10 * one == pytest.approx(190.54, abs=0.01)
    z_eff = (30 / 2.0**2 + 10 / 1.0**2) ** -0.5
    assert composed_epsilon([(30, 2.0), (10, 1.0)], delta=1e-5) == pytest.approx(
        gaussian_rdp_epsilon(rounds=1, noise_multiplier=z_eff, delta=1e-5), rel=1e-9)
    assert composed_epsilon([], delta=1e-5) == 0.0
    assert composed_epsilon([(3, 0.0)], delta=1e-5) == float("inf")
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        composed_epsilon([(-1, 1.0)], delta=1e-5)
