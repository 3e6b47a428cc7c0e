"""``before_stats=False`` skips only the "before adaptation" statistic: the update or gradient is
bit-for-bit the one computed with ``before_stats=True``, and ``query_loss_before`` is NaN."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from fedmeta.common.meta.inner import forward, task_loss
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.matching import matching_step
from fedmeta.common.meta.metasgd import init_lrs, metasgd_step
from fedmeta.common.meta.protonet import protonet_step
from fedmeta.common.meta.relation import relation_step
from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import InnerConfig, MetaStats, Params, TaskBatch
from fedmeta.common.models import build_model, init_params
from tests.common.reference import single_thread, tiny_conv_problem, tiny_mlp_problem


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


INNER = InnerConfig(steps=2, lr=0.3, proximal=0.1)
Step = Callable[[nn.Module, Params, TaskBatch, str, bool], tuple[list[Params], MetaStats]]


def _maml(model: nn.Module, theta: Params, tasks: TaskBatch, impl: str, before: bool) -> tuple[list[Params], MetaStats]:
    g, s = maml_step(model, theta, tasks, INNER, impl=impl, before_stats=before)
    return [g], s


def _fomaml(model: nn.Module, theta: Params, tasks: TaskBatch, impl: str, before: bool) -> tuple[list[Params], MetaStats]:
    inner = InnerConfig(steps=2, lr=0.3, first_order=True)
    g, s = maml_step(model, theta, tasks, inner, impl=impl, before_stats=before, group_size=2 if impl == "vmap" else None)
    return [g], s


def _metasgd(model: nn.Module, theta: Params, tasks: TaskBatch, impl: str, before: bool) -> tuple[list[Params], MetaStats]:
    g, g_lr, s = metasgd_step(model, theta, init_lrs(theta, 0.2), tasks, INNER, impl=impl, before_stats=before)
    return [g, g_lr], s


def _reptile(model: nn.Module, theta: Params, tasks: TaskBatch, impl: str, before: bool) -> tuple[list[Params], MetaStats]:
    d, s = reptile_step(model, theta, tasks, INNER, impl=impl, before_stats=before)
    return [d], s


STEPS: dict[str, Step] = {"maml": _maml, "fomaml": _fomaml, "metasgd": _metasgd, "reptile": _reptile}


def _assert_same_except_before(with_before: tuple[list[Params], MetaStats], without: tuple[list[Params], MetaStats]) -> None:
    (grads_a, stats_a), (grads_b, stats_b) = with_before, without
    for a, b in zip(grads_a, grads_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert math.isnan(stats_b.query_loss_before) and math.isfinite(stats_a.query_loss_before)
    assert stats_a.query_loss_after == stats_b.query_loss_after
    assert (stats_a.n_tasks, stats_a.n_examples, stats_a.n_query) == (stats_b.n_tasks, stats_b.n_examples, stats_b.n_query)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
@pytest.mark.parametrize("algorithm", sorted(STEPS))
@pytest.mark.parametrize("setup", ["mlp", "conv"])
def test_adaptation_steps(algorithm: str, impl: str, setup: str) -> None:
    model, theta, tasks = tiny_mlp_problem(seed=30, n_tasks=3) if setup == "mlp" else tiny_conv_problem("batch", seed=31)
    step = STEPS[algorithm]
    with_before = step(model, theta, tasks, impl, True)
    _assert_same_except_before(with_before, step(model, theta, tasks, impl, False))
    # The statistic itself: the summed query loss of θ.
    expected = sum(
        float(task_loss(forward(model, theta, tasks.xq[t]), tasks.yq[t], "cross_entropy", reduction="sum"))
        for t in range(tasks.n_tasks)
    )
    assert with_before[1].query_loss_before == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_random_models_draw_the_same_numbers_with_and_without_the_statistic(impl: str) -> None:
    # The statistic is computed after the update, so a dropout model's masks do not depend on it.
    torch.manual_seed(32)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    _, _, tasks = tiny_mlp_problem(seed=33)
    theta = init_params(model)
    for step in STEPS.values():
        torch.manual_seed(1)
        with_before = step(model, theta, tasks, impl, True)
        torch.manual_seed(1)
        _assert_same_except_before(with_before, step(model, theta, tasks, impl, False))


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_metric_steps(impl: str) -> None:
    torch.manual_seed(34)
    embed = build_model("mlp", in_features=5, hidden=(8,), out_features=None).double()
    relation = build_model("relation-mlp", in_features=5, hidden=(8,), embed=4).double()
    ys = torch.arange(3).repeat(2).expand(3, 6).clone()
    episodes = TaskBatch(
        torch.randn(3, 6, 5, dtype=torch.float64), ys, torch.randn(3, 6, 5, dtype=torch.float64), ys.clone()
    )
    for step, model in ((protonet_step, embed), (matching_step, embed), (relation_step, relation)):
        theta = init_params(model)
        g_a, s_a = step(model, theta, episodes, n_way=3, impl=impl)
        g_b, s_b = step(model, theta, episodes, n_way=3, impl=impl, before_stats=False)
        _assert_same_except_before(([g_a], s_a), ([g_b], s_b))
        assert s_a.query_loss_before == s_a.query_loss_after
