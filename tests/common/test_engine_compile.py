"""``compile=True``: the vmap implementation, ``torch.compile``d, gives the uncompiled numbers, runs
models with dropout (vmap with ``randomness="different"``), and is ignored, with a log line, where
it does not apply (the per-task loop, models with buffers).

The compiler backend is ``aot_eager`` here: it traces exactly the graphs that inductor would compile
(where a missing ``randomness`` argument fails) in seconds rather than minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedmeta.common.meta import engine
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.metasgd import init_lrs, metasgd_step
from fedmeta.common.meta.protonet import protonet_step
from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import InnerConfig, TaskBatch
from fedmeta.common.models import init_params
from tests.common.reference import single_thread, tiny_mlp_problem


@pytest.fixture(autouse=True)
def _fast_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")
    with single_thread():
        yield


INNER = InnerConfig(steps=1, lr=0.3, proximal=0.1)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


def test_compiled_steps_equal_the_uncompiled_ones() -> None:
    model, theta, tasks = tiny_mlp_problem(seed=50, n_tasks=4)
    g, s = maml_step(model, theta, tasks, INNER, impl="vmap", compile=True)
    g0, s0 = maml_step(model, theta, tasks, INNER, impl="vmap")
    _close(g, g0)
    assert s.query_loss_after == pytest.approx(s0.query_loss_after, rel=1e-12)
    assert s.query_loss_before == pytest.approx(s0.query_loss_before, rel=1e-12)
    lrs = init_lrs(theta, 0.2)
    g, g_lr, _ = metasgd_step(model, theta, lrs, tasks, INNER, impl="vmap", compile=True)
    g0, g_lr0, _ = metasgd_step(model, theta, lrs, tasks, INNER, impl="vmap")
    _close(g, g0)
    _close(g_lr, g_lr0)
    d, s = reptile_step(model, theta, tasks, INNER, impl="vmap", compile=True, before_stats=False)
    d0, s0 = reptile_step(model, theta, tasks, INNER, impl="vmap")
    _close(d, d0)
    assert s.query_loss_after == pytest.approx(s0.query_loss_after, rel=1e-12)


def test_compiled_steps_run_models_with_dropout() -> None:
    torch.manual_seed(51)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    _, _, tasks = tiny_mlp_problem(seed=52)
    theta = init_params(model)
    g, _ = maml_step(model, theta, tasks, INNER, impl="vmap", compile=True)
    d, _ = reptile_step(model, theta, tasks, INNER, impl="vmap", compile=True)
    ys = torch.arange(3).repeat(2).expand(3, 6).clone()
    episodes = TaskBatch(tasks.xs, ys, tasks.xs.flip(1), ys.clone())
    p, _ = protonet_step(model, theta, episodes, n_way=3, impl="vmap", compile=True)
    for grads in (g, d, p):
        assert all(torch.isfinite(v).all() for v in grads.values())
        assert sum(float(v.abs().sum()) for v in grads.values()) > 0
    # Dropout is really on: the same step twice draws different masks.
    g2, _ = maml_step(model, theta, tasks, INNER, impl="vmap", compile=True)
    assert not torch.equal(g["0.weight"], g2["0.weight"])


def test_compile_is_ignored_on_the_loop_and_for_models_with_buffers(caplog: pytest.LogCaptureFixture) -> None:
    model, theta, tasks = tiny_mlp_problem(seed=53)
    with caplog.at_level(logging.INFO, logger="fedmeta.common.meta.engine"):  # whatever level an earlier test left on "fedmeta"
        g, _ = maml_step(model, theta, tasks, INNER, impl="loop", compile=True)
        d, _ = reptile_step(model, theta, tasks, INNER, impl="loop", compile=True)
    assert caplog.text.count("compile=True ignored for MLP") == 2
    assert "impl='loop'" in caplog.text
    g0, _ = maml_step(model, theta, tasks, INNER, impl="loop")
    d0, _ = reptile_step(model, theta, tasks, INNER, impl="loop")
    assert all(torch.equal(g[k], g0[k]) and torch.equal(d[k], d0[k]) for k in g)

    torch.manual_seed(54)
    with_buffers = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedmeta.common.meta.engine"):  # whatever level an earlier test left on "fedmeta"
        d, _ = reptile_step(with_buffers, init_params(with_buffers), tasks, INNER, impl="vmap", compile=True)
    assert "compile=True ignored for Sequential" in caplog.text
    assert "compiling" not in caplog.text
