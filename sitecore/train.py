"""What a hospital computes for one training round, in plain PyTorch (no Flower import).

:func:`train_update` turns the coordinator's broadcast state into this site's update, from tasks
drawn from the site's own training split, by running the experiment's algorithm's
``site_step`` (:mod:`fedmeta.common.algorithms`). It returns only parameter-shaped arrays and
sums/counts: never rows, labels or per-example values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedmeta.common import algorithms, deadline
from fedmeta.common.algorithms.base import SiteWork
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.data.episodes import EpisodeSampler
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.data.tabular_tasks import sample_tabular_tasks
from fedmeta.common.experiment import build_model_for, inner_config
from fedmeta.common.meta.engine import choose_impl, resolve_device
from fedmeta.common.meta.types import MetaStats, TaskBatch
from fedmeta.common.params import NDArrays, from_numpy, to_numpy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """A site's reply for one round: parameter-shaped arrays and aggregate numbers only."""

    arrays: NDArrays
    num_examples: int
    stats: MetaStats


def sample_tasks(cfg: ExperimentConfig, site: Site, rng: np.random.Generator, *, split: str = "train") -> TaskBatch:
    """A meta-batch from the site's training split: K/Q-patient tasks, or N-way K-shot episodes."""
    t = cfg.tasks
    if isinstance(site, TabularSite):
        return sample_tabular_tasks(site, n_tasks=t.meta_batch, support=t.support, query=t.query, rng=rng)
    x, y = (site.x_train, site.y_train) if split == "train" else (site.x_test, site.y_test)
    sampler = EpisodeSampler(x, y, n_way=t.ways, k_shot=t.support, n_query=t.query)
    return sampler.sample(t.meta_batch, rng=rng)


def labelled_rows(site: TabularSite, split: str = "train", outcome: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``split`` whose label for ``outcome`` is known, and those labels."""
    x, y = (site.x_train, site.y_train) if split == "train" else (site.x_test, site.y_test)
    known = y[:, outcome] >= 0
    return x[known], y[known, outcome]


def training_rows(site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """All labelled training rows (first outcome for tables)."""
    if isinstance(site, TabularSite):
        x, y = labelled_rows(site)
        return torch.from_numpy(x), torch.from_numpy(y)
    return torch.from_numpy(site.x_train), torch.from_numpy(site.y_train)


def _on(device: torch.device, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.to(device), y.to(device)


def class_counts(site: Site) -> dict[int, int]:
    """Training labels per class (first outcome for tables; unknown labels left out)."""
    labels = site.y_train[:, 0] if isinstance(site, TabularSite) else site.y_train
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def n_way(cfg: ExperimentConfig, site: Site) -> int:
    """Classes per task: the outcome's two for tables, ``tasks.ways`` for images."""
    return 2 if isinstance(site, TabularSite) else cfg.tasks.ways


def _checked(draw: Callable[[], TaskBatch]) -> TaskBatch:
    """A meta-batch, drawn only while the request is within its deadline (every task-based
    algorithm draws its meta-batches through here: see :mod:`fedmeta.common.deadline`)."""
    deadline.check()
    return draw()


def train_update(
    cfg: ExperimentConfig, spec: DataSpec, site: Site, state: NDArrays, *, rng: np.random.Generator
) -> Update:
    """One round of local work on ``site`` starting from the broadcast ``state``."""
    algorithm = algorithms.get(cfg.algorithm)
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, extra_np = algorithm.split(state)
    theta = from_numpy(theta_np, device=device)
    work = SiteWork(
        cfg=cfg,
        model=model,
        theta=theta,
        extra=from_numpy(extra_np, device=device),
        inner=inner_config(cfg),
        draw_tasks=lambda: _checked(lambda: sample_tasks(cfg, site, rng).to(device)),
        training_rows=lambda: _on(device, *training_rows(site)),
        impl=choose_impl(model, device, cfg.engine.impl),
        kind="tabular" if isinstance(site, TabularSite) else "images",
        n_way=n_way(cfg, site),
        class_counts=class_counts(site),
        rng=rng,
        device=device,
        site=site.name,
        outcome=site.outcomes[0] if isinstance(site, TabularSite) else "",
        compile=cfg.engine.compile,
        before_stats=cfg.engine.before_stats,
    )
    result = algorithm.site_step(work)
    arrays = algorithm.join(to_numpy(result.update), to_numpy(result.extra_update))
    return Update(arrays, result.stats.n_examples, result.stats)
