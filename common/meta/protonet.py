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

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedmeta.common.meta.episodic import MetricHead, cross_entropy
from fedmeta.common.meta.types import MetaStats, Params, TaskBatch


def prototypes(model: nn.Module, params: Params, zs: torch.Tensor, ys_onehot: torch.Tensor) -> dict[str, torch.Tensor]:
    """The classifier a support set leaves: ``c_k``, the mean embedded support example of class k."""
    return {"prototypes": (ys_onehot.T @ zs) / ys_onehot.sum(dim=0).unsqueeze(1)}


def distance_scores(model: nn.Module, params: Params, zq: torch.Tensor, memory: Mapping[str, torch.Tensor]
                    ) -> torch.Tensor:
    """``−||f(x_q) − c_k||²`` ``(Q, N)``."""
    c = memory["prototypes"].to(zq.dtype)
    # ||a − b||² = ||a||² − 2 a·b + ||b||², one matrix product instead of a (Q, N, D) difference.
    return -((zq**2).sum(dim=1, keepdim=True) - 2 * zq @ c.T + (c**2).sum(dim=1))


def _onnx(g, z: str, memory: Mapping[str, np.ndarray], **_: object) -> str:  # type: ignore[no-untyped-def]
    """``distance_scores`` as ONNX nodes on the double embedding ``z`` ``(n, D)``."""
    c = memory["prototypes"].astype(np.float64)
    zz = g.op("ReduceSumSquare", [z, g.const([1], "ax", np.int64)], keepdims=1)
    zc = g.op("MatMul", [z, g.const(c.T, "protos")])
    cc = g.const((c**2).sum(axis=1)[None, :], "pp")
    return g.op("Neg", [g.op("Add", [g.op("Sub", [zz, g.op("Mul", [zc, g.const(2.0)])]), cc])])


PROTOTYPES = MetricHead(
    name="prototypes", text="prototypes of the support set", keeps=("prototypes",), memory=prototypes, scores=distance_scores,
    loss=cross_entropy, onnx=_onnx,
)


def protonet_logits(
    model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, *, n_way: int
) -> torch.Tensor:
    """Query logits ``(Q, N)`` of one episode (:meth:`MetricHead.logits`)."""
    return PROTOTYPES.logits(model, params, xs, ys, xq, n_way=n_way)


def protonet_step(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto",
    compile: bool = False, before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Gradient of the mean query cross-entropy over ``episodes`` with respect to ``params``
    (``compile``, ``before_stats``: see :func:`fedmeta.common.meta.episodic.metric_step`)."""
    return PROTOTYPES.step(model, params, episodes, n_way=n_way, impl=impl, compile=compile,
                           before_stats=before_stats)


def protonet_accuracy(
    model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto"
) -> tuple[int, int]:
    """``(n_correct, n_query)`` of nearest-prototype classification of every query example."""
    return PROTOTYPES.accuracy(model, params, episodes, n_way=n_way, impl=impl)
