"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

Meta-SGD learns, with the initialisation ``θ``, a learning rate per weight ``α`` (same shapes as
``θ``; direction and size): the inner step is

    φ ← φ − α ⊙ (∇_φ L(φ; support) + λ (φ − θ)),

(``inner.lr`` is not used; ``inner.steps`` steps, the paper uses one), and both are meta-trained on
the query loss after adaptation: the step returns ``(∇_θ, ∇_α)`` of
``(1/T) Σ_t L(φ_t(θ, α); query_t)``. ``∇_α`` is its own gradient: with one first-order step,
``∂φ/∂α = −∇L(θ; support)``, so ``∇_α = −(1/T) Σ_t ∇L(φ_t; query_t) ⊙ ∇L(θ; support_t)``.

Example::

    >>> import torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> from fedmeta.common.meta.types import InnerConfig, TaskBatch
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("linear", in_features=4, out_features=2)
    >>> theta = init_params(model)
    >>> lrs = init_lrs(theta, 0.05)
    >>> tasks = TaskBatch(torch.randn(8, 5, 4), torch.randint(0, 2, (8, 5)),
    ...                   torch.randn(8, 5, 4), torch.randint(0, 2, (8, 5)))
    >>> g_theta, g_lrs, stats = metasgd_step(model, theta, lrs, tasks, InnerConfig(steps=1))
    >>> g_lrs["linear.weight"].shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmeta.common.meta.maml import meta_gradient
from fedmeta.common.meta.types import InnerConfig, MetaStats, Params, TaskBatch


def init_lrs(params: Params, value: float) -> Params:
    """Per-parameter learning rates, every entry ``value`` (Li et al. initialise them uniformly)."""
    if not math.isfinite(value):
        raise ValueError(f"initial learning rate must be finite, got {value}")
    return {k: torch.full_like(v.detach(), value) for k, v in params.items()}


def metasgd_step(
    model: nn.Module,
    params: Params,
    lrs: Params,
    tasks: TaskBatch,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    impl: str = "auto",
    group_size: int | None = None,
    compile: bool = False,
    before_stats: bool = True,
) -> tuple[Params, Params, MetaStats]:
    """Meta-gradients with respect to ``params`` (θ) and ``lrs`` (α), and the meta-batch's stats.

    Second order unless ``inner.first_order`` (then the inner gradients are constants, but ``α``
    still gets the gradient above). Neither ``params`` nor ``lrs`` is modified. ``compile`` and
    ``before_stats``: as in :func:`fedmeta.common.meta.maml.maml_step`.
    """
    grads, lr_grads, stats = meta_gradient(
        model, params, lrs, tasks, inner, loss=loss, impl=impl, group_size=group_size,
        compile=compile, before_stats=before_stats,
    )
    assert lr_grads is not None
    return grads, lr_grads, stats
