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
``before_stats=False`` skips the query loss of ``θ`` before adaptation (a statistic only: one extra
query forward per task, about a tenth of a Conv-4 step); the gradient is the same either way.

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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmeta.common import deadline
from fedmeta.common.meta.engine import choose_impl, compile_applies, compiled, params_device
from fedmeta.common.meta.inner import (
    adapt_autograd,
    adapt_functional,
    batched_buffers,
    buffer_copies,
    check_lrs,
    check_task,
    forward,
    query_loss_sum,
    task_loss,
)
from fedmeta.common.meta.types import InnerConfig, MetaStats, Params, TaskBatch


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
    before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Meta-gradient of the mean post-adaptation query loss (MAML, or FOMAML when
    ``inner.first_order``), and the meta-batch's stats. ``params`` and ``model`` are not modified.

    ``compile=True`` runs the vmap implementation's meta-gradient as one ``torch.compile``d
    ``torch.func.grad`` of the vmapped objective (per group of ``group_size`` tasks when given);
    the first call per model, settings and meta-batch shape compiles (tens of seconds for an MLP,
    minutes for Conv-4), later calls reuse it. Where the per-task loop is used, or the model has
    buffers, ``compile`` is ignored (logged). ``before_stats=False``: no query forward of ``θ``;
    ``stats.query_loss_before`` is NaN.
    """
    grads, _, stats = meta_gradient(
        model, params, None, tasks, inner, loss=loss, impl=impl, group_size=group_size,
        compile=compile, before_stats=before_stats,
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
    before_stats: bool = True,
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
    which = choose_impl(model, device, impl, second_order=not inner.first_order, probe=tasks, loss=loss)
    buffers = buffer_copies(model, device)
    n_tasks, n_query = tasks.n_tasks, tasks.n_query
    scale = 1.0 / (n_tasks * n_query)  # mean over tasks of the mean query loss (equal Q per task)

    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    alpha = {k: v.detach().requires_grad_() for k, v in lrs.items()} if lrs is not None else None
    inputs = list(theta.values()) + (list(alpha.values()) if alpha is not None else [])
    totals = [torch.zeros_like(t) for t in inputs]
    loss_after = 0.0
    step = group_size or n_tasks

    def accumulate(objective: torch.Tensor) -> None:
        grads = torch.autograd.grad(objective, inputs, allow_unused=True, materialize_grads=True)
        for total, g in zip(totals, grads, strict=True):
            total += g

    compile = compile and compile_applies(model, which, buffers)
    if compile:
        fn = _compiled_objective_grad(model, inner, loss=loss, with_lrs=alpha is not None)
        for start in range(0, n_tasks, step):
            deadline.check()
            sl = slice(start, start + step)
            grads, after = fn(
                {k: v.detach() for k, v in theta.items()},
                {k: v.detach() for k, v in alpha.items()} if alpha is not None else None,
                tasks.xs[sl], tasks.ys[sl], tasks.xq[sl], tasks.yq[sl],
            )
            flat = list(grads[0].values()) + list(grads[1].values()) if alpha is not None else list(grads.values())
            for total, g in zip(totals, flat, strict=True):
                total += g * scale
            loss_after += float(after.sum())
    else:
        with torch.enable_grad():
            if which == "vmap":

                def one_task(
                    p: Params,
                    a: Params | None,
                    b: Params | None,
                    xs: torch.Tensor,
                    ys: torch.Tensor,
                    xq: torch.Tensor,
                    yq: torch.Tensor,
                ) -> torch.Tensor:
                    phi = adapt_functional(model, p, xs, ys, inner, loss=loss, lrs=a, buffers=b)
                    return task_loss(forward(model, phi, xq, b), yq, loss, reduction="sum")

                batched = torch.func.vmap(
                    one_task,
                    in_dims=(None, None, 0 if buffers is not None else None, 0, 0, 0, 0),
                    randomness="different",
                )
                for start in range(0, n_tasks, step):
                    deadline.check()
                    sl = slice(start, start + step)
                    after = batched(
                        theta, alpha, batched_buffers(buffers, tasks.xs[sl].shape[0]),
                        tasks.xs[sl], tasks.ys[sl], tasks.xq[sl], tasks.yq[sl],
                    )
                    accumulate(after.sum() * scale)
                    loss_after += float(after.detach().sum())
            else:
                for t in range(n_tasks):
                    deadline.check()
                    phi = adapt_autograd(
                        model, theta, tasks.xs[t], tasks.ys[t], inner, loss=loss, lrs=alpha,
                        create_graph=True, buffers=buffers,
                    )
                    after = task_loss(forward(model, phi, tasks.xq[t], buffers), tasks.yq[t], loss, reduction="sum")
                    accumulate(after * scale)
                    loss_after += float(after.detach())
                    del phi, after  # free this task's graph before the next task builds its own

    # After the gradient, so that a random forward (dropout) draws the same numbers either way.
    loss_before = float("nan")
    if before_stats:
        loss_before = 0.0
        fixed = {k: v.detach() for k, v in theta.items()}
        for start in range(0, n_tasks, step if which == "vmap" else n_tasks):
            sl = slice(start, start + step if which == "vmap" else n_tasks)
            group = TaskBatch(tasks.xs[sl], tasks.ys[sl], tasks.xq[sl], tasks.yq[sl])
            loss_before += query_loss_sum(model, fixed, group, loss=loss, impl=which, buffers=buffers)
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


def _compiled_objective_grad(
    model: nn.Module, inner: InnerConfig, *, loss: str, with_lrs: bool
) -> Callable[..., Any]:
    """``torch.compile(torch.func.grad(Σ_t L(φ_t; query_t)))`` over a vmapped meta-batch, returning
    ``(gradients, per-task query losses)``; built once per model and settings."""

    def build() -> Callable[..., Any]:
        def one_task(
            p: Params, a: Params | None, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
        ) -> torch.Tensor:
            phi = adapt_functional(model, p, xs, ys, inner, loss=loss, lrs=a)
            return task_loss(forward(model, phi, xq), yq, loss, reduction="sum")

        def objective(
            p: Params, a: Params | None, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            after = torch.func.vmap(one_task, in_dims=(None, None, 0, 0, 0, 0), randomness="different")(
                p, a, xs, ys, xq, yq
            )
            return after.sum(), after.detach()

        return torch.func.grad(objective, argnums=(0, 1) if with_lrs else 0, has_aux=True)

    return compiled(model, ("the MAML meta-gradient", inner, loss, with_lrs), build)
