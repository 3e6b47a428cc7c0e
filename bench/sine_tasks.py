"""The sine-wave regression family (Finn et al. 2017, §5.1), the canonical meta-learning sanity check.

A task is ``y = A sin(x − φ)`` with amplitude ``A ~ U[0.1, 5]`` and phase ``φ ~ U[0, π]``; inputs
``x ~ U[−5, 5]``. A model that meta-learns the family can fit a new sine from 10 points in a few
gradient steps; a random initialisation or a model trained jointly on all tasks (which learns the
mean function, close to 0) cannot.

Example::

    >>> import numpy as np
    >>> batch, amp, phase = sample_sine_tasks(4, k_shot=10, n_query=20, rng=np.random.default_rng(0))
    >>> tuple(batch.xs.shape), tuple(batch.yq.shape), bool((amp >= 0.1).all() and (amp <= 5).all())
    ((4, 10, 1), (4, 20), True)
"""

from __future__ import annotations

import numpy as np
import torch

from fedmeta.common.meta.types import TaskBatch

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


def sine_values(x: np.ndarray, amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """``A sin(x − φ)`` with ``A``, ``φ`` of shape (T,) broadcast over ``x`` (T, n)."""
    return amplitude[:, None] * np.sin(x - phase[:, None])


def sample_sine_tasks(
    n_tasks: int,
    *,
    k_shot: int,
    n_query: int,
    rng: np.random.Generator,
    dtype: torch.dtype = torch.float32,
) -> tuple[TaskBatch, np.ndarray, np.ndarray]:
    """``n_tasks`` sine tasks with ``k_shot`` support and ``n_query`` query points each.

    Returns the :class:`TaskBatch` (inputs (T, n, 1), float targets (T, n)) and each task's
    amplitude and phase.
    """
    for name, value, low in (("n_tasks", n_tasks, 1), ("k_shot", k_shot, 1), ("n_query", n_query, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    amplitude = rng.uniform(*AMPLITUDE, size=n_tasks)
    phase = rng.uniform(*PHASE, size=n_tasks)
    x = rng.uniform(*X_RANGE, size=(n_tasks, k_shot + n_query))
    y = sine_values(x, amplitude, phase)
    xt = torch.as_tensor(x, dtype=dtype).unsqueeze(-1)
    yt = torch.as_tensor(y, dtype=dtype)
    batch = TaskBatch(xt[:, :k_shot], yt[:, :k_shot], xt[:, k_shot:], yt[:, k_shot:])
    return batch, amplitude, phase
