"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016, "Matching Networks
for One Shot Learning"), without full-context embeddings (``f = g``, the paper's simple variant).

A query ``x̂`` attends over the support set with a softmax of cosine similarities of embeddings,
``a(x̂, x_i) = exp(s·cos(f(x̂), f(x_i))) / Σ_j exp(s·cos(f(x̂), f(x_j)))``, and the predicted
distribution is the attention-weighted sum of support labels,
``P(y = k | x̂, S) = Σ_i a(x̂, x_i) 1[y_i = k]``. The loss is ``−log P(y | x̂, S)`` averaged over
queries and episodes; ``s`` (``scale``) is 1 in the paper. The scores returned are
``log P(y = k | x̂, S)`` (computed with ``logsumexp``, stable), which already sum to one in
probability, so cross-entropy on them is exactly the paper's loss.

Example::

    >>> import torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> from fedmeta.common.meta.types import TaskBatch
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("mlp", in_features=5, hidden=(16, 8), out_features=None)
    >>> ys = torch.arange(3).repeat(2).expand(4, 6)
    >>> episodes = TaskBatch(torch.randn(4, 6, 5), ys, torch.randn(4, 9, 5), torch.arange(3).repeat(3).expand(4, 9))
    >>> grad, stats = matching_step(model, init_params(model), episodes, n_way=3)
    >>> stats.n_tasks
    4
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmeta.common.meta.episodic import (
    ScoreFn,
    check_support,
    count_correct,
    metric_step,
    onehot,
    predict_episodes,
    with_buffers,
)
from fedmeta.common.meta.inner import buffer_copies
from fedmeta.common.meta.types import MetaStats, Params, TaskBatch


def attention_log_probs(
    model: nn.Module,
    params: Params,
    xs: torch.Tensor,
    ys_onehot: torch.Tensor,
    xq: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """``log P(y = k | x̂, S)`` for one episode, shape ``(Q, N)``."""
    z = functional_call(model, params, (torch.cat([xs, xq], dim=0),)).flatten(start_dim=1)
    zs, zq = z[: xs.shape[0]], z[xs.shape[0]:]
    cos = F.normalize(zq, dim=1, eps=1e-8) @ F.normalize(zs, dim=1, eps=1e-8).T  # (Q, S)
    log_attention = torch.log_softmax(scale * cos, dim=1)
    # log Σ_{i: y_i = k} a_i: mask other classes with −inf (log of the one-hot entries).
    mask = torch.log(ys_onehot).unsqueeze(0)  # (1, S, N): 0 or −inf
    return torch.logsumexp(log_attention.unsqueeze(2) + mask, dim=1)


def _scorer(scale: float) -> ScoreFn:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"matching scale must be a finite number > 0, got {scale}")
    return functools.partial(attention_log_probs, scale=scale)


def _nll(scores: torch.Tensor, yq: torch.Tensor, yq_onehot: torch.Tensor) -> torch.Tensor:
    return -(scores * yq_onehot).sum(dim=1)


def matching_logits(
    model: nn.Module,
    params: Params,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    *,
    n_way: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """``log P(y = k | x̂, S)`` ``(Q, N)`` of one episode (``ys`` (S,) labels in ``0..n_way−1``)."""
    check_support(ys[None], n_way)
    dtype = next(iter(params.values())).dtype
    state = with_buffers(params, buffer_copies(model, xs.device))
    return _scorer(scale)(model, state, xs, onehot(ys, n_way, dtype), xq)


def matching_step(
    model: nn.Module,
    params: Params,
    episodes: TaskBatch,
    *,
    n_way: int,
    impl: str = "auto",
    scale: float = 1.0,
    compile: bool = False,
    before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Gradient of the mean query negative log-likelihood over ``episodes`` (``compile``,
    ``before_stats``: see :func:`fedmeta.common.meta.episodic.metric_step`)."""
    return metric_step(
        _scorer(scale), _nll, model, params, episodes, n_way=n_way, impl=impl,
        compile=compile, before_stats=before_stats,
    )


def matching_accuracy(
    model: nn.Module,
    params: Params,
    episodes: TaskBatch,
    *,
    n_way: int,
    impl: str = "auto",
    scale: float = 1.0,
) -> tuple[int, int]:
    """``(n_correct, n_query)`` of classifying every query by its most probable class."""
    pred = predict_episodes(_scorer(scale), model, params, episodes, n_way=n_way, impl=impl)
    return count_correct(pred, episodes)
