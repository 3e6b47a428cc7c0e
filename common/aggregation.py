"""Checking and combining sites' updates: pure numpy, used by every server strategy.

An update is a dict of arrays with the global parameters' names, shapes and dtype. The weighted
mean is computed from sums and an explicit weight per site (the examples it used), never as an
average of averages: ``ū = Σ_i w_i u_i / Σ_i w_i``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedmeta.common.errors import DeltaError
from fedmeta.common.params import NDArrays, clip_update, l2_norm


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float,
    source: str = "reply",
) -> float:
    """Raise :class:`DeltaError` unless ``update`` matches ``reference`` in names, shapes and dtype,
    is finite, and has L2 norm at most ``max_norm``. Returns the norm."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise DeltaError(f"{source}: parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise DeltaError(f"{source}: {name} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise DeltaError(f"{source}: {name} has dtype {arr.dtype}, expected {ref.dtype}")
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise DeltaError(f"{source}: {name} has {bad} NaN/Inf entries")
    norm = l2_norm(update)
    if norm > max_norm:
        raise DeltaError(f"{source}: update L2 norm {norm:.4g} exceeds validation.max_norm = {max_norm:g}")
    return norm


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> NDArrays:
    """``Σ_i w_i u_i / Σ_i w_i`` per array, accumulated in float64."""
    if not updates:
        raise ValueError("weighted_mean of no updates")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = {}
    for k, ref in updates[0].items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for u, w in zip(updates, weights, strict=True):
            acc += float(w) * u[k]
        out[k] = (acc / total).astype(ref.dtype)
    return out


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> NDArrays:
    """Entry-wise median of the updates (Yin et al. 2018), robust to a minority of bad sites."""
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0).astype(ref.dtype)
            for k, ref in updates[0].items()}


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim: float) -> NDArrays:
    """Entry-wise mean after dropping the ``floor(trim * n)`` smallest and largest values."""
    n = len(updates)
    cut = int(np.floor(trim * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trim {trim} leaves no update out of {n}")
    out = {}
    for k, ref in updates[0].items():
        stacked = np.sort(np.stack([u[k] for u in updates]).astype(np.float64), axis=0)
        out[k] = stacked[cut : n - cut].mean(axis=0).astype(ref.dtype)
    return out


def lower_median(values: Sequence[float]) -> float:
    """The lower median: a minority of sites cannot raise it (with two sites: the smaller)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_outliers(updates: Sequence[Mapping[str, np.ndarray]], factor: float) -> list[NDArrays]:
    """Updates whose norm exceeds ``factor`` times the round's lower-median norm ``m`` are scaled
    down to norm ``m``: an outlier then weighs no more than a typical honest update, while updates
    within the bound (every honest one, in practice) are left exactly as they are."""
    norms = [l2_norm(u) for u in updates]
    m = lower_median(norms)
    return [clip_update(u, m)[0] if m > 0 and n > factor * m else dict(u)
            for u, n in zip(updates, norms, strict=True)]


def aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    rule: str = "mean",
    trim: float = 0.1,
    clip_norm: float = 0.0,
    relative_clip: float = 0.0,
) -> NDArrays:
    """Combine validated updates by ``rule`` (mean, median, trimmed_mean), after clipping
    outliers beyond ``relative_clip`` times the round's lower-median norm (:func:`clip_outliers`)
    and every update to ``clip_norm`` (each when > 0)."""
    if relative_clip > 0 and len(updates) > 1:
        updates = clip_outliers(updates, relative_clip)
    if clip_norm > 0:
        updates = [clip_update(u, clip_norm)[0] for u in updates]
    if rule == "mean":
        return weighted_mean(updates, weights)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed_mean":
        return trimmed_mean(updates, trim)
    raise ValueError(f"unknown aggregation rule {rule!r}; use mean, median or trimmed_mean")
