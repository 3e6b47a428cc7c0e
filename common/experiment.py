"""Turning an experiment config and a data spec into a model, θ₀ and inner-loop settings.

Shared by the coordinator (which needs θ₀ and shapes but no data) and the sites.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from fedmeta.common import algorithms
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.meta.types import InnerConfig
from fedmeta.common.models import ModelSpec
from fedmeta.common.params import NDArrays, to_numpy


def build_model_for(cfg: ExperimentConfig, spec: DataSpec) -> nn.Module:
    """The configured network for inputs of ``spec.input_shape``
    (:meth:`fedmeta.common.models.ModelSpec.for_experiment`)."""
    return ModelSpec.for_experiment(cfg, spec).build()


def initial_parameters(cfg: ExperimentConfig, spec: DataSpec) -> NDArrays:
    """θ₀: the model's default initialisation under ``torch.manual_seed(cfg.seed)``."""
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, spec)
    return to_numpy(dict(model.named_parameters()))


def inner_config(cfg: ExperimentConfig) -> InnerConfig:
    """The inner loop of ``cfg`` (first order when the config or the algorithm says so)."""
    return InnerConfig(
        steps=cfg.inner.steps,
        lr=cfg.inner.lr,
        proximal=cfg.inner.proximal,
        first_order=cfg.inner.first_order or algorithms.get(cfg.algorithm).first_order,
    )


def site_rng(cfg: ExperimentConfig, site: str, server_round: int, purpose: str = "train") -> np.random.Generator:
    """The site's random stream for one round: a function of (seed, site, round, purpose) only,
    so a resumed run draws exactly the tasks an uninterrupted one would."""
    key = zlib.crc32(f"{site}|{purpose}".encode())
    return np.random.default_rng([cfg.seed, server_round, key])
