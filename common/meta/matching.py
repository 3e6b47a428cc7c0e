"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016, "Matching Networks
for One Shot Learning"): :data:`MATCHING` without full context embeddings (``f = g``, the paper's
simple variant), :data:`MATCHING_FCE` with them (:class:`fedmeta.common.models.ContextEmbedding`:
the support set read by a bidirectional LSTM, each query by an attention LSTM over it).

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
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmeta.common.meta.episodic import MetricHead
from fedmeta.common.meta.types import MetaStats, Params, TaskBatch


def support_set(model: nn.Module, params: Params, zs: torch.Tensor, ys_onehot: torch.Tensor) -> dict[str, torch.Tensor]:
    """The classifier a support set leaves: every embedded support example, unit length, and its label."""
    return {"support": F.normalize(zs, dim=1, eps=1e-8), "labels": ys_onehot}


def _attention(scale: float, model: nn.Module, params: Params, zq: torch.Tensor,
               memory: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``log P(y = k | x̂, S)`` ``(Q, N)``: attention over the support set, summed per class."""
    zs, ys = memory["support"].to(zq.dtype), memory["labels"].to(zq.dtype)
    cos = F.normalize(zq, dim=1, eps=1e-8) @ zs.T  # (Q, S)
    log_attention = torch.log_softmax(scale * cos, dim=1)
    # log Σ_{i: y_i = k} a_i: mask other classes with −inf (log of the one-hot entries).
    return torch.logsumexp(log_attention.unsqueeze(2) + torch.log(ys).unsqueeze(0), dim=1)


def _nll(scores: torch.Tensor, yq: torch.Tensor, yq_onehot: torch.Tensor) -> torch.Tensor:
    return -(scores * yq_onehot).sum(dim=1)


def _onnx(scale: float, g, z: str, memory: Mapping[str, np.ndarray], **_: object) -> str:  # type: ignore[no-untyped-def]
    """``_attention`` as ONNX nodes on the double embedding ``z`` ``(n, D)``."""
    norm = g.op("Max", [g.op("ReduceL2", [z, g.const([1], "ax", np.int64)], keepdims=1), g.const(1e-8, "eps")])
    cos = g.op("MatMul", [g.op("Div", [z, norm]), g.const(memory["support"].astype(np.float64).T, "support")])
    attention = g.op("Softmax", [g.op("Mul", [cos, g.const(float(scale), "scale")])], axis=1)
    return g.op("Log", [g.op("MatMul", [attention, g.const(memory["labels"].astype(np.float64), "labels")])])


@functools.cache
def matching_head(scale: float = 1.0) -> MetricHead:
    """Matching Networks' classifier with cosine similarities multiplied by ``scale`` (1 in the paper)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"matching scale must be a finite number > 0, got {scale}")
    return MetricHead(
        name="matching", text="attention over the embedded support set", keeps=("support", "labels"), memory=support_set,
        scores=functools.partial(_attention, scale), loss=_nll, onnx=functools.partial(_onnx, scale),
    )


MATCHING = matching_head(1.0)


def context_set(model: nn.Module, params: Params, zs: torch.Tensor, ys_onehot: torch.Tensor) -> dict[str, torch.Tensor]:
    """The classifier a support set leaves with full context embeddings: ``g(x_i, S)`` of every
    support example (the bidirectional LSTM's reading of the whole set) and its label."""
    return {"context": functional_call(model, params, (zs,)), "labels": ys_onehot}


def _context_attention(model: nn.Module, params: Params, zq: torch.Tensor, memory: Mapping[str, torch.Tensor]
                       ) -> torch.Tensor:
    """``log P(y = k | x̂, S)`` with ``f(x̂, S)`` the attention LSTM's reading of the query."""
    g = memory["context"].to(zq.dtype)
    f = functional_call(model, params, (zq, g))
    return _attention(1.0, model, params, f, {"support": F.normalize(g, dim=1, eps=1e-8), "labels": memory["labels"]})


MATCHING_FCE = MetricHead(
    name="matching-fce", text="attention over the support set, with full context embeddings",
    keeps=("context", "labels"), memory=context_set, scores=_context_attention, loss=_nll, encoder="encoder",
)


def matching_logits(
    model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, *, n_way: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """``log P(y = k | x̂, S)`` ``(Q, N)`` of one episode (``ys`` (S,) labels in ``0..n_way−1``)."""
    return matching_head(scale).logits(model, params, xs, ys, xq, n_way=n_way)


def matching_step(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto", scale: float = 1.0,
    compile: bool = False, before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Gradient of the mean query negative log-likelihood over ``episodes`` (``compile``,
    ``before_stats``: see :func:`fedmeta.common.meta.episodic.metric_step`)."""
    return matching_head(scale).step(model, params, episodes, n_way=n_way, impl=impl, compile=compile,
                                     before_stats=before_stats)


def matching_accuracy(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto", scale: float = 1.0,
) -> tuple[int, int]:
    """``(n_correct, n_query)`` of classifying every query by its most probable class."""
    return matching_head(scale).accuracy(model, params, episodes, n_way=n_way, impl=impl)
