"""Meta-SGD across hospitals: θ and per-parameter learning rates (Li, Zhou, Chen and Li 2017,
"Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

Tasks adapt with ``φ = θ − α ∘ ∇_θ L_s(θ)``, ``α`` shaped like θ and learned with it. Sites
return both meta-gradients, ``∂L_q/∂θ`` and ``∂L_q/∂α``, averaged over their meta-batches; the
coordinator broadcasts θ plus ``lr::<name>`` arrays holding α and its outer optimiser steps both,
each with its own gradient. α starts at ``inner.lr``; a site scores the learned state by adapting
with α itself (``inner.steps`` steps).
"""

from __future__ import annotations

import numpy as np

from fedmeta.common.algorithms.base import (
    Algorithm,
    MetaGradient,
    SiteWork,
    StepResult,
    averaged_meta_gradient,
)
from fedmeta.common.meta.metasgd import metasgd_step
from fedmeta.common.meta.types import TaskBatch
from fedmeta.common.params import NDArrays

PREFIX = "lr::"


def initial_rates(theta: NDArrays, cfg: object) -> NDArrays:
    """α₀: ``inner.lr`` everywhere, shaped like each parameter."""
    lr = float(cfg.inner.lr)  # type: ignore[attr-defined]
    return {k: np.full_like(v, lr) for k, v in theta.items()}


def site_step(work: SiteWork) -> StepResult:
    if not work.extra:
        raise ValueError("metasgd: the coordinator sent no learning rates (lr:: arrays)")

    def step(tasks: TaskBatch) -> MetaGradient:
        return metasgd_step(work.model, work.theta, work.extra, tasks, work.inner,
                            **work.engine_options())

    return averaged_meta_gradient(work, step)


def rate_summary(extra: NDArrays) -> dict[str, object]:
    """Mean, smallest and largest learned rate, for ``summary.json``."""
    rates = np.concatenate([v.ravel() for v in extra.values()])
    return {"learned_lr": {"mean": float(rates.mean()), "min": float(rates.min()),
                           "max": float(rates.max())}}


ALGORITHM = Algorithm(
    name="metasgd",
    title="FedMetaSGD",
    paper="Li, Zhou, Chen and Li 2017",
    update_kind="gradient",
    site_step=site_step,
    evaluation="learned_rates",
    extra_prefix=PREFIX,
    extra_state=initial_rates,
    summary=rate_summary,
    secure_aggregation="its learned per-parameter rates are extra state that a SecAgg+ round does "
                       "not carry",
)
