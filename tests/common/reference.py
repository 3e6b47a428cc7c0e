"""Independent references to check the engine against: the MAML / Meta-SGD meta-objective as a
plain per-task ``torch.autograd`` loop written from the papers' formulas (it uses no other
``fedmeta.common.meta`` code), central finite differences, and tiny float64 problems.

Used by the tests (``tests/common/test_meta_*.py``, ``test_engine_*.py``); it is not part of the
installed package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmeta.common.meta.types import TaskBatch
from fedmeta.common.models import build_model

Params = dict[str, torch.Tensor]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after).

    Tiny problems gain nothing from threads, and on a loaded 2-core machine two spinning OpenMP
    threads per process made these checks 10-50x slower (measured here).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ref_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.dtype == torch.int64:
        return F.cross_entropy(out, y)
    return ((out.squeeze(-1) - y) ** 2).mean()


def ref_meta_loss(
    model: nn.Module,
    theta: Params,
    tasks: TaskBatch,
    *,
    steps: int,
    lr: float | Params,
    proximal: float = 0.0,
    first_order: bool = False,
) -> torch.Tensor:
    """(1/T) Σ_t L(φ_t; query_t), φ_t from ``steps`` steps on support loss + proximal/2 ||φ − θ||²,
    written as a plain loop; differentiable with respect to ``theta`` (and ``lr`` when a dict)."""
    total = torch.zeros((), dtype=tasks.xs.dtype)
    with torch.enable_grad():
        for t in range(tasks.n_tasks):
            fast = dict(theta)
            for _ in range(steps):
                value = ref_loss(functional_call(model, fast, (tasks.xs[t],)), tasks.ys[t])
                value = value + proximal / 2 * sum(((fast[k] - theta[k]) ** 2).sum() for k in fast)
                grads = torch.autograd.grad(value, list(fast.values()), create_graph=not first_order)
                if first_order:
                    grads = tuple(g.detach() for g in grads)
                fast = {
                    k: fast[k] - (lr[k] if isinstance(lr, dict) else lr) * g
                    for k, g in zip(fast, grads, strict=True)
                }
            total = total + ref_loss(functional_call(model, fast, (tasks.xq[t],)), tasks.yq[t])
    return total / tasks.n_tasks


def leaf(params: Params) -> Params:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


def directional_fd(fn, params: Params, direction: Params, eps: float = 1e-6) -> float:
    """Central difference (f(p + εv) − f(p − εv)) / 2ε of a scalar function of a parameter dict."""
    with torch.no_grad():
        plus = leaf({k: v + eps * direction[k] for k, v in params.items()})
        minus = leaf({k: v - eps * direction[k] for k, v in params.items()})
    return (float(fn(plus).detach()) - float(fn(minus).detach())) / (2 * eps)


def dot(a: Params, b: Params) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def random_like(params: Params, generator: torch.Generator) -> Params:
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}


def tiny_mlp_problem(seed: int = 0, n_tasks: int = 3) -> tuple[nn.Module, Params, TaskBatch]:
    torch.manual_seed(seed)
    model = build_model("mlp", in_features=4, hidden=(6, 5), out_features=3).double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(
        torch.randn(n_tasks, 6, 4, dtype=torch.float64), torch.randint(0, 3, (n_tasks, 6)),
        torch.randn(n_tasks, 5, 4, dtype=torch.float64), torch.randint(0, 3, (n_tasks, 5)),
    )
    return model, theta, tasks


def tiny_conv_problem(norm: str, seed: int = 0, n_tasks: int = 2) -> tuple[nn.Module, Params, TaskBatch]:
    """A small Conv-4 (4 channels, 16x16 inputs) on 2-way 2-shot tasks with 2 queries per class."""
    torch.manual_seed(seed)
    model = build_model("conv4", in_channels=1, hidden=4, out_features=2, norm=norm, groups=2, image_size=16).double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    ys = torch.tensor([0, 0, 1, 1]).repeat(n_tasks, 1)
    tasks = TaskBatch(
        torch.randn(n_tasks, 4, 1, 16, 16, dtype=torch.float64), ys,
        torch.randn(n_tasks, 4, 1, 16, 16, dtype=torch.float64), ys.clone(),
    )
    return model, theta, tasks
