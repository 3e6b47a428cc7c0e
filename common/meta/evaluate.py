"""Few-shot evaluation of an initialisation: adapt to each task's support set, score its query set.

For every task ``t``: ``φ_t = adapt(θ, support_t)`` (:mod:`fedmeta.common.meta.inner`), then the
query loss and, for classification, the number of correctly classified query examples, of both
``θ`` (before) and ``φ_t`` (after). Everything is returned as sums and counts
(:class:`AdaptStats`), to be added across batches and sites before dividing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fedmeta.common.meta.engine import choose_impl, params_device
from fedmeta.common.meta.inner import (
    adapt_autograd,
    adapt_functional,
    batched_buffers,
    buffer_copies,
    check_lrs,
    check_task,
    forward,
    task_loss,
)
from fedmeta.common.meta.types import InnerConfig, Params, TaskBatch


@dataclass(frozen=True)
class AdaptStats:
    """Sums over query examples of ``n_tasks`` tasks; ``correct_*`` stay 0 for regression."""

    n_tasks: int
    n_query: int
    loss_before: float
    loss_after: float
    correct_before: int
    correct_after: int

    def __add__(self, other: AdaptStats) -> AdaptStats:
        return AdaptStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    @property
    def mean_loss_after(self) -> float:
        return self.loss_after / self.n_query if self.n_query else float("nan")

    @property
    def accuracy_after(self) -> float:
        return self.correct_after / self.n_query if self.n_query else float("nan")


def adapt_and_evaluate(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    lrs: Params | None = None,
    impl: str = "auto",
) -> AdaptStats:
    """Adapt ``params`` to each task's support set and score the query set before and after.
    Neither ``params`` nor ``model`` (its buffers included) is modified."""
    device = params_device(params)
    tasks = tasks.to(device)
    check_task(tasks.xs[0], tasks.ys[0], loss, where="evaluation support")
    check_task(tasks.xq[0], tasks.yq[0], loss, where="evaluation query")
    check_lrs(params, lrs)
    which = choose_impl(model, device, impl, second_order=False)
    theta = {k: v.detach() for k, v in params.items()}
    alpha = {k: v.detach() for k, v in lrs.items()} if lrs is not None else None
    inner = dataclasses.replace(inner, first_order=True)
    buffers = buffer_copies(model, device)

    def one_task(
        b: Params | None, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if which == "vmap":
            phi = adapt_functional(model, theta, xs, ys, inner, loss=loss, lrs=alpha, buffers=b)
        else:
            phi = adapt_autograd(model, theta, xs, ys, inner, loss=loss, lrs=alpha, buffers=b)
        with torch.no_grad():
            out = []
            for p in (theta, phi):
                pred = forward(model, {k: v.detach() for k, v in p.items()}, xq, b)
                out.append(task_loss(pred, yq, loss, reduction="sum"))
                correct = (pred.argmax(dim=-1) == yq).sum() if loss == "cross_entropy" else yq.new_zeros(())
                out.append(correct)
        return tuple(out)

    if which == "vmap":
        results = torch.func.vmap(
            one_task, in_dims=(0 if buffers is not None else None, 0, 0, 0, 0), randomness="different"
        )(batched_buffers(buffers, tasks.n_tasks), tasks.xs, tasks.ys, tasks.xq, tasks.yq)
        lb, cb, la, ca = (r.sum() for r in results)
    else:
        per_task = [one_task(buffers, tasks.xs[t], tasks.ys[t], tasks.xq[t], tasks.yq[t]) for t in range(tasks.n_tasks)]
        lb, cb, la, ca = (torch.stack([r[i] for r in per_task]).sum() for i in range(4))
    return AdaptStats(
        n_tasks=tasks.n_tasks,
        n_query=tasks.n_tasks * tasks.n_query,
        loss_before=float(lb),
        loss_after=float(la),
        correct_before=int(cb) if loss == "cross_entropy" else 0,
        correct_after=int(ca) if loss == "cross_entropy" else 0,
    )
