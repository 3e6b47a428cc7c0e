"""The stratified train/test split of one site's rows."""

from __future__ import annotations

import numpy as np

from fedmeta.common.data.partition import stratified_split


def test_stratified_split_counts() -> None:
    strata = np.array([0] * 10 + [1] * 5 + [2] * 1)
    train, test = stratified_split(strata, test_fraction=0.3, seed=0)
    # 10 -> 3 test; 5 -> floor(1.5 + 0.5) = 2 test; 1 -> 0 test
    assert np.bincount(strata[test], minlength=3).tolist() == [3, 2, 0]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(16))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)


def test_stratified_split_keeps_both_sides_for_two_rows() -> None:
    _, test = stratified_split(np.array([0, 0]), test_fraction=0.9, seed=0)
    assert test.size == 1
