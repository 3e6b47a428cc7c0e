"""What a hospital computes locally, in plain PyTorch (no Flower import).

``train_update`` turns the global state into this site's update for one round, from tasks sampled
from the site's own training split:

- ``reptile``: ``Δ = θ_local − θ`` after Reptile steps (Nichol et al. 2018);
- ``maml`` / ``fomaml``: the meta-gradient of the query loss after support adaptation (Finn et al.
  2017), second or first order;
- ``metasgd``: meta-gradients for θ and for the learned per-parameter rates (Li et al. 2017);
- ``protonet``: the gradient of the episodes' prototype-classification loss (Snell et al. 2017);
- ``fedavg``: ``Δ`` after plain minibatch SGD on the training rows (McMahan et al. 2017).

``evaluate_site`` scores the global state on the site's test split before and after local
adaptation. Both return only parameter-shaped arrays and aggregate numbers (counts, summed losses,
metrics over a whole split): never rows, labels or per-example values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import ImageSite, Site, TabularSite
from fedmeta.common.data.episodes import EpisodeSampler
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.data.tabular_tasks import sample_tabular_tasks
from fedmeta.common.experiment import LR_PREFIX, build_model_for, inner_config
from fedmeta.common.meta.engine import choose_impl, resolve_device
from fedmeta.common.meta.fedavg import local_sgd
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.metasgd import metasgd_step
from fedmeta.common.meta.protonet import protonet_logits, protonet_step
from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import InnerConfig, MetaStats, Params, TaskBatch
from fedmeta.common.metrics import binary_metrics, multiclass_metrics
from fedmeta.common.params import NDArrays, from_numpy, to_numpy

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Update:
    """A site's reply for one round: parameter-shaped arrays and aggregate numbers only."""

    arrays: NDArrays
    num_examples: int
    stats: MetaStats


def split_state(state: NDArrays) -> tuple[NDArrays, NDArrays | None]:
    """Split the broadcast state into θ and Meta-SGD's ``lr::`` rates (None when absent)."""
    theta = {k: v for k, v in state.items() if not k.startswith(LR_PREFIX)}
    lrs = {k[len(LR_PREFIX):]: v for k, v in state.items() if k.startswith(LR_PREFIX)}
    return theta, (lrs or None)


def sample_tasks(cfg: ExperimentConfig, site: Site, rng: np.random.Generator, *, split: str = "train") -> TaskBatch:
    """A meta-batch from the site's training split: K/Q-patient tasks, or N-way K-shot episodes."""
    t = cfg.tasks
    if isinstance(site, TabularSite):
        return sample_tabular_tasks(site, n_tasks=t.meta_batch, support=t.support, query=t.query, rng=rng)
    x, y = (site.x_train, site.y_train) if split == "train" else (site.x_test, site.y_test)
    sampler = EpisodeSampler(x, y, n_way=t.ways, k_shot=t.support, n_query=t.query)
    return sampler.sample(t.meta_batch, rng=rng)


def _mean(params: Params, n: int) -> Params:
    return {k: v / n for k, v in params.items()}


def train_update(
    cfg: ExperimentConfig, spec: DataSpec, site: Site, state: NDArrays, *, rng: np.random.Generator
) -> Update:
    """One round of local work on ``site`` starting from the broadcast ``state``."""
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, lrs_np = split_state(state)
    params = from_numpy(theta_np, device=device)
    inner = inner_config(cfg)
    impl = choose_impl(model, device, cfg.engine.impl)
    algo = cfg.algorithm

    if algo == "fedavg":
        x, y = _training_rows(site)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        delta, stats = local_sgd(
            model, params, x.to(device), y.to(device),
            steps=cfg.inner.steps * cfg.tasks.meta_steps, lr=cfg.inner.lr,
            batch_size=cfg.tasks.meta_batch * (cfg.tasks.support + cfg.tasks.query) if isinstance(site, TabularSite)
            else cfg.tasks.ways * (cfg.tasks.support + cfg.tasks.query),
            generator=gen, loss="cross_entropy",
        )
        return Update(to_numpy(delta), stats.n_examples, stats)

    total: MetaStats | None = None
    if algo == "reptile":
        local = {k: v.clone() for k, v in params.items()}
        for _ in range(cfg.tasks.meta_steps):
            delta, stats = reptile_step(model, local, sample_tasks(cfg, site, rng).to(device), inner, impl=impl)
            local = {k: local[k] + delta[k] for k in local}
            total = stats if total is None else total + stats
        assert total is not None
        return Update(to_numpy({k: local[k] - params[k] for k in params}), total.n_examples, total)

    grads: Params | None = None
    lr_grads: Params | None = None
    lrs = from_numpy(lrs_np, device=device) if lrs_np is not None else None
    for _ in range(cfg.tasks.meta_steps):
        tasks = sample_tasks(cfg, site, rng).to(device)
        g_lr: Params | None = None
        if algo in ("maml", "fomaml"):
            g, stats = maml_step(model, params, tasks, inner, impl=impl)
        elif algo == "metasgd":
            if lrs is None:
                raise ValueError("metasgd: the coordinator sent no learning rates (lr:: arrays)")
            g, g_lr, stats = metasgd_step(model, params, lrs, tasks, inner, impl=impl)
        elif algo == "protonet":
            _check_two_classes(site)
            g, stats = protonet_step(model, params, tasks, n_way=_n_way(cfg, site), impl=impl)
        else:  # pragma: no cover - the config's Literal type admits no other value
            raise ValueError(f"unknown algorithm {algo!r}")
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        if g_lr is not None:
            lr_grads = g_lr if lr_grads is None else {k: lr_grads[k] + g_lr[k] for k in g_lr}
        total = stats if total is None else total + stats
    assert grads is not None and total is not None
    out = to_numpy(_mean(grads, cfg.tasks.meta_steps))
    if lr_grads is not None:
        out.update({f"{LR_PREFIX}{k}": v for k, v in to_numpy(_mean(lr_grads, cfg.tasks.meta_steps)).items()})
    return Update(out, total.n_examples, total)


def _check_two_classes(site: Site) -> None:
    if isinstance(site, TabularSite):
        labels = site.y_train[:, 0]
        missing = [c for c in (0, 1) if not (labels == c).any()]
        if missing:
            from fedmeta.common.errors import DataError

            raise DataError(
                f"site {site.name}: ProtoNet episodes need both classes, but the training split has "
                f"no patient with outcome {site.outcomes[0]} = {missing[0]}; this site can only be scored"
            )


def _n_way(cfg: ExperimentConfig, site: Site) -> int:
    return 2 if isinstance(site, TabularSite) else cfg.tasks.ways


def _training_rows(site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """All labelled training rows (first outcome for tables)."""
    if isinstance(site, TabularSite):
        known = site.y_train[:, 0] >= 0
        return torch.from_numpy(site.x_train[known]), torch.from_numpy(site.y_train[known, 0])
    return torch.from_numpy(site.x_train), torch.from_numpy(site.y_train)


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
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, lrs_np = split_state(state)
    params = from_numpy(theta_np, device=device)
    x_tr, y_tr = _training_rows(site)
    if cfg.eval.shots:
        idx = torch.from_numpy(rng.choice(len(y_tr), size=min(cfg.eval.shots, len(y_tr)), replace=False))
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    x_te = torch.from_numpy(site.x_test).to(device)
    y_te = site.y_test[:, 0]
    if cfg.algorithm == "protonet":
        k = min(cfg.tasks.support, len(y_tr))
        few = torch.from_numpy(rng.choice(len(y_tr), size=k, replace=False)).to(device)
        before = _binary_scores(_present_class_logits(model, params, x_tr[few], y_tr[few], x_te), y_te)
        after = _binary_scores(_present_class_logits(model, params, x_tr, y_tr, x_te), y_te)
    else:
        before = _binary_scores(_predict(model, params, x_te), y_te)
        if lrs_np is not None:
            inner = InnerConfig(steps=cfg.inner.steps, lr=cfg.inner.lr)
            adapted = adapt(model, params, x_tr, y_tr, inner, lrs=from_numpy(lrs_np, device=device))
        elif cfg.eval.adapt_steps > 0:
            steps = choose_adapt_steps(cfg, model, params, x_tr, y_tr, rng=rng)
            adapted = params if steps == 0 else adapt(
                model, params, x_tr, y_tr, InnerConfig(steps=steps, lr=cfg.eval.adapt_lr, proximal=cfg.eval.proximal))
        else:
            adapted = params
        after = _binary_scores(_predict(model, adapted, x_te), y_te)
    result = {"before": before, "after": after, "n_train": int(len(y_tr)), "n_test": int(len(y_te))}
    if keep_params and cfg.algorithm != "protonet":
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
    ``inner.steps`` steps (Meta-SGD: its learned rates), or prototypes from all K shots.
    """
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, lrs_np = split_state(state)
    params = from_numpy(theta_np, device=device)
    t = cfg.tasks
    if cfg.data.novel_classes > 0:  # score adaptation to classes never seen in meta-training
        from fedmeta.common.data.images import load_novel_site

        site = load_novel_site(cfg.data, site.name)
    sampler = EpisodeSampler(site.x_test, site.y_test, n_way=t.ways, k_shot=t.support, n_query=t.query)
    eps = sampler.sample(n_episodes, rng=rng).to(device)
    lrs = from_numpy(lrs_np, device=device) if lrs_np is not None else None
    scores: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(eps.n_tasks):
        xs, ys, xq, yq = eps.xs[i], eps.ys[i], eps.xq[i], eps.yq[i].cpu().numpy()
        if cfg.algorithm == "protonet":
            one = torch.stack([torch.nonzero(ys == c)[0, 0] for c in range(t.ways)])
            with torch.no_grad():
                zb = protonet_logits(model, params, xs[one], ys[one], xq, n_way=t.ways)
                za = protonet_logits(model, params, xs, ys, xq, n_way=t.ways)
            scores["before"].append(multiclass_metrics(yq, zb.cpu().double().numpy()))
            scores["after"].append(multiclass_metrics(yq, za.cpu().double().numpy()))
            continue
        scores["before"].append(multiclass_metrics(yq, _predict(model, params, xq)))
        inner = InnerConfig(steps=cfg.eval.adapt_steps or cfg.inner.steps, lr=cfg.eval.adapt_lr)
        if lrs is not None:
            inner = InnerConfig(steps=cfg.inner.steps, lr=cfg.inner.lr)
        adapted = adapt(model, params, xs, ys, inner, lrs=lrs)
        scores["after"].append(multiclass_metrics(yq, _predict(model, adapted, xq)))
    out: dict[str, dict[str, float] | int] = {
        phase: {"accuracy": float(np.mean([s["accuracy"] for s in v])), "auroc": float("nan"),
                "loss": float(np.mean([s["loss"] for s in v]))}
        for phase, v in scores.items()
    }
    out["n_train"] = int(site.n_train)
    out["n_test"] = int(site.n_test)
    return out
