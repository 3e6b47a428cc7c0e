"""How a hospital scores the coordinator's state on its own test split, before and after local
adaptation, in plain PyTorch (no Flower import).

How a site adapts depends on the algorithm's ``evaluation`` (:mod:`fedmeta.common.algorithms`):
``finetune`` takes full-batch gradient steps (their number chosen on the site's own training
rows), ``learned_rates`` adapts with Meta-SGD's learned per-parameter rates, ``prototypes``
classifies by class prototypes of the site's labelled examples. Results are metrics over whole
splits and counts: never rows, labels or per-example values.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from fedmeta.common import algorithms
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import ImageSite, Site
from fedmeta.common.data.episodes import EpisodeSampler
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.experiment import build_model_for
from fedmeta.common.meta.engine import resolve_device
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.protonet import protonet_logits
from fedmeta.common.meta.types import InnerConfig, Params
from fedmeta.common.metrics import binary_metrics, multiclass_metrics
from fedmeta.common.params import NDArrays, from_numpy, to_numpy
from fedmeta.sitecore.train import training_rows

log = logging.getLogger(__name__)


def _predict(model: nn.Module, params: Params, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (x,))
    return logits.detach().to("cpu", torch.float64).numpy()


def _binary_scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return binary_metrics(y, p[:, 1])


def choose_adapt_steps(
    cfg: ExperimentConfig, model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *,
    rng: np.random.Generator,
) -> int:
    """How many adaptation steps to take, chosen on the site's own rows only.

    With ``eval.validation_fraction`` = f > 0 and enough rows of each class, the adaptation rows
    are split into ``k = round(1/f)`` stratified folds; for each candidate step count (0 and a
    geometric grid up to ``eval.adapt_steps``) θ is adapted on k−1 folds and scored on the held-out
    one, and the count with the lowest summed held-out log-loss is returned (ties: fewer steps).
    Otherwise ``eval.adapt_steps``.
    """
    e = cfg.eval
    labels = y.cpu().numpy()
    classes, counts = np.unique(labels, return_counts=True)
    k = max(2, int(round(1 / e.validation_fraction))) if e.validation_fraction > 0 else 0
    if k == 0 or len(classes) < 2 or counts.min() < k:
        return e.adapt_steps
    fold = np.empty(len(labels), dtype=np.int64)
    for c in classes:  # stratified fold assignment
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % k
    grid = sorted({0, *(int(round(e.adapt_steps * f)) for f in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0))})
    losses = np.zeros(len(grid))
    for f in range(k):
        fit_idx = torch.from_numpy(np.flatnonzero(fold != f)).to(x.device)
        val_idx = torch.from_numpy(np.flatnonzero(fold == f)).to(x.device)
        for g, steps in enumerate(grid):
            fitted = params if steps == 0 else adapt(
                model, params, x[fit_idx], y[fit_idx], InnerConfig(steps=steps, lr=e.adapt_lr, proximal=e.proximal))
            with torch.no_grad():
                logits = torch.func.functional_call(model, fitted, (x[val_idx],))
                losses[g] += float(torch.nn.functional.cross_entropy(logits, y[val_idx], reduction="sum"))
    return grid[int(np.argmin(losses))]  # argmin takes the first (fewest steps) on ties


def _present_class_logits(model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor,
                          xq: torch.Tensor, n_way: int = 2) -> np.ndarray:
    """ProtoNet logits where a class with no support example gets probability 0 (a site whose
    training split holds one class can still be scored)."""
    present = [c for c in range(n_way) if bool((ys == c).any())]
    remap = torch.full((n_way,), -1, dtype=torch.long, device=ys.device)
    remap[present] = torch.arange(len(present), device=ys.device)
    with torch.no_grad():
        if len(present) == 1:
            sub = torch.zeros(len(xq), 1, dtype=torch.float64)
        else:
            sub = protonet_logits(model, params, xs, remap[ys], xq, n_way=len(present)).to("cpu", torch.float64)
    out = np.full((len(xq), n_way), -1e9)
    out[:, present] = sub.numpy()
    return out


def evaluate_site(
    cfg: ExperimentConfig, spec: DataSpec, site: Site, state: NDArrays, *, rng: np.random.Generator,
    keep_params: bool = False,
) -> dict:
    """Score the global state on the site's test split before and after local adaptation.

    Tables: adaptation is up to ``eval.adapt_steps`` full-batch steps of ``eval.adapt_lr`` on the
    training split (or on ``eval.shots`` patients of it), pulled toward θ by ``eval.proximal``,
    the number of steps chosen on held-out training rows (:func:`choose_adapt_steps`);
    Meta-SGD adapts with its learned rates instead (``inner.steps`` steps). ProtoNets compute class
    prototypes: "before" from ``tasks.support`` labelled patients, "after" from the whole training
    split. Images: few-shot episodes drawn from the site's test split (see
    :func:`evaluate_episodes`). ``keep_params`` adds the adapted parameters under ``"params"``
    (for a new hospital to keep; the ClientApp never sends them).
    """
    if isinstance(site, ImageSite):
        return evaluate_episodes(cfg, spec, site, state, rng=rng)
    algorithm = algorithms.get(cfg.algorithm)
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, extra_np = algorithm.split(state)
    params = from_numpy(theta_np, device=device)
    x_tr, y_tr = training_rows(site)
    if cfg.eval.shots:
        idx = torch.from_numpy(rng.choice(len(y_tr), size=min(cfg.eval.shots, len(y_tr)), replace=False))
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    x_te = torch.from_numpy(site.x_test).to(device)
    y_te = site.y_test[:, 0]
    adapted = params
    steps = 0
    if algorithm.evaluation == "prototypes":
        k = min(cfg.tasks.support, len(y_tr))
        few = torch.from_numpy(rng.choice(len(y_tr), size=k, replace=False)).to(device)
        before = _binary_scores(_present_class_logits(model, params, x_tr[few], y_tr[few], x_te), y_te)
        after = _binary_scores(_present_class_logits(model, params, x_tr, y_tr, x_te), y_te)
    else:
        before = _binary_scores(_predict(model, params, x_te), y_te)
        if algorithm.evaluation == "learned_rates":
            inner = InnerConfig(steps=cfg.inner.steps, lr=cfg.inner.lr)
            steps = cfg.inner.steps
            adapted = adapt(model, params, x_tr, y_tr, inner, lrs=from_numpy(extra_np, device=device))
        elif cfg.eval.adapt_steps > 0:
            steps = choose_adapt_steps(cfg, model, params, x_tr, y_tr, rng=rng)
            adapted = params if steps == 0 else adapt(
                model, params, x_tr, y_tr, InnerConfig(steps=steps, lr=cfg.eval.adapt_lr, proximal=cfg.eval.proximal))
        after = _binary_scores(_predict(model, adapted, x_te), y_te)
    result = {"before": before, "after": after, "n_train": int(len(y_tr)), "n_test": int(len(y_te)),
              "adapt_steps": int(steps)}  # the number of steps this site chose (provenance)
    if keep_params and algorithm.evaluation != "prototypes":
        result["params"] = to_numpy(adapted)
    return result


def evaluate_episodes(
    cfg: ExperimentConfig, spec: DataSpec, site: ImageSite, state: NDArrays, *, rng: np.random.Generator,
    n_episodes: int = 20,
) -> dict[str, dict[str, float] | int]:
    """Few-shot accuracy on ``n_episodes`` ``ways``-way episodes from the site's test split (of
    its novel classes when ``data.novel_classes`` > 0).

    "before": θ applied to the query images with no adaptation (gradient methods) or prototypes
    from one shot per class (ProtoNets); "after": adapted on the K-shot support set with
    ``inner.steps`` steps (Meta-SGD: its learned rates), or prototypes from all K shots. Metrics
    pool every query of every episode (sums and counts, not a mean of episode means).
    """
    algorithm = algorithms.get(cfg.algorithm)
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, extra_np = algorithm.split(state)
    params = from_numpy(theta_np, device=device)
    t = cfg.tasks
    if cfg.data.novel_classes > 0:  # score adaptation to classes never seen in meta-training
        from fedmeta.common.data.images import load_novel_site

        site = load_novel_site(cfg.data, site.name)
    sampler = EpisodeSampler(site.x_test, site.y_test, n_way=t.ways, k_shot=t.support, n_query=t.query)
    eps = sampler.sample(n_episodes, rng=rng).to(device)
    lrs = from_numpy(extra_np, device=device) if algorithm.evaluation == "learned_rates" else None
    labels: list[np.ndarray] = []
    logits: dict[str, list[np.ndarray]] = {"before": [], "after": []}
    for i in range(eps.n_tasks):
        xs, ys, xq = eps.xs[i], eps.ys[i], eps.xq[i]
        labels.append(eps.yq[i].cpu().numpy())
        if algorithm.evaluation == "prototypes":
            one = torch.stack([torch.nonzero(ys == c)[0, 0] for c in range(t.ways)])
            with torch.no_grad():
                zb = protonet_logits(model, params, xs[one], ys[one], xq, n_way=t.ways)
                za = protonet_logits(model, params, xs, ys, xq, n_way=t.ways)
            logits["before"].append(zb.cpu().double().numpy())
            logits["after"].append(za.cpu().double().numpy())
            continue
        logits["before"].append(_predict(model, params, xq))
        inner = InnerConfig(steps=cfg.eval.adapt_steps or cfg.inner.steps, lr=cfg.eval.adapt_lr)
        if lrs is not None:
            inner = InnerConfig(steps=cfg.inner.steps, lr=cfg.inner.lr)
        adapted = adapt(model, params, xs, ys, inner, lrs=lrs)
        logits["after"].append(_predict(model, adapted, xq))
    y = np.concatenate(labels)
    out: dict[str, dict[str, float] | int] = {}
    for phase, parts in logits.items():
        scores = multiclass_metrics(y, np.concatenate(parts))
        out[phase] = {"accuracy": scores["accuracy"], "auroc": float("nan"), "loss": scores["loss"]}
    out["n_train"] = int(site.n_train)
    out["n_test"] = int(site.n_test)
    return out
