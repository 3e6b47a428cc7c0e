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
from fedmeta.common.errors import ConfigError
from fedmeta.common.meta.types import InnerConfig
from fedmeta.common.models import build_model
from fedmeta.common.params import NDArrays, to_numpy


def build_model_for(cfg: ExperimentConfig, spec: DataSpec) -> nn.Module:
    """The configured network for inputs of ``spec.input_shape``.

    Tables: ``mlp`` or ``linear`` with ``spec.n_classes`` outputs. Images: ``conv4`` with
    ``tasks.ways`` outputs (episodes relabel their classes 0..ways-1), or one per meta-training
    class for an algorithm that trains a plain classifier (``head == "all_classes"``: FedAvg).
    """
    name = cfg.model.name
    if spec.kind == "tabular":
        if name == "conv4":
            raise ConfigError("model.name = conv4: needs image data; use mlp or linear for tables")
        if name == "linear":
            return build_model("linear", in_features=spec.input_shape[0], out_features=spec.n_classes)
        return build_model(
            "mlp", in_features=spec.input_shape[0], hidden=cfg.model.hidden, out_features=spec.n_classes
        )
    if name != "conv4":
        raise ConfigError(f"model.name = {name}: image data needs conv4")
    width = cfg.model.hidden[0] if cfg.model.hidden else 64
    # FedAvg trains an ordinary classifier over every meta-training class, then fine-tunes it on
    # an episode's (relabelled) classes; the episodic algorithms need ``ways`` outputs.
    head = algorithms.get(cfg.algorithm).head
    outputs = max(cfg.tasks.ways, spec.n_classes) if head == "all_classes" else cfg.tasks.ways
    return build_model("conv4", in_channels=spec.input_shape[0], hidden=width, out_features=outputs)


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
