"""Splitting rows between train and test, and pooled data between simulated sites.

- :func:`stratified_split`: a seeded per-stratum train/test split of one site's rows.
- :func:`dirichlet_label_skew`: label skew across sites; for each class, its rows are shared out
  in proportions drawn from ``Dirichlet(alpha, ..., alpha)`` (Hsu, Qi and Brown 2019, "Measuring
  the Effects of Non-Identical Data Distribution for Federated Visual Classification").
  Small ``alpha`` gives each site few classes; large ``alpha`` approaches an even split.
- :func:`size_imbalance`: site sizes proportional to log-normal weights ``exp(sigma * z)``.
- :func:`leave_one_site_out`: every (training sites, held-out site) pair.

Every function returns index arrays into the pooled rows and never changes its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedmeta.common.errors import DataError


def stratified_split(
    strata: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, test), each sorted, stratified by ``strata``.

    In each stratum of ``n`` rows, ``floor(n * test_fraction + 0.5)`` rows chosen at random go
    to test, but a stratum of 2 or more rows always keeps at least one row on each side.
    The same ``strata`` and ``seed`` always give the same split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction = {test_fraction}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        n = rows.size
        n_test = int(math.floor(n * test_fraction + 0.5))
        if n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        test.append(rng.permutation(rows)[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.zeros(0, np.int64)
    train_mask = np.ones(len(strata), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def dirichlet_label_skew(
    labels: np.ndarray,
    n_sites: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Partition row indices among ``n_sites`` with Dirichlet(``alpha``) label skew.

    For each class ``c`` with rows ``I_c``: draw ``p ~ Dir(alpha 1_n)``, shuffle ``I_c`` and cut
    it at ``floor(cumsum(p) * |I_c|)``. Redrawn (up to ``max_tries``) until every site has at
    least ``min_size`` rows. Returns one sorted index array per site; together they are a
    partition of ``range(len(labels))``.
    """
    if n_sites < 1:
        raise DataError(f"dirichlet_label_skew: n_sites = {n_sites}: must be >= 1")
    if not alpha > 0:
        raise DataError(f"dirichlet_label_skew: alpha = {alpha}: must be > 0")
    if min_size * n_sites > len(labels):
        raise DataError(
            f"dirichlet_label_skew: {len(labels)} rows cannot give {n_sites} sites "
            f"at least {min_size} rows each"
        )
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        for c in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n_sites, alpha))
            cuts = np.floor(np.cumsum(p)[:-1] * rows.size).astype(int)
            for k, chunk in enumerate(np.split(rows, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(ps)).astype(np.int64) for ps in parts]
        if min(o.size for o in out) >= min_size:
            return out
    raise DataError(
        f"dirichlet_label_skew: no draw in {max_tries} gave every site {min_size} "
        f"rows (alpha {alpha}, {n_sites} sites); raise alpha or lower min_size"
    )


def size_imbalance(
    n_rows: int, n_sites: int, *, sigma: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Partition ``range(n_rows)`` at random into sites of log-normally imbalanced sizes.

    Weights ``w_k = exp(sigma * z_k)``, ``z_k ~ N(0, 1)``; sizes are ``min_size`` plus the rest
    shared in proportion to ``w`` (largest remainders get the leftover rows). ``sigma = 0``
    gives equal sizes (up to one row).
    """
    if n_sites < 1 or sigma < 0:
        raise DataError(
            f"size_imbalance: n_sites = {n_sites}, sigma = {sigma}: need n_sites >= 1 "
            "and sigma >= 0"
        )
    spare = n_rows - min_size * n_sites
    if spare < 0:
        raise DataError(
            f"size_imbalance: {n_rows} rows cannot give {n_sites} sites {min_size} rows each"
        )
    rng = np.random.default_rng(seed)
    w = np.exp(sigma * rng.standard_normal(n_sites))
    share = spare * w / w.sum()
    sizes = np.floor(share).astype(int)
    leftover = spare - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:leftover]] += 1
    sizes += min_size
    perm = rng.permutation(n_rows)
    return [np.sort(chunk).astype(np.int64) for chunk in np.split(perm, np.cumsum(sizes)[:-1])]


def leave_one_site_out(sites: Sequence[str]) -> list[tuple[tuple[str, ...], str]]:
    """``[(training sites, held-out site), ...]``, one pair per site, in the given order."""
    names = list(sites)
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"leave_one_site_out: needs at least 2 distinct sites, got {names}")
    return [(tuple(n for n in names if n != held), held) for held in names]
