"""MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks") and first-order MAML.

For tasks ``t = 1..T`` with support ``(x^s_t, y^s_t)`` and query ``(x^q_t, y^q_t)``, adapt
``φ_t(θ) = U^k(θ; x^s_t, y^s_t)`` with ``k = inner.steps`` inner steps
(:mod:`fedmeta.common.meta.inner`) and return the meta-gradient

    g = ∇_θ (1/T) Σ_t L(φ_t(θ); x^q_t, y^q_t),

differentiating through the inner updates (second order: Hessian-vector products of the
support loss). With ``inner.first_order`` (FOMAML) the inner gradients are detached, so
``∂φ_t/∂θ = I`` and ``g = (1/T) Σ_t ∇L(φ_t)``. The caller applies ``θ ← θ − β g`` (in fedmeta,
the server, after averaging clients' meta-gradients weighted by task counts).

``impl="vmap"`` evaluates every task at once with ``torch.func.vmap``; ``impl="loop"`` one task
at a time with ``torch.autograd.grad(create_graph=True)``, freeing each task's graph before the
next. ``group_size`` (vmap only) bounds memory by running ``vmap`` on groups of that many tasks
and accumulating the gradient, since ``vmap`` keeps every task's graph until the backward pass.

Example::

    >>> import torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> from fedmeta.common.meta.types import InnerConfig, TaskBatch
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("mlp", in_features=13, hidden=(64, 64), out_features=2)
    >>> tasks = TaskBatch(torch.randn(32, 10, 13), torch.randint(0, 2, (32, 10)),
    ...                   torch.randn(32, 20, 13), torch.randint(0, 2, (32, 20)))
    >>> grad, stats = maml_step(model, init_params(model), tasks, InnerConfig(steps=5, lr=0.05))
    >>> grad["net.0.weight"].shape, stats.n_query
    (torch.Size([64, 13]), 640)
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmeta.common.meta.engine import choose_impl, params_device
from fedmeta.common.meta.inner import (
    adapt_autograd,
    adapt_functional,
    check_lrs,
    check_task,
    forward,
    task_loss,
)
from fedmeta.common.meta.types import InnerConfig, MetaStats, Params, TaskBatch

logger = logging.getLogger(__name__)


def maml_step(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    impl: str = "auto",
    group_size: int | None = None,
    compile: bool = False,
) -> tuple[Params, MetaStats]:
    """Meta-gradient of the mean post-adaptation query loss (MAML, or FOMAML when
    ``inner.first_order``), and the meta-batch's stats. ``params`` is not modified.

    ``compile=True`` (vmap only, no ``group_size``) runs the whole meta-gradient as one
    ``torch.compile``d ``torch.func.grad`` of the vmapped objective; the first call per model,
    settings and meta-batch shape compiles (tens of seconds), later calls reuse it.
    """
    grads, _, stats = meta_gradient(
        model, params, None, tasks, inner, loss=loss, impl=impl, group_size=group_size,
        compile=compile,
    )
    return grads, stats


def meta_gradient(
    model: nn.Module,
    params: Params,
    lrs: Params | None,
    tasks: TaskBatch,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    impl: str = "auto",
    group_size: int | None = None,
    compile: bool = False,
) -> tuple[Params, Params | None, MetaStats]:
    """Shared by MAML and Meta-SGD: gradients of ``(1/T) Σ_t L(φ_t; query_t)`` with respect to
    ``params`` and, when given, the per-parameter inner learning rates ``lrs``."""
    device = params_device(params)
    tasks = tasks.to(device)
    check_task(tasks.xs[0], tasks.ys[0], loss, where="meta-batch support")
    check_task(tasks.xq[0], tasks.yq[0], loss, where="meta-batch query")
    check_lrs(params, lrs)
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be a positive number of tasks, got {group_size}")
    which = choose_impl(model, device, impl)
    if compile:
        if which != "vmap" or group_size is not None:
            raise ValueError(
                f"compile=True needs the vmap implementation without group_size, got impl "
                f"{which!r} (requested {impl!r}) and group_size={group_size}"
            )
        return _compiled_meta_gradient(model, params, lrs, tasks, inner, loss=loss)
    n_tasks, n_query = tasks.n_tasks, tasks.n_query
    scale = 1.0 / (n_tasks * n_query)  # mean over tasks of the mean query loss (equal Q per task)

    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    alpha = {k: v.detach().requires_grad_() for k, v in lrs.items()} if lrs is not None else None
    inputs = list(theta.values()) + (list(alpha.values()) if alpha is not None else [])
    totals = [torch.zeros_like(t) for t in inputs]
    loss_before = loss_after = 0.0

    def accumulate(objective: torch.Tensor) -> None:
        grads = torch.autograd.grad(objective, inputs, allow_unused=True, materialize_grads=True)
        for total, g in zip(totals, grads, strict=True):
            total += g

    with torch.enable_grad():
        if which == "vmap":

            def one_task(
                p: Params,
                a: Params | None,
                xs: torch.Tensor,
                ys: torch.Tensor,
                xq: torch.Tensor,
                yq: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor]:
                with torch.no_grad():
                    before = task_loss(forward(model, p, xq), yq, loss, reduction="sum")
                phi = adapt_functional(model, p, xs, ys, inner, loss=loss, lrs=a)
                return task_loss(forward(model, phi, xq), yq, loss, reduction="sum"), before

            batched = torch.func.vmap(
                one_task, in_dims=(None, None, 0, 0, 0, 0), randomness="different"
            )
            step = group_size or n_tasks
            for start in range(0, n_tasks, step):
                sl = slice(start, start + step)
                after, before = batched(
                    theta, alpha, tasks.xs[sl], tasks.ys[sl], tasks.xq[sl], tasks.yq[sl]
                )
                accumulate(after.sum() * scale)
                loss_before += float(before.sum())
                loss_after += float(after.detach().sum())
        else:
            for t in range(n_tasks):
                with torch.no_grad():
                    before = task_loss(forward(model, theta, tasks.xq[t]), tasks.yq[t], loss, reduction="sum")
                phi = adapt_autograd(
                    model, theta, tasks.xs[t], tasks.ys[t], inner, loss=loss, lrs=alpha,
                    create_graph=True,
                )
                after = task_loss(forward(model, phi, tasks.xq[t]), tasks.yq[t], loss, reduction="sum")
                accumulate(after * scale)
                loss_before += float(before)
                loss_after += float(after.detach())

    grads_theta = dict(zip(theta, totals[: len(theta)], strict=True))
    grads_lrs = dict(zip(alpha, totals[len(theta):], strict=True)) if alpha is not None else None
    stats = MetaStats(
        n_tasks=n_tasks,
        n_examples=tasks.n_examples,
        n_query=n_tasks * n_query,
        query_loss_before=loss_before,
        query_loss_after=loss_after,
    )
    return grads_theta, grads_lrs, stats


# Compiled meta-gradient functions per model (weakly held) and settings.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)


def _compiled_meta_gradient(
    model: nn.Module,
    params: Params,
    lrs: Params | None,
    tasks: TaskBatch,
    inner: InnerConfig,
    *,
    loss: str,
) -> tuple[Params, Params | None, MetaStats]:
    key = (inner, loss, lrs is not None)
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:

        def one_task(
            p: Params, a: Params | None, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                before = task_loss(forward(model, p, xq), yq, loss, reduction="sum")
            phi = adapt_functional(model, p, xs, ys, inner, loss=loss, lrs=a)
            return task_loss(forward(model, phi, xq), yq, loss, reduction="sum"), before

        def objective(
            p: Params, a: Params | None, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            after, before = torch.func.vmap(one_task, in_dims=(None, None, 0, 0, 0, 0))(p, a, xs, ys, xq, yq)
            return after.sum() / (xq.shape[0] * xq.shape[1]), (after.detach(), before)

        argnums = (0, 1) if lrs is not None else 0
        logger.info("compiling the MAML meta-gradient for %s (%s)", type(model).__name__, key)
        cache[key] = torch.compile(torch.func.grad(objective, argnums=argnums, has_aux=True))
    theta = {k: v.detach() for k, v in params.items()}
    alpha = {k: v.detach() for k, v in lrs.items()} if lrs is not None else None
    grads, (after, before) = cache[key](theta, alpha, tasks.xs, tasks.ys, tasks.xq, tasks.yq)
    grads_theta, grads_lrs = grads if lrs is not None else (grads, None)
    stats = MetaStats(
        n_tasks=tasks.n_tasks,
        n_examples=tasks.n_examples,
        n_query=tasks.n_tasks * tasks.n_query,
        query_loss_before=float(before.sum()),
        query_loss_after=float(after.sum()),
    )
    return grads_theta, grads_lrs, stats
