"""Partitioners: stratified split, Dirichlet label skew, size imbalance, leave-one-site-out."""

from __future__ import annotations

import numpy as np
import pytest

from fedmeta.common.data.partition import (
    dirichlet_label_skew,
    leave_one_site_out,
    size_imbalance,
    stratified_split,
)
from fedmeta.common.errors import DataError


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


def test_dirichlet_partition_is_a_partition_and_skewed() -> None:
    labels = np.repeat(np.arange(4), 250)
    parts = dirichlet_label_skew(labels, 5, alpha=0.1, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    # with alpha 0.1 a site's largest class dominates: mean share of the top class > 0.6
    top = [np.bincount(labels[p], minlength=4).max() / p.size for p in parts if p.size]
    assert float(np.mean(top)) > 0.6
    even = dirichlet_label_skew(labels, 5, alpha=1000.0, seed=0)
    top_even = [np.bincount(labels[p], minlength=4).max() / p.size for p in even]
    assert max(top_even) < 0.3


def test_dirichlet_min_size_and_seed() -> None:
    labels = np.repeat(np.arange(3), 20)
    a = dirichlet_label_skew(labels, 4, alpha=0.5, seed=3, min_size=5)
    b = dirichlet_label_skew(labels, 4, alpha=0.5, seed=3, min_size=5)
    assert all(p.size >= 5 for p in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(DataError, match="cannot give 4 sites at least 20 rows"):
        dirichlet_label_skew(labels, 4, alpha=0.5, seed=0, min_size=20)
    with pytest.raises(DataError, match="alpha = 0"):
        dirichlet_label_skew(labels, 4, alpha=0, seed=0)


def test_size_imbalance() -> None:
    parts = size_imbalance(100, 4, sigma=0.0, seed=0)
    assert [p.size for p in parts] == [25, 25, 25, 25]
    skew = size_imbalance(1000, 5, sigma=1.5, seed=1, min_size=10)
    sizes = [p.size for p in skew]
    assert sum(sizes) == 1000 and min(sizes) >= 10 and max(sizes) > 3 * min(sizes)
    assert sorted(np.concatenate(skew).tolist()) == list(range(1000))
    with pytest.raises(DataError, match="cannot give 5 sites 300 rows each"):
        size_imbalance(1000, 5, sigma=1.0, seed=0, min_size=300)


def test_leave_one_site_out() -> None:
    assert leave_one_site_out(["a", "b", "c"]) == [
        (("b", "c"), "a"),
        (("a", "c"), "b"),
        (("a", "b"), "c"),
    ]
    with pytest.raises(DataError, match="at least 2 distinct sites"):
        leave_one_site_out(["a", "a"])
