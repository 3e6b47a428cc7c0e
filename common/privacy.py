"""Differential privacy for site updates: L2 clipping, Gaussian noise and an RDP accountant.

A site's update (a Reptile delta ``Δ = φ − θ`` or a meta-gradient) is a dict of arrays, treated
as one flat vector. Each round every participating site

1. clips it to L2 norm at most ``C``:  ``Δ̃ = Δ · min(1, C / ‖Δ‖₂)``  (:func:`clip_update`), and
2. adds Gaussian noise ``N(0, σ_site² I)``  (:func:`add_gaussian_noise`).

With ``σ_site = z · C`` (``z`` = ``noise_multiplier``) each site's release is the Gaussian mechanism
of sensitivity ``C``: the site is protected even from the coordinator (local DP). When the sum is
formed under secure aggregation the noise can be split: each of ``n`` sites adds
``σ_site = z · C / √n`` and the aggregate carries ``N(0, z² C² I)``, which protects any one site's
contribution to the released sum by the same ``(ε, δ)`` (:func:`site_noise_std`).

Accounting (site-level adjacency: one hospital's data in or out changes the clipped sum by at most
``C``): one round is the Gaussian mechanism with noise multiplier ``z``, subsampled with
probability ``q`` when only a fraction of sites is asked each round. Its Rényi DP at order ``α`` is
``α / (2 z²)`` for ``q = 1`` (Mironov 2017, "Rényi Differential Privacy"); RDP adds up over rounds,
and the conversion to ``(ε, δ)`` is Balle et al. 2020 ("Hypothesis testing interpretations and
Rényi DP"), as in Google's ``dp-accounting``::

    ε(T) = min_α [ T α / (2 z²) + log((α − 1)/α) − (log δ + log α) / (α − 1) ]

:func:`epsilon` uses ``dp_accounting.rdp.RdpAccountant`` (which also handles ``q < 1``);
:func:`gaussian_rdp_epsilon` is the closed form above for ``q = 1``, kept as an independent check.

>>> round(epsilon(rounds=10, noise_multiplier=1.0, delta=1e-5), 2)
19.05
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from fedmeta.common.params import ClipStats, NDArrays, clip_update

__all__ = [
    "RDP_ORDERS", "ClipStats", "add_gaussian_noise", "clip_update", "composed_epsilon", "epsilon",
    "epsilon_per_round", "gaussian_rdp_epsilon", "privatize", "site_noise_std",
]

# Orders used by dp-accounting's default (and by this module's closed form).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)


def add_gaussian_noise(
    update: Mapping[str, np.ndarray], std: float, *, rng: np.random.Generator | None = None
) -> NDArrays:
    """Return ``update + N(0, std² I)`` (new arrays, same dtypes), noise drawn in float64 from
    ``rng`` (default: a generator seeded from :mod:`secrets`)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return {k: np.array(v, copy=True) for k, v in update.items()}
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    out: NDArrays = {}
    for k, v in update.items():
        arr = np.asarray(v)
        out[k] = (arr + rng.standard_normal(arr.shape) * std).astype(arr.dtype)
    return out


def site_noise_std(clip: float, noise_multiplier: float, *, n_sites: int = 1,
                   distributed: bool = False) -> float:
    """Noise std one site adds: ``z·C`` (local DP) or ``z·C/√n`` (distributed under SecAgg)."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    std = noise_multiplier * clip
    return std / math.sqrt(n_sites) if distributed else std


def privatize(
    update: Mapping[str, np.ndarray],
    *,
    clip: float,
    noise_multiplier: float,
    seed: int | None = None,
    n_sites: int = 1,
    distributed: bool = False,
) -> tuple[NDArrays, ClipStats]:
    """Clip then add noise: what a site does to its update before sending it.

    The noise seed comes from :mod:`secrets` unless ``seed`` is given (tests only): the
    experiment's seed is known to the coordinator, so noise drawn from it could be subtracted.
    """
    clipped, stats = clip_update(update, clip)
    std = site_noise_std(clip, noise_multiplier, n_sites=n_sites, distributed=distributed)
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    return add_gaussian_noise(clipped, std, rng=rng), stats


def epsilon(
    *, rounds: int, noise_multiplier: float, delta: float, sampling_rate: float = 1.0
) -> float:
    """ε after ``rounds`` rounds of the (subsampled) Gaussian mechanism, at ``delta``.

    Uses ``dp_accounting``'s RDP accountant. ``noise_multiplier == 0`` gives ``inf``.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    event: dp_event.DpEvent = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_event.PoissonSampledDpEvent(sampling_rate, event)
    # Fractional orders do not converge for the subsampled mechanism; integers suffice there.
    orders = list(RDP_ORDERS) if sampling_rate == 1 else [float(a) for a in RDP_ORDERS if a >= 2
                                                          and float(a).is_integer()]
    accountant = rdp_privacy_accountant.RdpAccountant(orders)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def composed_epsilon(releases: Sequence[tuple[int, float]], *, delta: float) -> float:
    """ε at ``delta`` of several runs together: ``releases`` holds each run's ``(rounds,
    noise_multiplier)`` (every round taking part, no subsampling).

    The runs are composed in RDP, not by adding their ε: RDP adds up over any sequence of
    mechanisms, adaptive ones included, so the total Rényi divergence at order ``α`` is
    ``Σ_i T_i α / (2 z_i²)``, converted to ``(ε, δ)`` once, as :func:`epsilon` does for one run.
    This is never above the sum of the runs' own ε at the same δ (that sum is the looser bound of
    basic composition, which also spends δ once per run) and is usually far below it: ten runs of
    10 rounds at ``z = 1`` are ε = 96.1 at δ = 1e-5 composed, 190.5 summed. One run alone gives
    exactly :func:`epsilon`. ``noise_multiplier <= 0`` in any run gives ``inf``.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if any(int(t) < 0 for t, _ in releases):
        raise ValueError(f"rounds must be >= 0, got {min(int(t) for t, _ in releases)}")
    spent = [(int(t), float(z)) for t, z in releases if int(t) > 0]
    if not spent:
        return 0.0
    if any(z <= 0 for _, z in spent):
        return math.inf
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    for t, z in spent:
        accountant.compose(dp_event.GaussianDpEvent(z), t)
    return float(accountant.get_epsilon(delta))


def epsilon_per_round(
    *, rounds: int, noise_multiplier: float, delta: float, sampling_rate: float = 1.0
) -> list[float]:
    """``[ε(1), …, ε(rounds)]``: what the server reports after each round."""
    return [
        epsilon(rounds=t, noise_multiplier=noise_multiplier, delta=delta,
                sampling_rate=sampling_rate)
        for t in range(1, rounds + 1)
    ]


def gaussian_rdp_epsilon(
    *, rounds: int, noise_multiplier: float, delta: float,
    orders: Sequence[float] = RDP_ORDERS,
) -> float:
    """Closed-form ε for ``q = 1`` (formula in the module docstring); independent of dp-accounting."""
    if noise_multiplier <= 0:
        return math.inf
    best = math.inf
    for a in orders:
        if a <= 1:
            continue
        rdp = rounds * a / (2.0 * noise_multiplier**2)
        eps = rdp + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)
