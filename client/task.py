"""What a hospital computes locally, in plain PyTorch (no Flower import).

``train_update`` turns the global parameters θ into this site's update for one round (a delta for
Reptile/FedAvg, a meta-gradient for MAML-family algorithms), from tasks sampled from the site's
own training split. ``evaluate_site`` adapts θ on the site's training split and scores it on the
site's test split before and after adaptation. Both return only parameter-shaped arrays and
aggregate numbers (counts, summed losses, metrics over a whole split): never rows, labels or
per-example values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import ImageSite, Site, TabularSite
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.data.tabular_tasks import sample_tabular_tasks
from fedmeta.common.experiment import build_model_for, inner_config
from fedmeta.common.meta.engine import choose_impl, resolve_device
from fedmeta.common.meta.fedavg import local_sgd
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import InnerConfig, MetaStats, TaskBatch
from fedmeta.common.metrics import binary_metrics, multiclass_metrics
from fedmeta.common.params import NDArrays, from_numpy, to_numpy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """A site's reply for one round: parameter-shaped arrays and aggregate numbers only."""

    arrays: NDArrays
    num_examples: int
    stats: MetaStats


def sample_tasks(cfg: ExperimentConfig, site: Site, rng: np.random.Generator) -> TaskBatch:
    if isinstance(site, TabularSite):
        return sample_tabular_tasks(
            site, n_tasks=cfg.tasks.meta_batch, support=cfg.tasks.support, query=cfg.tasks.query, rng=rng
        )
    raise NotImplementedError(f"task sampling for {type(site).__name__} is not available yet")


def train_update(
    cfg: ExperimentConfig,
    spec: DataSpec,
    site: Site,
    theta: NDArrays,
    *,
    rng: np.random.Generator,
) -> Update:
    """One round of local work on ``site`` starting from the global ``theta``."""
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    params = from_numpy(theta, device=device)
    inner = inner_config(cfg)
    if cfg.algorithm == "fedavg":
        if not isinstance(site, TabularSite):
            raise NotImplementedError("FedAvg on images is not available yet")
        x = torch.from_numpy(site.x_train).to(device)
        y = torch.from_numpy(site.y_train[:, 0]).to(device)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        delta, stats = local_sgd(
            model, params, x, y,
            steps=cfg.inner.steps * cfg.tasks.meta_steps,
            lr=cfg.inner.lr,
            batch_size=cfg.tasks.support + cfg.tasks.query,
            generator=gen,
            loss="cross_entropy",
        )
        return Update(to_numpy(delta), stats.n_examples, stats)
    if cfg.algorithm == "reptile":
        impl = choose_impl(model, device, cfg.engine.impl)
        local = {k: v.clone() for k, v in params.items()}
        total: MetaStats | None = None
        for _ in range(cfg.tasks.meta_steps):
            tasks = sample_tasks(cfg, site, rng).to(device)
            delta, stats = reptile_step(model, local, tasks, inner, impl=impl)
            local = {k: local[k] + delta[k] for k in local}
            total = stats if total is None else total + stats
        assert total is not None
        update = {k: local[k] - params[k] for k in params}
        return Update(to_numpy(update), total.n_examples, total)
    raise NotImplementedError(f"algorithm {cfg.algorithm!r} is not available on the client yet")


def _predict(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (x,))
    return logits.detach().to("cpu", torch.float64).numpy()


def _score(site: Site, logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if isinstance(site, TabularSite):
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return binary_metrics(y, p[:, 1])
    return multiclass_metrics(y, logits)


def evaluate_site(
    cfg: ExperimentConfig,
    spec: DataSpec,
    site: Site,
    theta: NDArrays,
    *,
    rng: np.random.Generator,
) -> dict[str, dict[str, float] | int]:
    """Score θ on the site's test split before and after adapting it on the training split.

    Adaptation: ``eval.adapt_steps`` full-batch gradient steps of ``eval.adapt_lr`` on the training
    split (or on ``eval.shots`` patients drawn from it), with the ``eval.proximal`` pull toward θ.
    """
    if isinstance(site, ImageSite):
        raise NotImplementedError("image evaluation is not available yet")
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    params = from_numpy(theta, device=device)
    x_tr, y_tr = site.x_train, site.y_train[:, 0]
    known = y_tr >= 0
    x_tr, y_tr = x_tr[known], y_tr[known]
    if cfg.eval.shots:
        idx = rng.choice(len(y_tr), size=min(cfg.eval.shots, len(y_tr)), replace=False)
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    x_te = torch.from_numpy(site.x_test).to(device)
    y_te = site.y_test[:, 0]
    before = _score(site, _predict(model, params, x_te), y_te)
    adapted = params
    if cfg.eval.adapt_steps > 0:
        inner = InnerConfig(steps=cfg.eval.adapt_steps, lr=cfg.eval.adapt_lr, proximal=cfg.eval.proximal)
        adapted = adapt(
            model, params, torch.from_numpy(x_tr).to(device), torch.from_numpy(y_tr).to(device), inner
        )
    after = _score(site, _predict(model, adapted, x_te), y_te)
    return {"before": before, "after": after, "n_train": int(len(y_tr)), "n_test": int(len(y_te))}
