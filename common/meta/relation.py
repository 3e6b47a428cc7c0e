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

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedmeta.common.meta.episodic import MetricHead, submodule_params
from fedmeta.common.meta.types import MetaStats, Params, TaskBatch


def class_features(model: nn.Module, params: Params, zs: torch.Tensor, ys_onehot: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The classifier a support set leaves: ``c_k = Σ_{i: y_i = k} f(x_i)`` (feature maps or vectors)."""
    return {"classes": torch.einsum("sn,s...->n...", ys_onehot.to(zs.dtype), zs)}


def relate(model: nn.Module, params: Params, zq: torch.Tensor, memory: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Pre-sigmoid relation logits ``g([c_k, f(x_q)])`` ``(Q, N)``, concatenated along dimension 1
    of the embedding (channels for feature maps, features for vectors)."""
    classes = memory["classes"].to(zq.dtype)
    n, q = classes.shape[0], zq.shape[0]
    pairs = torch.cat([classes.unsqueeze(0).expand(q, *classes.shape),
                       zq.unsqueeze(1).expand(q, n, *zq.shape[1:])], dim=2)
    out = functional_call(model.get_submodule("relation"), submodule_params(params, "relation"),
                          (pairs.reshape(q * n, *pairs.shape[2:]),))
    return out.reshape(q, n)


def _mse(scores: torch.Tensor, yq: torch.Tensor, yq_onehot: torch.Tensor) -> torch.Tensor:
    return ((torch.sigmoid(scores) - yq_onehot) ** 2).mean(dim=1)


def _onnx(g, z: str, memory: Mapping[str, np.ndarray], *, module: Callable[..., str], model: nn.Module,  # type: ignore[no-untyped-def]
          **_: object) -> str:
    """``relate`` as ONNX nodes: one pass of the relation module per class on ``[c_k, f(x)]``."""
    classes = memory["classes"].astype(np.float32)
    zero = g.op("Mul", [z, g.const(0.0, "zero", np.float32)])  # (n, ...) zeros: broadcasts c_k to n rows
    columns = []
    for k in range(classes.shape[0]):
        ck = g.op("Add", [zero, g.const(classes[k][None], "class", np.float32)])
        columns.append(module(g.op("Concat", [ck, z], axis=1), model.get_submodule("relation"), "relation."))
    return g.op("Cast", [g.op("Concat", columns, axis=1)], to=11)  # 11: double


RELATION = MetricHead(
    name="relation", text="a learned relation module scoring the class features of the support set",
    keeps=("classes",), memory=class_features, scores=relate, loss=_mse, encoder="encoder", flatten=False, calibration="platt",
    onnx=_onnx,
)


def relation_logits(
    model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, *, n_way: int
) -> torch.Tensor:
    """Pre-sigmoid relation logits ``(Q, N)`` of one episode (``σ`` of them is the relation score)."""
    return RELATION.logits(model, params, xs, ys, xq, n_way=n_way)


def relation_step(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto",
    compile: bool = False, before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Gradient of the mean relation-score MSE over ``episodes`` with respect to ``params``
    (``compile``, ``before_stats``: see :func:`fedmeta.common.meta.episodic.metric_step`)."""
    return RELATION.step(model, params, episodes, n_way=n_way, impl=impl, compile=compile,
                         before_stats=before_stats)


def relation_accuracy(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto"
) -> tuple[int, int]:
    """``(n_correct, n_query)`` of classifying every query by its highest relation score."""
    return RELATION.accuracy(model, params, episodes, n_way=n_way, impl=impl)
