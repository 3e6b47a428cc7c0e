"""The engine never changes the model: a native ``BatchNorm`` in training mode updates running
statistics in copies, on both implementations. First-order algorithms (Reptile, FOMAML, the metric
learners) may run models with native norm layers under vmap, and agree with the per-task loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedmeta.common.meta.engine import choose_impl
from fedmeta.common.meta.evaluate import adapt_and_evaluate
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.metasgd import init_lrs, metasgd_step
from fedmeta.common.meta.protonet import protonet_accuracy, protonet_logits, protonet_step
from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import InnerConfig, TaskBatch
from fedmeta.common.models import init_params
from tests.common.reference import single_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def _bn_model(seed: int, norm: str = "batch") -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.BatchNorm1d(8) if norm == "batch" else nn.LayerNorm(8)
    model = nn.Sequential(nn.Linear(5, 8), layer, nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        if norm == "batch":
            layer.running_mean.copy_(torch.randn(8))
            layer.running_var.copy_(torch.rand(8) + 0.5)
            layer.num_batches_tracked.fill_(7)
        layer.weight.add_(0.3 * torch.randn(8))
        layer.bias.add_(0.3 * torch.randn(8))
    return model


def _tasks(seed: int, n_tasks: int = 3) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    ys = torch.arange(3).repeat(2).expand(n_tasks, 6).clone()
    return TaskBatch(
        torch.randn(n_tasks, 6, 5, generator=gen, dtype=torch.float64), ys,
        torch.randn(n_tasks, 6, 5, generator=gen, dtype=torch.float64), ys.clone(),
    )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"


@pytest.mark.parametrize("impl", ["loop", "vmap"])
@pytest.mark.parametrize("training", [True, False])
def test_no_step_changes_the_models_buffers(impl: str, training: bool) -> None:
    model = _bn_model(40).train(training)
    theta = init_params(model)
    tasks = _tasks(41)
    state = _state(model)
    inner = InnerConfig(steps=2, lr=0.2)
    first_order = InnerConfig(steps=2, lr=0.2, first_order=True)
    reptile_step(model, theta, tasks, inner, impl=impl)
    maml_step(model, theta, tasks, first_order, impl=impl)
    metasgd_step(model, theta, init_lrs(theta, 0.1), tasks, first_order, impl=impl)
    protonet_step(model, theta, tasks, n_way=3, impl=impl)
    protonet_accuracy(model, theta, tasks, n_way=3, impl=impl)
    adapt_and_evaluate(model, theta, tasks, inner, impl=impl)
    if impl == "loop":  # second order: native batch norm is refused under vmap
        maml_step(model, theta, tasks, inner, impl=impl)
        metasgd_step(model, theta, init_lrs(theta, 0.1), tasks, inner, impl=impl)
        adapt(model, theta, tasks.xs[0], tasks.ys[0], inner)
        protonet_logits(model, theta, tasks.xs[0], tasks.ys[0], tasks.xq[0], n_way=3)
    _assert_unchanged(model, state)


def test_the_check_would_fail_without_copies() -> None:
    # The model's own forward does update its running statistics: the test above can fail.
    model = _bn_model(42)
    state = _state(model)
    model(_tasks(43).xs[0])
    with pytest.raises(AssertionError, match="changed"):
        _assert_unchanged(model, state)


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("training", [True, False])
def test_reptile_runs_native_norms_under_vmap_and_agrees_with_the_loop(norm: str, training: bool) -> None:
    model = _bn_model(44, norm).train(training)
    theta = init_params(model)
    tasks = _tasks(45, n_tasks=4)
    inner = InnerConfig(steps=3, lr=0.2, proximal=0.1)
    assert choose_impl(model, "cpu", "vmap", second_order=False) == "vmap"
    assert choose_impl(model, "cpu", second_order=False) == "vmap"
    dv, sv = reptile_step(model, theta, tasks, inner, impl="vmap")
    dl, sl = reptile_step(model, theta, tasks, inner, impl="loop")
    for k in dv:
        torch.testing.assert_close(dv[k], dl[k], rtol=1e-10, atol=1e-12)
    assert sv.query_loss_before == pytest.approx(sl.query_loss_before, rel=1e-10)
    assert sv.query_loss_after == pytest.approx(sl.query_loss_after, rel=1e-10)
    assert float(dv["1.weight"].abs().sum()) > 0


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_first_order_maml_and_protonet_under_vmap_agree_with_the_loop(norm: str) -> None:
    model = _bn_model(46, norm)
    theta = init_params(model)
    tasks = _tasks(47)
    inner = InnerConfig(steps=2, lr=0.2, first_order=True)
    gv, _ = maml_step(model, theta, tasks, inner, impl="vmap")
    gl, _ = maml_step(model, theta, tasks, inner, impl="loop")
    pv, _ = protonet_step(model, theta, tasks, n_way=3, impl="vmap")
    pl, _ = protonet_step(model, theta, tasks, n_way=3, impl="loop")
    for k in gv:
        torch.testing.assert_close(gv[k], gl[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pv[k], pl[k], rtol=1e-10, atol=1e-12)


def test_second_order_with_a_native_norm_is_still_refused_under_vmap() -> None:
    model = _bn_model(48, "layer")
    with pytest.raises(ValueError, match=r"impl='vmap' refused: the model has native \['LayerNorm'\]"):
        maml_step(model, init_params(model), _tasks(49), InnerConfig(steps=1), impl="vmap")
    assert choose_impl(model, "cuda") == "loop"
