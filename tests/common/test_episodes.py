"""N-way K-shot episode sampling and the meta-train / novel class split."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedmeta.common.data.episodes import EpisodeSampler, split_classes
from tests.common.reference import single_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def _data(n_classes: int = 10, per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(n_classes), per_class)
    # Each image's pixels hold its own index, so an episode's examples can be traced back.
    images = np.arange(len(labels), dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 4, 4), np.float32)
    return images, labels


def test_episode_shapes_labels_and_disjoint_support_query() -> None:
    images, labels = _data()
    sampler = EpisodeSampler(images, labels, n_way=5, k_shot=2, n_query=3)
    batch = sampler.sample(6, rng=np.random.default_rng(0))
    assert tuple(batch.xs.shape) == (6, 10, 1, 4, 4) and tuple(batch.xq.shape) == (6, 15, 1, 4, 4)
    assert batch.ys.dtype == torch.int64 and batch.xs.dtype == torch.float32
    assert batch.ys[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for t in range(6):
        s_idx = batch.xs[t, :, 0, 0, 0].long().numpy()
        q_idx = batch.xq[t, :, 0, 0, 0].long().numpy()
        assert not set(s_idx) & set(q_idx)
        # every episode label maps to one original class, the same in support and query
        mapping = {}
        for idx, y in [*zip(s_idx, batch.ys[t].tolist(), strict=True), *zip(q_idx, batch.yq[t].tolist(), strict=True)]:
            assert mapping.setdefault(y, labels[idx]) == labels[idx]
        assert len(set(mapping.values())) == 5


def test_class_subsets_keep_meta_train_and_novel_apart() -> None:
    images, labels = _data()
    train, novel = split_classes(len(np.unique(labels)), n_novel=4, seed=1)
    assert len(train) == 6 and len(novel) == 4 and not set(train) & set(novel)
    assert set(train) | set(novel) == set(range(10))
    for classes in (train, novel):
        sampler = EpisodeSampler(images, labels, classes=classes, n_way=3, k_shot=1, n_query=1)
        batch = sampler.sample(20, rng=np.random.default_rng(2))
        used = set(labels[batch.xs[:, :, 0, 0, 0].long().flatten().numpy()])
        assert used <= set(classes)


def test_sampling_is_reproducible() -> None:
    images, labels = _data()
    sampler = EpisodeSampler(images, labels, n_way=4, k_shot=1, n_query=2)
    a = sampler.sample(3, rng=np.random.default_rng(7))
    b = sampler.sample(3, rng=np.random.default_rng(7))
    assert torch.equal(a.xs, b.xs) and torch.equal(a.xq, b.xq)


def test_bad_inputs_are_rejected() -> None:
    images, labels = _data(n_classes=4, per_class=3)
    with pytest.raises(ValueError, match="class 0 has 3 examples, fewer than k_shot \\+ n_query = 2 \\+ 2"):
        EpisodeSampler(images, labels, n_way=2, k_shot=2, n_query=2)
    with pytest.raises(ValueError, match="5-way episodes need at least 5 classes, got 4"):
        EpisodeSampler(images, labels, n_way=5, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="k_shot must be an integer >= 1, got 0"):
        EpisodeSampler(images, labels, n_way=2, k_shot=0, n_query=1)
    with pytest.raises(ValueError, match="labels must be integers, got dtype float64"):
        EpisodeSampler(images, labels.astype(float), n_way=2, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="n_novel must be between 1 and 3"):
        split_classes(len(np.unique(labels)), n_novel=4, seed=0)
    with pytest.raises(ValueError, match="n_tasks must be >= 1, got 0"):
        EpisodeSampler(images, labels, n_way=2, k_shot=1, n_query=1).sample(0, rng=np.random.default_rng(0))
