"""Task adaptation (the inner loop) shared by every optimisation-based meta-learner.

One inner step on a task with support set ``(x, y)``, from the meta-initialisation ``θ``:

    φ ← φ − α ⊙ (∇_φ L(φ; x, y) + λ (φ − θ)),      φ₀ = θ,

repeated ``inner.steps`` times, where ``L`` is the mean loss over the support set, ``α`` is
``inner.lr`` (or a per-parameter tensor from Meta-SGD, Li et al. 2017) and ``λ = inner.proximal``
is the proximal pull toward ``θ`` (the gradient of ``λ/2 ||φ − θ||²``; Rajeswaran et al. 2019,
Li et al. 2020 "FedProx"). With ``inner.first_order`` the step direction is treated as a constant
(FOMAML, Finn et al. 2017 §5.2): ``∂φ/∂θ = I``.

Two implementations compute the same φ: :func:`adapt_functional` (``torch.func.grad``; runs under
``torch.func.vmap``) and :func:`adapt_autograd` (``torch.autograd.grad``; the per-task loop).
:func:`adapt` is the public single-task entry point, used for evaluation and for a new hospital's
fine-tuning.

Example::

    >>> import torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> from fedmeta.common.meta.types import InnerConfig
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = build_model("mlp", in_features=3, hidden=(8,), out_features=2)
    >>> theta = init_params(model)
    >>> x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    >>> phi = adapt(model, theta, x, y, InnerConfig(steps=5, lr=0.1))
    >>> sorted(phi) == sorted(theta) and not phi["net.0.weight"].requires_grad
    True
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmeta.common import deadline
from fedmeta.common.meta.types import InnerConfig, Params, TaskBatch

Loss = Literal["cross_entropy", "mse"]
LOSSES = ("cross_entropy", "mse")


def check_loss(loss: str) -> None:
    """Raise ``ValueError`` unless ``loss`` is a known loss name."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def forward(
    model: nn.Module, params: Params, x: torch.Tensor, buffers: Params | None = None
) -> torch.Tensor:
    """``model(x)`` computed with ``params`` instead of the model's own parameters and, when given,
    ``buffers`` instead of its buffers (running statistics a forward may update in place land in
    ``buffers``, never in ``model``)."""
    if buffers is None:
        return functional_call(model, params, (x,))
    return functional_call(model, (params, buffers), (x,))


def buffer_copies(model: nn.Module, device: torch.device | None = None) -> Params | None:
    """Copies of ``model``'s buffers (on ``device``), for a forward that must not change the
    model (a ``BatchNorm`` in training mode updates its running statistics); ``None`` if it has none."""
    copies = {k: b.detach().to(device=device, copy=True) for k, b in model.named_buffers()}
    return copies or None


def batched_buffers(buffers: Params | None, n: int) -> Params | None:
    """``n`` stacked copies of each buffer (dimension 0), one per task under ``torch.func.vmap``:
    an in-place update of a shared buffer by per-task values is not possible there."""
    if buffers is None:
        return None
    return {k: b.unsqueeze(0).repeat(n, *(1,) * b.dim()) for k, b in buffers.items()}


def task_loss(
    out: torch.Tensor, y: torch.Tensor, loss: str, *, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits ``out`` (N, C) against class indices ``y`` (N,), or squared error
    of predictions ``out`` against float targets (a trailing output dimension of 1 is dropped)."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction=reduction)
    if loss == "mse":
        if out.shape != y.shape and out.shape[-1] == 1 and out.shape[:-1] == y.shape:
            out = out.squeeze(-1)
        return F.mse_loss(out, y, reduction=reduction)
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def query_loss_sum(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    *,
    loss: str,
    impl: Literal["vmap", "loop"],
    buffers: Params | None = None,
) -> float:
    """``Σ_t Σ_q L(params; x^q_t, y^q_t)``: the summed query loss of every task at ``params``, with
    no gradient (the "before adaptation" statistic), by ``torch.func.vmap`` or a per-task loop."""
    with torch.no_grad():
        if impl == "vmap":

            def one_task(b: Params | None, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
                return task_loss(forward(model, params, xq, b), yq, loss, reduction="sum")

            bufs = batched_buffers(buffers, tasks.n_tasks)
            losses = torch.func.vmap(
                one_task, in_dims=(0 if bufs is not None else None, 0, 0), randomness="different"
            )(bufs, tasks.xq, tasks.yq)
            return float(losses.sum())
        total = 0.0
        for t in range(tasks.n_tasks):
            total += float(task_loss(forward(model, params, tasks.xq[t], buffers), tasks.yq[t], loss, reduction="sum"))
        return total


def check_task(x: torch.Tensor, y: torch.Tensor, loss: str, *, where: str = "task") -> None:
    """Shape and dtype checks shared by the entry points."""
    check_loss(loss)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} targets")
    if loss == "cross_entropy" and y.dtype != torch.int64:
        raise ValueError(f"{where}: cross_entropy needs int64 class targets, got {y.dtype}")
    if loss == "mse" and not y.is_floating_point():
        raise ValueError(f"{where}: mse needs floating-point targets, got {y.dtype}")


def check_lrs(params: Params, lrs: Params | None) -> None:
    """``lrs`` must have exactly ``params``' keys and shapes (one learning rate per weight)."""
    if lrs is None:
        return
    if set(lrs) != set(params):
        raise ValueError(
            f"lrs keys differ from params: missing {sorted(set(params) - set(lrs))}, "
            f"extra {sorted(set(lrs) - set(params))}"
        )
    for k, v in params.items():
        if lrs[k].shape != v.shape:
            raise ValueError(f"lrs[{k!r}] has shape {tuple(lrs[k].shape)}, param has {tuple(v.shape)}")


def _step(
    fast: Params, grads: Params, anchor: Params, inner: InnerConfig, lrs: Params | None
) -> Params:
    new: Params = {}
    for k, phi in fast.items():
        g = grads[k]
        if inner.proximal:
            prox = inner.proximal * (phi - anchor[k])
            g = g + (prox.detach() if inner.first_order else prox)
        new[k] = phi - (lrs[k] if lrs is not None else inner.lr) * g
    return new


def adapt_functional(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    lrs: Params | None = None,
    buffers: Params | None = None,
) -> Params:
    """The inner loop with ``torch.func.grad``; differentiable with respect to ``params`` and
    ``lrs`` (second order) unless ``inner.first_order``. Safe to call under ``torch.func.vmap``.
    ``buffers``: used instead of the model's buffers (see :func:`forward`)."""

    def support_loss(p: Params, b: Params | None = None) -> torch.Tensor:
        return task_loss(forward(model, p, x, b), y, loss)

    fast = dict(params)
    for _ in range(inner.steps):
        if buffers is None:
            grads = torch.func.grad(support_loss)(fast)
        else:  # buffers as an input of the transform, so that the forward may update them in place
            grads = torch.func.grad(support_loss)(fast, buffers)
        if inner.first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = _step(fast, grads, params, inner, lrs)
    return fast


def adapt_autograd(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    lrs: Params | None = None,
    create_graph: bool = False,
    buffers: Params | None = None,
) -> Params:
    """The inner loop with ``torch.autograd.grad``.

    ``create_graph=True`` keeps φ differentiable with respect to ``params``/``lrs`` (through the
    inner gradients too unless ``inner.first_order``); ``create_graph=False`` returns detached φ.
    ``buffers``: used instead of the model's buffers (see :func:`forward`).
    """
    with torch.enable_grad():
        if create_graph:
            fast = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
            anchor = params
        else:
            fast = {k: v.detach().requires_grad_() for k, v in params.items()}
            anchor = {k: v.detach() for k, v in params.items()}
            lrs = {k: v.detach() for k, v in lrs.items()} if lrs is not None else None
        second_order = create_graph and not inner.first_order
        for _ in range(inner.steps):
            deadline.check()  # the autograd path only: the functional one may be vmapped or compiled
            value = task_loss(forward(model, fast, x, buffers), y, loss)
            grads = torch.autograd.grad(
                value,
                list(fast.values()),
                create_graph=second_order,
                allow_unused=True,
                materialize_grads=True,
            )
            fast = _step(fast, dict(zip(fast, grads, strict=True)), anchor, inner, lrs)
            if not create_graph:
                fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
    if not create_graph:
        fast = {k: v.detach() for k, v in fast.items()}
    return fast


def adapt(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    inner: InnerConfig,
    *,
    loss: str = "cross_entropy",
    lrs: Params | None = None,
    create_graph: bool = False,
) -> Params:
    """Adapt ``params`` to one task with full-batch gradient steps on ``(x, y)``.

    ``φ_{s+1} = φ_s − α ⊙ (∇L(φ_s; x, y) + λ(φ_s − θ))`` for ``s < inner.steps`` with
    ``α = lrs`` (per-parameter, Meta-SGD) when given, else ``inner.lr``; ``λ = inner.proximal``.
    Works under ``torch.no_grad()``. Returns new tensors (``params`` is not modified): detached
    unless ``create_graph``, in which case φ is differentiable with respect to ``params`` and
    ``lrs`` (second order unless ``inner.first_order``). ``model`` is not changed either: its
    buffers (running statistics) are replaced by copies during the forward passes.
    """
    check_task(x, y, loss, where="adapt")
    check_lrs(params, lrs)
    return adapt_autograd(
        model, params, x, y, inner, loss=loss, lrs=lrs, create_graph=create_graph,
        buffers=buffer_copies(model, x.device),
    )
