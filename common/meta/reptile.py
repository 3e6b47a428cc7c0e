"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task ``t`` of the meta-batch, adapt ``θ`` with ``k = inner.steps`` gradient steps to get
``φ_t`` (see :mod:`fedmeta.common.meta.inner`); the update direction is

    Δ = (1/T) Σ_t (φ_t − θ),

and the outer step is ``θ ← θ + ε Δ`` (the batched version of Reptile, Nichol et al. Alg. 2), done
by the caller — in fedmeta, by the server after averaging clients' deltas.

Which examples the inner loop trains on: by default (``use_query=True``) the whole task, support
∪ query, full batch, since Reptile has no separate outer loss and every example should shape
``φ_t``. With ``use_query=False`` only the support set is used. The stats report the query loss
of ``θ`` (before, skipped with ``before_stats=False``) and of ``φ_t`` (after); with
``use_query=True`` "after" is a training loss.

Example::

    >>> import torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> from fedmeta.common.meta.types import InnerConfig, TaskBatch
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("mlp", in_features=1, hidden=(16,), out_features=1)
    >>> tasks = TaskBatch(torch.randn(4, 10, 1), torch.randn(4, 10), torch.randn(4, 5, 1), torch.randn(4, 5))
    >>> delta, stats = reptile_step(model, init_params(model), tasks, InnerConfig(steps=3, lr=0.01), loss="mse")
    >>> stats.n_tasks, stats.n_query
    (4, 20)
"""

from __future__ import annotations

import dataclasses
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
    check_task,
    forward,
    query_loss_sum,
    task_loss,
)
from fedmeta.common.meta.types import InnerConfig, MetaStats, Params, TaskBatch


def reptile_step(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    impl: str = "auto",
    use_query: bool = True,
    compile: bool = False,
    before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Reptile direction ``Δ = mean_t(φ_t − θ)`` for one meta-batch, and its stats.

    ``inner.first_order`` is irrelevant (no outer gradient is taken). ``impl``: ``"auto"``,
    ``"vmap"`` or ``"loop"`` (:func:`fedmeta.common.meta.engine.choose_impl`; no second-order
    gradient is taken, so models with native norm layers may use vmap). ``compile=True``
    ``torch.compile``s the vmapped adaptation (ignored, with a log line, on the per-task loop or for
    a model with buffers). ``before_stats=False``: no query forward of ``θ``;
    ``stats.query_loss_before`` is NaN. Neither ``params`` nor ``model`` is modified.
    """
    device = params_device(params)
    tasks = tasks.to(device)
    check_task(tasks.xs[0], tasks.ys[0], loss, where="reptile_step support")
    check_task(tasks.xq[0], tasks.yq[0], loss, where="reptile_step query")
    which = choose_impl(model, device, impl, second_order=False)
    theta = {k: v.detach() for k, v in params.items()}
    inner = dataclasses.replace(inner, first_order=True)
    buffers = buffer_copies(model, device)

    def one_task(
        p: Params, b: Params | None, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
    ) -> tuple[Params, torch.Tensor]:
        x = torch.cat([xs, xq]) if use_query else xs
        y = torch.cat([ys, yq]) if use_query else ys
        if which == "vmap":
            phi = adapt_functional(model, p, x, y, inner, loss=loss, buffers=b)
        else:
            phi = adapt_autograd(model, p, x, y, inner, loss=loss, buffers=b)
        with torch.no_grad():
            after = task_loss(forward(model, phi, xq, b), yq, loss, reduction="sum")
        return {k: (phi[k] - p[k]).detach() for k in p}, after

    compile = compile and compile_applies(model, which, buffers)
    if which == "vmap":
        if compile:
            key = ("the Reptile adaptation", inner, loss, use_query)
            batched = compiled(model, key, lambda: _vmapped(one_task))
        else:
            batched = _vmapped(one_task, with_buffers=buffers is not None)
        deltas, after = batched(
            theta, batched_buffers(buffers, tasks.n_tasks), tasks.xs, tasks.ys, tasks.xq, tasks.yq
        )
        delta = {k: d.mean(dim=0) for k, d in deltas.items()}
        loss_after = float(after.sum())
    else:
        delta = {k: torch.zeros_like(v) for k, v in theta.items()}
        loss_after = 0.0
        for t in range(tasks.n_tasks):
            deadline.check()
            d, a = one_task(theta, buffers, tasks.xs[t], tasks.ys[t], tasks.xq[t], tasks.yq[t])
            for k in delta:
                delta[k] += d[k]
            loss_after += float(a)
        delta = {k: v / tasks.n_tasks for k, v in delta.items()}
    loss_before = (
        query_loss_sum(model, theta, tasks, loss=loss, impl=which, buffers=buffers)
        if before_stats
        else float("nan")
    )
    stats = MetaStats(
        n_tasks=tasks.n_tasks,
        n_examples=tasks.n_examples,
        n_query=tasks.n_tasks * tasks.n_query,
        query_loss_before=loss_before,
        query_loss_after=loss_after,
    )
    return delta, stats


def _vmapped(fn: Callable[..., Any], *, with_buffers: bool = False) -> Callable[..., Any]:
    """``fn(params, buffers, xs, ys, xq, yq)`` over the tasks: params shared, buffers (when
    given) and data batched along dimension 0."""
    return torch.func.vmap(
        fn, in_dims=(None, 0 if with_buffers else None, 0, 0, 0, 0), randomness="different"
    )
