"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018, "Learning to Compare:
Relation Network for Few-Shot Learning").

The model (:class:`fedmeta.common.models.RelationNet`) embeds examples with ``f``, forms class
features ``c_k = Σ_{i: y_i = k} f(x_i)`` and scores each (query, class) pair with a learned module:
``r_{q,k} = σ(g([c_k, f(x_q)]))``. Training regresses the relation scores onto the one-hot
match with the mean squared error, ``(1/(Q·N)) Σ_{q,k} (r_{q,k} − 1[y_q = k])²``, as in the paper.
The stats sum ``(1/N) Σ_k (r_{q,k} − 1[y_q = k])²`` over query examples.

Example::

    >>> import torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> from fedmeta.common.meta.types import TaskBatch
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("relation-mlp", in_features=5, hidden=(16,), embed=8)
    >>> ys = torch.arange(3).repeat(2).expand(4, 6)
    >>> episodes = TaskBatch(torch.randn(4, 6, 5), ys, torch.randn(4, 9, 5), torch.arange(3).repeat(3).expand(4, 9))
    >>> grad, stats = relation_step(model, init_params(model), episodes, n_way=3)
    >>> stats.n_query
    36
"""

from __future__ import annotations

import torch
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


def relation_scores(
    model: nn.Module, params: Params, xs: torch.Tensor, ys_onehot: torch.Tensor, xq: torch.Tensor
) -> torch.Tensor:
    """Pre-sigmoid relation logits ``(Q, N)`` of one episode."""
    return functional_call(model, params, (xs, ys_onehot, xq))


def _mse(scores: torch.Tensor, yq: torch.Tensor, yq_onehot: torch.Tensor) -> torch.Tensor:
    return ((torch.sigmoid(scores) - yq_onehot) ** 2).mean(dim=1)


def relation_logits(
    model: nn.Module,
    params: Params,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    *,
    n_way: int,
) -> torch.Tensor:
    """Pre-sigmoid relation logits ``(Q, N)`` of one episode (``σ`` of them is the relation score)."""
    check_support(ys[None], n_way)
    dtype = next(iter(params.values())).dtype
    state = with_buffers(params, buffer_copies(model, xs.device))
    return relation_scores(model, state, xs, onehot(ys, n_way, dtype), xq)


def relation_step(
    model: nn.Module,
    params: Params,
    episodes: TaskBatch,
    *,
    n_way: int,
    impl: str = "auto",
    compile: bool = False,
    before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Gradient of the mean relation-score MSE over ``episodes`` with respect to ``params``
    (``compile``, ``before_stats``: see :func:`fedmeta.common.meta.episodic.metric_step`)."""
    return metric_step(
        relation_scores, _mse, model, params, episodes, n_way=n_way, impl=impl,
        compile=compile, before_stats=before_stats,
    )


def relation_accuracy(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto"
) -> tuple[int, int]:
    """``(n_correct, n_query)`` of classifying every query by its highest relation score."""
    pred = predict_episodes(relation_scores, model, params, episodes, n_way=n_way, impl=impl)
    return count_correct(pred, episodes)
