"""Splitting one site's rows between training and test: :func:`stratified_split`, a seeded
per-stratum split that returns index arrays and never changes its inputs."""

from __future__ import annotations

import math

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
