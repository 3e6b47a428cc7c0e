"""Reptile's delta against a hand computation, and the vmap and loop implementations against each other."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import InnerConfig, TaskBatch
from fedmeta.common.models import build_model
from tests.common.reference import single_thread, tiny_conv_problem


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def _line_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = build_model("linear", in_features=1, out_features=1).double()
    zeros = {"linear.weight": torch.zeros(1, 1, dtype=torch.float64), "linear.bias": torch.zeros(1, dtype=torch.float64)}
    return model, zeros


def _two_tasks() -> TaskBatch:
    # task 1: support (1 -> 1), query (2 -> 3); task 2: support (1 -> 2), query (1 -> 2)
    xs = torch.tensor([[[1.0]], [[1.0]]], dtype=torch.float64)
    ys = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    xq = torch.tensor([[[2.0]], [[1.0]]], dtype=torch.float64)
    yq = torch.tensor([[3.0], [2.0]], dtype=torch.float64)
    return TaskBatch(xs, ys, xq, yq)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_reptile_one_step_by_hand(impl: str) -> None:
    # From w = b = 0 on support ∪ query with MSE, the gradient is 2·mean((wx+b−y)·[x, 1]):
    # task 1: (−7, −4) -> φ = (0.7, 0.4); task 2: (−4, −4) -> φ = (0.4, 0.4); Δ = (0.55, 0.4).
    model, theta = _line_model()
    delta, stats = reptile_step(model, theta, _two_tasks(), InnerConfig(steps=1, lr=0.1), loss="mse", impl=impl)
    torch.testing.assert_close(delta["linear.weight"], torch.tensor([[0.55]], dtype=torch.float64))
    torch.testing.assert_close(delta["linear.bias"], torch.tensor([0.4], dtype=torch.float64))
    # query losses: before 3² + 2² = 13; after (1.8 − 3)² + (0.8 − 2)² = 1.44 + 1.44
    assert stats.query_loss_before == pytest.approx(13.0)
    assert stats.query_loss_after == pytest.approx(2.88)
    assert (stats.n_tasks, stats.n_examples, stats.n_query) == (2, 4, 2)


def test_reptile_two_steps_with_proximal_by_hand() -> None:
    # Task 1, second step from (0.7, 0.4): residuals (0.1, −1.2) -> grad (−2.3, −1.1); the proximal
    # term 1.0·(φ − θ) adds (0.7, 0.4): step (−1.6, −0.7)·0.1 -> φ = (0.86, 0.47).
    model, theta = _line_model()
    tasks = _two_tasks()
    one = TaskBatch(tasks.xs[:1], tasks.ys[:1], tasks.xq[:1], tasks.yq[:1])
    delta, _ = reptile_step(model, theta, one, InnerConfig(steps=2, lr=0.1, proximal=1.0), loss="mse")
    torch.testing.assert_close(delta["linear.weight"], torch.tensor([[0.86]], dtype=torch.float64))
    torch.testing.assert_close(delta["linear.bias"], torch.tensor([0.47], dtype=torch.float64))


def test_reptile_support_only() -> None:
    # Only the support (1 -> 1) of task 1: grad (−2, −2) -> φ = (0.2, 0.2).
    model, theta = _line_model()
    tasks = _two_tasks()
    one = TaskBatch(tasks.xs[:1], tasks.ys[:1], tasks.xq[:1], tasks.yq[:1])
    delta, _ = reptile_step(model, theta, one, InnerConfig(steps=1, lr=0.1), loss="mse", use_query=False)
    torch.testing.assert_close(delta["linear.bias"], torch.tensor([0.2], dtype=torch.float64))


def test_reptile_vmap_and_loop_agree_on_an_mlp() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=13, hidden=(16, 16), out_features=2).double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(
        torch.randn(6, 10, 13, dtype=torch.float64), torch.randint(0, 2, (6, 10)),
        torch.randn(6, 8, 13, dtype=torch.float64), torch.randint(0, 2, (6, 8)),
    )
    inner = InnerConfig(steps=3, lr=0.2, proximal=0.1)
    dv, sv = reptile_step(model, theta, tasks, inner, impl="vmap")
    dl, sl = reptile_step(model, theta, tasks, inner, impl="loop")
    for k in dv:
        torch.testing.assert_close(dv[k], dl[k])
    assert sv.query_loss_after == pytest.approx(sl.query_loss_after)
    assert sv.query_loss_before == pytest.approx(sl.query_loss_before)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_reptile_vmap_and_loop_agree_on_a_conv_net(norm: str) -> None:
    model, theta, tasks = tiny_conv_problem(norm, seed=3)
    inner = InnerConfig(steps=2, lr=0.3)
    dv, _ = reptile_step(model, theta, tasks, inner, impl="vmap")
    dl, _ = reptile_step(model, theta, tasks, inner, impl="loop")
    for k in dv:
        torch.testing.assert_close(dv[k], dl[k])
    assert float(dv["head.weight"].abs().sum()) > 0


def test_reptile_rejects_bad_inputs() -> None:
    model, theta = _line_model()
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        reptile_step(model, theta, _two_tasks(), InnerConfig(), loss="mse", impl="fast")
    with pytest.raises(ValueError, match="mse needs floating-point targets"):
        t = _two_tasks()
        reptile_step(model, theta, TaskBatch(t.xs, t.ys.long(), t.xq, t.yq.long()), InnerConfig(), loss="mse")
