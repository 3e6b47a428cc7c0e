"""Implementation choice, device resolution, and batched few-shot evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedmeta.common.meta.engine import choose_impl, params_device, resolve_device
from fedmeta.common.meta.evaluate import adapt_and_evaluate
from fedmeta.common.meta.inner import adapt, forward, task_loss
from fedmeta.common.meta.types import InnerConfig
from fedmeta.common.models import build_model
from tests.common.reference import single_thread, tiny_mlp_problem


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


def test_auto_rule() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    mlp = build_model("mlp", in_features=3, out_features=2)
    conv = build_model("conv4", hidden=8, out_features=2, norm="batch")
    native_bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert choose_impl(mlp, cpu) == "vmap"
    assert choose_impl(mlp, cuda) == "vmap"
    assert choose_impl(conv, cpu) == "loop"
    assert choose_impl(conv, cuda) == "vmap"
    assert choose_impl(native_bn, cuda) == "loop"
    assert choose_impl(conv, cpu, "vmap") == "vmap"
    assert choose_impl(mlp, cpu, "loop") == "loop"


def test_bad_requests() -> None:
    layer_norm = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    with pytest.raises(ValueError, match=r"impl='vmap' refused: the model has native \['LayerNorm'\]"):
        choose_impl(layer_norm, "cpu", "vmap")
    with pytest.raises(ValueError, match="unknown impl 'gpu'"):
        choose_impl(layer_norm, "cpu", "gpu")
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")
    with pytest.raises(ValueError, match="params must all be on one device, found none"):
        params_device({})


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_adapt_and_evaluate_matches_per_task_adapt(impl: str) -> None:
    model, theta, tasks = tiny_mlp_problem(seed=20, n_tasks=4)
    inner = InnerConfig(steps=3, lr=0.4, proximal=0.1)
    stats = adapt_and_evaluate(model, theta, tasks, inner, impl=impl)
    loss_after = correct_after = loss_before = 0.0
    for t in range(4):
        phi = adapt(model, theta, tasks.xs[t], tasks.ys[t], inner)
        out = forward(model, phi, tasks.xq[t])
        loss_after += float(task_loss(out, tasks.yq[t], "cross_entropy", reduction="sum"))
        correct_after += int((out.argmax(1) == tasks.yq[t]).sum())
        loss_before += float(task_loss(forward(model, theta, tasks.xq[t]), tasks.yq[t], "cross_entropy", reduction="sum"))
    assert stats.loss_after == pytest.approx(loss_after)
    assert stats.loss_before == pytest.approx(loss_before)
    assert stats.correct_after == correct_after
    assert (stats.n_tasks, stats.n_query) == (4, 20)
    assert (stats + stats).correct_after == 2 * correct_after
