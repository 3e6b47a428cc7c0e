"""FedMetaSGD: Meta-SGD's outer update across hospitals, θ and per-parameter learning rates.

Meta-SGD (Li, Zhou, Chen and Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning") adapts with ``φ = θ − α ∘ ∇_θ L_s(θ)``, where ``α`` has θ's shape and is learned with
θ. Sites return both meta-gradients, ``∂L_q/∂θ`` and ``∂L_q/∂α``; the global state broadcast to
sites is θ plus ``lr::<name>`` arrays holding α, and the outer optimiser steps both, each with its
own gradient. α starts at ``inner.lr``.
"""

from __future__ import annotations

import numpy as np

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.experiment import LR_PREFIX
from fedmeta.common.params import NDArrays
from fedmeta.server.strategy import FedMetaStrategy


def with_learning_rates(theta: NDArrays, value: float) -> NDArrays:
    """θ plus ``lr::<name>`` arrays of ``value`` shaped like each parameter."""
    out = dict(theta)
    out.update({f"{LR_PREFIX}{k}": np.full_like(v, value) for k, v in theta.items() if not k.startswith(LR_PREFIX)})
    return out


class FedMetaSGD(FedMetaStrategy):
    name = "FedMetaSGD"
    update_kind = "gradient"

    def __init__(self, cfg: ExperimentConfig, theta: NDArrays, **kwargs: object) -> None:
        super().__init__(cfg, with_learning_rates(theta, cfg.inner.lr), **kwargs)  # type: ignore[arg-type]

    def summary_extra(self) -> dict:
        lrs = np.concatenate([v.ravel() for k, v in self.theta().items() if k.startswith(LR_PREFIX)])
        return {"learned_lr": {"mean": float(lrs.mean()), "min": float(lrs.min()), "max": float(lrs.max())}}
