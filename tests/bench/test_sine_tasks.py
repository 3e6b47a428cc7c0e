"""The sine task family, and the meta-learning sanity check: a MAML initialisation adapts to new
sines from 10 points far better than a random or a jointly trained one."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedmeta.bench.sine import SineSettings, compare
from fedmeta.bench.sine_tasks import sample_sine_tasks
from tests.common.reference import single_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def test_tasks_follow_the_family() -> None:
    batch, amplitude, phase = sample_sine_tasks(50, k_shot=10, n_query=7, rng=np.random.default_rng(0))
    assert tuple(batch.xs.shape) == (50, 10, 1) and tuple(batch.yq.shape) == (50, 7)
    assert batch.xs.dtype == torch.float32 and batch.ys.dtype == torch.float32
    assert ((amplitude >= 0.1) & (amplitude <= 5.0)).all() and ((phase >= 0) & (phase <= np.pi)).all()
    x = torch.cat([batch.xs, batch.xq], dim=1).squeeze(-1).double()
    y = torch.cat([batch.ys, batch.yq], dim=1).double()
    assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
    expected = torch.from_numpy(amplitude)[:, None] * torch.sin(x - torch.from_numpy(phase)[:, None])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_and_rejects_bad_sizes() -> None:
    a, _, _ = sample_sine_tasks(3, k_shot=2, n_query=2, rng=np.random.default_rng(5))
    b, _, _ = sample_sine_tasks(3, k_shot=2, n_query=2, rng=np.random.default_rng(5))
    assert torch.equal(a.xs, b.xs) and torch.equal(a.yq, b.yq)
    with pytest.raises(ValueError, match="k_shot must be an integer >= 1, got 0"):
        sample_sine_tasks(3, k_shot=0, n_query=2, rng=np.random.default_rng(0))


def test_meta_learned_initialisation_beats_random_and_joint_training() -> None:
    result = compare(SineSettings(meta_iters=500, eval_tasks=100, seed=0))
    # Measured here: meta-learned ≈ 0.73, joint ≈ 1.9, random ≈ 3.9 (query MSE after 10 steps).
    assert result["meta-learned"] < 0.6 * result["joint"]
    assert result["meta-learned"] < 0.6 * result["random"]
    assert result["joint"] < result["random"]
