"""Prototypical Networks (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot Learning").

An embedding network ``f_θ`` maps each example to a vector; class ``k``'s prototype is the mean
embedded support example, ``c_k = (1/|S_k|) Σ_{i ∈ S_k} f_θ(x_i)``, and a query ``x`` is scored by
the negative squared Euclidean distance, ``logit_k(x) = −||f_θ(x) − c_k||²``, so
``p(y = k | x) = softmax_k(logit(x))``. Training minimises the query cross-entropy averaged over
episodes; :func:`protonet_step` returns its gradient with respect to ``θ``.

Any registry model whose output is an embedding works: ``build_model("conv4", out_features=None)``
for images, ``build_model("mlp", in_features=..., out_features=None)`` for tabular data.

Example::

    >>> import torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> from fedmeta.common.meta.types import TaskBatch
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("mlp", in_features=5, hidden=(16, 8), out_features=None)
    >>> ys = torch.arange(3).repeat(2).expand(4, 6)  # 4 episodes, 3-way 2-shot
    >>> episodes = TaskBatch(torch.randn(4, 6, 5), ys, torch.randn(4, 9, 5), torch.arange(3).repeat(3).expand(4, 9))
    >>> grad, stats = protonet_step(model, init_params(model), episodes, n_way=3)
    >>> stats.n_query
    36
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmeta.common.meta.episodic import (
    check_support,
    count_correct,
    metric_step,
    onehot,
    predict_episodes,
    with_buffers,
)
from fedmeta.common.meta.inner import buffer_copies
from fedmeta.common.meta.types import MetaStats, Params, TaskBatch


def prototype_scores(
    model: nn.Module, params: Params, xs: torch.Tensor, ys_onehot: torch.Tensor, xq: torch.Tensor
) -> torch.Tensor:
    """``−||f(x_q) − c_k||²`` for one episode, from one-hot support labels ``(S, N)``; ``(Q, N)``."""
    z = functional_call(model, params, (torch.cat([xs, xq], dim=0),)).flatten(start_dim=1)
    zs, zq = z[: xs.shape[0]], z[xs.shape[0]:]
    prototypes = (ys_onehot.T @ zs) / ys_onehot.sum(dim=0).unsqueeze(1)
    # ||a − b||² = ||a||² − 2 a·b + ||b||², one matrix product instead of a (Q, N, D) difference.
    sq = (zq**2).sum(dim=1, keepdim=True) - 2 * zq @ prototypes.T + (prototypes**2).sum(dim=1)
    return -sq


def _cross_entropy(scores: torch.Tensor, yq: torch.Tensor, yq_onehot: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(scores, yq, reduction="none")


def protonet_logits(
    model: nn.Module,
    params: Params,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    *,
    n_way: int,
) -> torch.Tensor:
    """Query logits ``(Q, N)`` of one episode: support ``xs`` (S, ...), labels ``ys`` (S,) in
    ``0..n_way−1`` (each class present), queries ``xq`` (Q, ...)."""
    check_support(ys[None], n_way)
    dtype = next(iter(params.values())).dtype
    state = with_buffers(params, buffer_copies(model, xs.device))
    return prototype_scores(model, state, xs, onehot(ys, n_way, dtype), xq)


def protonet_step(
    model: nn.Module,
    params: Params,
    episodes: TaskBatch,
    *,
    n_way: int,
    impl: str = "auto",
    compile: bool = False,
    before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Gradient of the mean query cross-entropy over ``episodes`` with respect to ``params``
    (``compile``, ``before_stats``: see :func:`fedmeta.common.meta.episodic.metric_step`)."""
    return metric_step(
        prototype_scores, _cross_entropy, model, params, episodes, n_way=n_way, impl=impl,
        compile=compile, before_stats=before_stats,
    )


def protonet_accuracy(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto"
) -> tuple[int, int]:
    """``(n_correct, n_query)`` of nearest-prototype classification of every query example."""
    pred = predict_episodes(prototype_scores, model, params, episodes, n_way=n_way, impl=impl)
    return count_correct(pred, episodes)
