"""Centralised references and local adaptation for the benchmarks, on the same models.

Pooled training and a model per hospital are plain full-batch gradient descent; scoring uses the
same metrics as the sites (:func:`fedmeta.common.metrics.binary_metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from fedmeta.common import algorithms
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.experiment import build_model_for, initial_parameters
from fedmeta.common.meta.inner import adapt, forward
from fedmeta.common.meta.types import InnerConfig, Params
from fedmeta.common.metrics import binary_metrics
from fedmeta.common.params import NDArrays, from_numpy
from fedmeta.sitecore.train import labelled_rows


def model_and_init(cfg: ExperimentConfig, spec: DataSpec) -> tuple[torch.nn.Module, Params]:
    """The configured model and θ₀ (the same initialisation the federated runs start from)."""
    model = build_model_for(cfg, spec)
    return model, from_numpy(initial_parameters(cfg, spec))


def fit(model: torch.nn.Module, params: Params, x: np.ndarray, y: np.ndarray, *, steps: int, lr: float,
        proximal: float = 0.0, only: Iterable[str] | None = None) -> Params:
    """Full-batch gradient descent on the cross-entropy of ``(x, y)`` from ``params``.

    ``proximal`` adds ``λ/2 ||φ − params||²`` (a Gaussian prior centred on the starting point);
    ``only`` restricts training to the named tensors (e.g. the output bias, to refit an intercept).
    """
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    if only is None:
        return adapt(model, params, xt, yt, InnerConfig(steps=steps, lr=lr, proximal=proximal))
    keep = set(only)
    fixed = {k: v.detach() for k, v in params.items() if k not in keep}
    free = {k: v.detach().clone().requires_grad_() for k, v in params.items() if k in keep}
    for _ in range(steps):
        out = forward(model, {**fixed, **free}, xt)
        loss = torch.nn.functional.cross_entropy(out, yt)
        grads = torch.autograd.grad(loss, list(free.values()))
        with torch.no_grad():
            for (k, v), g in zip(free.items(), grads, strict=True):
                v -= lr * (g + proximal * (v - params[k].detach()))
    return {**fixed, **{k: v.detach() for k, v in free.items()}}


def score(model: torch.nn.Module, params: Params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy at 0.5, AUROC and log-loss of the positive-class probability on ``(x, y)``."""
    with torch.no_grad():
        logits = forward(model, params, torch.as_tensor(x, dtype=torch.float32))
        p = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
    return binary_metrics(np.asarray(y), p)


def adapt_state(model: torch.nn.Module, state: NDArrays, x: np.ndarray, y: np.ndarray, *,
                cfg: ExperimentConfig, steps: int, lr: float, proximal: float) -> Params:
    """Local adaptation of ``cfg``'s global state on ``(x, y)``: with the algorithm's learned rates
    (Meta-SGD, ``inner.steps`` steps), otherwise ``steps`` full-batch steps of ``lr`` pulled
    toward θ."""
    algorithm = algorithms.get(cfg.algorithm)
    theta_np, extra = algorithm.split(state)
    theta = from_numpy(theta_np)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    if algorithm.evaluation == "learned_rates":
        return adapt(model, theta, xt, yt, InnerConfig(steps=cfg.inner.steps, lr=1.0), lrs=from_numpy(extra))
    if steps == 0:
        return theta
    return adapt(model, theta, xt, yt, InnerConfig(steps=steps, lr=lr, proximal=proximal))


def training_rows(site: Site, outcome: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The site's labelled training rows for ``outcome`` (a table site)."""
    assert isinstance(site, TabularSite), f"{site.name} is not a table site"
    return labelled_rows(site, "train", outcome)


def test_rows(site: Site, outcome: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The site's labelled test rows for ``outcome`` (a table site)."""
    assert isinstance(site, TabularSite), f"{site.name} is not a table site"
    return labelled_rows(site, "test", outcome)
