"""The FedAvg client step (McMahan et al. 2017): plain minibatch SGD on the site's data.

Starting from ``θ``, run ``steps`` SGD steps ``w ← w − η (∇L_B(w) + μ (w − θ))`` on minibatches
``B`` of ``batch_size`` examples drawn without replacement (a fresh permutation each epoch), and
return the delta ``w − θ``. ``μ = proximal`` > 0 gives the FedProx client (Li et al. 2020).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmeta.common import deadline
from fedmeta.common.meta.inner import check_task, forward, task_loss
from fedmeta.common.meta.types import MetaStats, Params


def local_sgd(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator | None = None,
    loss: str = "cross_entropy",
    proximal: float = 0.0,
) -> tuple[Params, MetaStats]:
    """Delta ``w − θ`` after ``steps`` minibatch SGD steps from ``θ = params``, and stats.

    The stats treat the local data as one task whose "query" set is all ``len(x)`` examples:
    ``query_loss_before``/``after`` are the summed loss of ``θ``/``w`` over them.
    ``generator`` (a CPU generator) makes the minibatch order reproducible.
    """
    check_task(x, y, loss, where="local_sgd")
    if steps < 0:
        raise ValueError(f"local_sgd steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"local_sgd lr must be > 0, got {lr}")
    if batch_size <= 0:
        raise ValueError(f"local_sgd batch_size must be > 0, got {batch_size}")
    if proximal < 0:
        raise ValueError(f"local_sgd proximal must be >= 0, got {proximal}")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("local_sgd got no examples")
    batch_size = min(batch_size, n)
    theta = {k: v.detach() for k, v in params.items()}
    w = {k: v.clone().requires_grad_() for k, v in theta.items()}
    order = torch.empty(0, dtype=torch.long)
    with torch.enable_grad():
        for _ in range(steps):
            deadline.check()
            if order.numel() < batch_size:
                order = torch.cat([order, torch.randperm(n, generator=generator)])
            idx, order = order[:batch_size].to(x.device), order[batch_size:]
            value = task_loss(forward(model, w, x[idx]), y[idx], loss)
            grads = torch.autograd.grad(value, list(w.values()), allow_unused=True, materialize_grads=True)
            with torch.no_grad():
                for (k, v), g in zip(w.items(), grads, strict=True):
                    step = g + proximal * (v - theta[k]) if proximal else g
                    v -= lr * step
    with torch.no_grad():
        before = float(task_loss(forward(model, theta, x), y, loss, reduction="sum"))
        after = float(task_loss(forward(model, w, x), y, loss, reduction="sum"))
    delta = {k: (w[k] - theta[k]).detach() for k in theta}
    return delta, MetaStats(
        n_tasks=1, n_examples=n, n_query=n, query_loss_before=before, query_loss_after=after
    )
