"""MAML and FOMAML meta-gradients against finite differences (float64) and an independent per-task loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedmeta.common.meta.inner import adapt, forward, task_loss
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.types import InnerConfig, TaskBatch
from fedmeta.common.models import build_model
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

SETUPS = {
    "mlp": lambda: tiny_mlp_problem(seed=0),
    "conv-batchnorm": lambda: tiny_conv_problem("batch", seed=1),
    "conv-groupnorm": lambda: tiny_conv_problem("group", seed=2),
}


def _ref_grad(model, theta, tasks, inner: InnerConfig):
    p = leaf(theta)
    value = ref_meta_loss(
        model, p, tasks, steps=inner.steps, lr=inner.lr, proximal=inner.proximal,
        first_order=inner.first_order,
    )
    return dict(zip(p, torch.autograd.grad(value, list(p.values())), strict=True))


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_second_order_meta_gradient_matches_finite_differences_and_reference(setup: str, impl: str) -> None:
    model, theta, tasks = SETUPS[setup]()
    inner = InnerConfig(steps=2, lr=0.3, proximal=0.5)
    grad, stats = maml_step(model, theta, tasks, inner, impl=impl)

    reference = _ref_grad(model, theta, tasks, inner)
    for k in grad:
        torch.testing.assert_close(grad[k], reference[k], rtol=1e-7, atol=1e-9)

    def meta_loss(p):
        return ref_meta_loss(model, p, tasks, steps=2, lr=0.3, proximal=0.5)

    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        v = random_like(theta, gen)
        assert dot(grad, v) == pytest.approx(directional_fd(meta_loss, theta, v), rel=1e-5, abs=1e-8)
    assert stats.n_tasks == tasks.n_tasks
    assert stats.query_loss_after / stats.n_query == pytest.approx(float(meta_loss(leaf(theta)).detach()))


@pytest.mark.parametrize("impl", ["vmap", "loop"])
@pytest.mark.parametrize("setup", ["mlp", "conv-batchnorm"])
def test_first_order_is_the_mean_query_gradient_at_the_adapted_weights(impl: str, setup: str) -> None:
    # FOMAML is not the gradient of any function of θ, so finite differences do not apply: it is
    # checked against its definition, (1/T) Σ_t ∇L(φ_t; query_t), and the reference loop.
    model, theta, tasks = SETUPS[setup]()
    inner = InnerConfig(steps=3, lr=0.3, proximal=0.2, first_order=True)
    grad, _ = maml_step(model, theta, tasks, inner, impl=impl)
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(tasks.n_tasks):
        phi = leaf(adapt(model, theta, tasks.xs[t], tasks.ys[t], inner))
        value = task_loss(forward(model, phi, tasks.xq[t]), tasks.yq[t], "cross_entropy")
        for k, g in zip(phi, torch.autograd.grad(value, list(phi.values())), strict=True):
            expected[k] += g / tasks.n_tasks
    for k in grad:
        torch.testing.assert_close(grad[k], expected[k])
    reference = _ref_grad(model, theta, tasks, inner)
    for k in grad:
        torch.testing.assert_close(grad[k], reference[k])


def test_first_order_differs_from_second_order() -> None:
    model, theta, tasks = tiny_mlp_problem(seed=4)
    g2, _ = maml_step(model, theta, tasks, InnerConfig(steps=2, lr=0.5))
    g1, _ = maml_step(model, theta, tasks, InnerConfig(steps=2, lr=0.5, first_order=True))
    assert not torch.allclose(g1["net.0.weight"], g2["net.0.weight"], atol=1e-6)


def test_zero_inner_steps_is_the_plain_query_gradient() -> None:
    model, theta, tasks = tiny_mlp_problem(seed=5)
    grad, stats = maml_step(model, theta, tasks, InnerConfig(steps=0))
    p = leaf(theta)
    value = sum(task_loss(forward(model, p, tasks.xq[t]), tasks.yq[t], "cross_entropy") for t in range(3)) / 3
    for k, g in zip(p, torch.autograd.grad(value, list(p.values())), strict=True):
        torch.testing.assert_close(grad[k], g)
    assert stats.query_loss_before == pytest.approx(stats.query_loss_after)


def test_grouped_vmap_equals_one_pass_and_params_are_untouched() -> None:
    model, theta, tasks = tiny_mlp_problem(seed=6, n_tasks=5)
    before = {k: v.clone() for k, v in theta.items()}
    inner = InnerConfig(steps=2, lr=0.3)
    whole, s1 = maml_step(model, theta, tasks, inner, impl="vmap")
    grouped, s2 = maml_step(model, theta, tasks, inner, impl="vmap", group_size=2)
    for k in whole:
        torch.testing.assert_close(whole[k], grouped[k])
    assert s1.query_loss_after == pytest.approx(s2.query_loss_after)
    assert all(torch.equal(theta[k], before[k]) and not theta[k].requires_grad for k in theta)


def test_regression_loss() -> None:
    torch.manual_seed(8)
    model = build_model("mlp", in_features=1, hidden=(8,), out_features=1).double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(
        torch.randn(3, 5, 1, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64),
        torch.randn(3, 4, 1, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64),
    )
    inner = InnerConfig(steps=2, lr=0.1)
    gv, _ = maml_step(model, theta, tasks, inner, loss="mse", impl="vmap")
    gl, _ = maml_step(model, theta, tasks, inner, loss="mse", impl="loop")
    reference = _ref_grad(model, theta, tasks, inner)
    for k in gv:
        torch.testing.assert_close(gv[k], reference[k])
        torch.testing.assert_close(gl[k], reference[k])


def test_native_batch_norm_is_refused_under_vmap() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"impl='vmap' refused: the model has native \['BatchNorm1d'\]"):
        maml_step(model, theta, tasks, InnerConfig(), impl="vmap")


def test_bad_group_size() -> None:
    model, theta, tasks = tiny_mlp_problem()
    with pytest.raises(ValueError, match="group_size must be a positive number of tasks, got 0"):
        maml_step(model, theta, tasks, InnerConfig(), group_size=0)
