"""Meta-SGD: the gradient with respect to θ and, separately, with respect to the learning rates α."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedmeta.common.meta.inner import forward, task_loss
from fedmeta.common.meta.metasgd import init_lrs, metasgd_step
from fedmeta.common.meta.types import InnerConfig
from tests.common.reference import (
    directional_fd,
    dot,
    leaf,
    random_like,
    ref_meta_loss,
    single_thread,
    tiny_conv_problem,
    tiny_mlp_problem,
)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def _random_lrs(theta, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.05 + 0.3 * torch.rand(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}


@pytest.mark.parametrize("impl", ["vmap", "loop"])
@pytest.mark.parametrize("setup", ["mlp", "conv-batchnorm"])
def test_gradients_match_reference_and_finite_differences(impl: str, setup: str) -> None:
    model, theta, tasks = tiny_mlp_problem(seed=10) if setup == "mlp" else tiny_conv_problem("batch", seed=11)
    lrs = _random_lrs(theta, seed=12)
    inner = InnerConfig(steps=2, proximal=0.3)
    g_theta, g_lrs, _ = metasgd_step(model, theta, lrs, tasks, inner, impl=impl)

    p, a = leaf(theta), leaf(lrs)
    value = ref_meta_loss(model, p, tasks, steps=2, lr=a, proximal=0.3)
    ref = torch.autograd.grad(value, list(p.values()) + list(a.values()))
    for i, k in enumerate(theta):
        torch.testing.assert_close(g_theta[k], ref[i], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(g_lrs[k], ref[len(theta) + i], rtol=1e-7, atol=1e-9)

    gen = torch.Generator().manual_seed(13)
    v = random_like(theta, gen)
    fd_theta = directional_fd(lambda q: ref_meta_loss(model, q, tasks, steps=2, lr=lrs, proximal=0.3), theta, v)
    assert dot(g_theta, v) == pytest.approx(fd_theta, rel=1e-5, abs=1e-8)
    fd_lrs = directional_fd(
        lambda q: ref_meta_loss(model, leaf(theta), tasks, steps=2, lr=q, proximal=0.3), lrs, v
    )
    assert dot(g_lrs, v) == pytest.approx(fd_lrs, rel=1e-5, abs=1e-8)


def test_one_first_order_step_lr_gradient_by_formula() -> None:
    # φ_t = θ − α ⊙ g^s_t  =>  ∇_α = −(1/T) Σ_t ∇L(φ_t; query_t) ⊙ g^s_t, and ∇_θ = (1/T) Σ_t ∇L(φ_t; query_t).
    model, theta, tasks = tiny_mlp_problem(seed=14)
    lrs = _random_lrs(theta, seed=15)
    g_theta, g_lrs, _ = metasgd_step(model, theta, lrs, tasks, InnerConfig(steps=1, first_order=True))
    exp_theta = {k: torch.zeros_like(v) for k, v in theta.items()}
    exp_lrs = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(tasks.n_tasks):
        p = leaf(theta)
        gs = torch.autograd.grad(task_loss(forward(model, p, tasks.xs[t]), tasks.ys[t], "cross_entropy"), list(p.values()))
        phi = leaf({k: theta[k] - lrs[k] * g for k, g in zip(theta, gs, strict=True)})
        gq = torch.autograd.grad(task_loss(forward(model, phi, tasks.xq[t]), tasks.yq[t], "cross_entropy"), list(phi.values()))
        for k, a, b in zip(theta, gq, gs, strict=True):
            exp_theta[k] += a / tasks.n_tasks
            exp_lrs[k] -= a * b / tasks.n_tasks
    for k in theta:
        torch.testing.assert_close(g_theta[k], exp_theta[k])
        torch.testing.assert_close(g_lrs[k], exp_lrs[k])
    # The learning-rate gradient is its own quantity, not θ's gradient.
    assert not torch.allclose(g_lrs["net.0.weight"], g_theta["net.0.weight"])


def test_uniform_lrs_reduce_to_maml() -> None:
    from fedmeta.common.meta.maml import maml_step

    model, theta, tasks = tiny_mlp_problem(seed=16)
    inner = InnerConfig(steps=2, lr=0.2)
    g_theta, _, stats = metasgd_step(model, theta, init_lrs(theta, 0.2), tasks, inner)
    g_maml, stats_maml = maml_step(model, theta, tasks, inner)
    for k in theta:
        torch.testing.assert_close(g_theta[k], g_maml[k])
    assert stats.query_loss_after == pytest.approx(stats_maml.query_loss_after)


def test_init_lrs_and_bad_inputs() -> None:
    model, theta, tasks = tiny_mlp_problem()
    lrs = init_lrs(theta, 0.01)
    assert all(torch.all(v == 0.01) and v.shape == theta[k].shape for k, v in lrs.items())
    with pytest.raises(ValueError, match="initial learning rate must be finite, got nan"):
        init_lrs(theta, float("nan"))
    bad = dict(lrs)
    bad["net.0.bias"] = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lrs\['net.0.bias'\] has shape \(2,\), param has \(6,\)"):
        metasgd_step(model, theta, bad, tasks, InnerConfig())
