"""Single-task adaptation against torch.optim.SGD, and the FedAvg client step."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from fedmeta.common.meta.fedavg import local_sgd
from fedmeta.common.meta.inner import adapt, task_loss
from fedmeta.common.meta.types import InnerConfig
from fedmeta.common.models import build_model, init_params
from tests.common.reference import single_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def _sgd_reference(model, x, y, *, steps, lr, proximal=0.0, loss="cross_entropy", batches=None):
    """Train a deep copy of ``model`` with torch.optim.SGD on loss + proximal/2 ||w - w0||²."""
    ref = copy.deepcopy(model)
    anchor = [p.detach().clone() for p in ref.parameters()]
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for s in range(steps):
        idx = batches[s] if batches is not None else slice(None)
        opt.zero_grad()
        value = task_loss(ref(x[idx]), y[idx], loss)
        value = value + proximal / 2 * sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor, strict=True))
        value.backward()
        opt.step()
    return dict(ref.named_parameters())


@pytest.mark.parametrize("proximal", [0.0, 0.7])
def test_adapt_matches_torch_sgd(proximal: float) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=4, hidden=(8,), out_features=3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    phi = adapt(model, init_params(model), x, y, InnerConfig(steps=4, lr=0.3, proximal=proximal))
    ref = _sgd_reference(model, x, y, steps=4, lr=0.3, proximal=proximal)
    for k, v in phi.items():
        torch.testing.assert_close(v, ref[k].detach())


def test_adapt_does_not_mutate_and_works_under_no_grad() -> None:
    torch.manual_seed(1)
    model = build_model("linear", in_features=3, out_features=2)
    theta = init_params(model)
    before = {k: v.clone() for k, v in theta.items()}
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with torch.no_grad():
        phi = adapt(model, theta, x, y, InnerConfig(steps=2, lr=0.5))
    assert all(torch.equal(theta[k], before[k]) for k in theta)
    assert not torch.equal(phi["linear.weight"], theta["linear.weight"])
    assert not phi["linear.weight"].requires_grad


def test_adapt_with_create_graph_is_differentiable() -> None:
    torch.manual_seed(2)
    model = build_model("linear", in_features=3, out_features=2)
    theta = {k: v.requires_grad_() for k, v in init_params(model).items()}
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    phi = adapt(model, theta, x, y, InnerConfig(steps=1, lr=0.5), create_graph=True)
    assert phi["linear.weight"].requires_grad


def test_adapt_per_parameter_lrs() -> None:
    torch.manual_seed(3)
    model = build_model("linear", in_features=2, out_features=1)
    theta = init_params(model)
    x, y = torch.randn(5, 2), torch.randn(5)
    lrs = {"linear.weight": torch.tensor([[0.1, 0.0]]), "linear.bias": torch.tensor([0.2])}
    phi = adapt(model, theta, x, y, InnerConfig(steps=1, lr=99.0), loss="mse", lrs=lrs)
    torch.testing.assert_close(phi["linear.weight"][0, 1], theta["linear.weight"][0, 1])
    pred = x @ theta["linear.weight"].T.squeeze(-1) + theta["linear.bias"]
    grad_b = 2 * (pred - y).mean()
    torch.testing.assert_close(phi["linear.bias"], theta["linear.bias"] - 0.2 * grad_b)


def test_adapt_rejects_bad_inputs() -> None:
    model = build_model("linear", in_features=2, out_features=2)
    theta = init_params(model)
    inner = InnerConfig(steps=1, lr=0.1)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        adapt(model, theta, torch.randn(3, 2), torch.zeros(3, dtype=torch.long), inner, loss="hinge")
    with pytest.raises(ValueError, match="3 inputs but 4 targets"):
        adapt(model, theta, torch.randn(3, 2), torch.zeros(4, dtype=torch.long), inner)
    with pytest.raises(ValueError, match="int64 class targets, got torch.float32"):
        adapt(model, theta, torch.randn(3, 2), torch.zeros(3), inner)
    with pytest.raises(ValueError, match=r"lrs keys differ from params: missing \['linear.bias'\]"):
        adapt(model, theta, torch.randn(3, 2), torch.zeros(3, dtype=torch.long), inner,
              lrs={"linear.weight": torch.ones(2, 2)})


def test_local_sgd_matches_torch_sgd_on_the_same_minibatches() -> None:
    torch.manual_seed(4)
    model = build_model("mlp", in_features=3, hidden=(5,), out_features=2).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    delta, stats = local_sgd(
        model, init_params(model), x, y, steps=7, lr=0.2, batch_size=4,
        generator=torch.Generator().manual_seed(11), proximal=0.3,
    )
    # The same order: epochs of randperm(10) from the same seed, consumed 4 at a time.
    g = torch.Generator().manual_seed(11)
    order = torch.cat([torch.randperm(10, generator=g) for _ in range(3)])
    batches = [order[4 * s: 4 * s + 4] for s in range(7)]
    ref = _sgd_reference(model, x, y, steps=7, lr=0.2, proximal=0.3, batches=batches)
    theta = init_params(model)
    for k in delta:
        torch.testing.assert_close(theta[k] + delta[k], ref[k].detach())
    assert stats.n_examples == 10 and stats.n_tasks == 1
    with torch.no_grad():
        expect_after = task_loss(ref_model_forward(model, ref, x), y, "cross_entropy", reduction="sum")
    assert stats.query_loss_after == pytest.approx(float(expect_after))
    assert stats.query_loss_after < stats.query_loss_before


def ref_model_forward(model, params, x):
    return torch.func.functional_call(model, {k: v.detach() for k, v in params.items()}, (x,))


def test_local_sgd_rejects_bad_settings() -> None:
    model = build_model("linear", in_features=2, out_features=2)
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        local_sgd(model, init_params(model), x, y, steps=1, lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match="lr must be > 0, got -1"):
        local_sgd(model, init_params(model), x, y, steps=1, lr=-1, batch_size=2)
