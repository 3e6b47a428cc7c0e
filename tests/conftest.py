"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

FAST = ["rounds=3", "eval.adapt_steps=5", "tasks.meta_batch=4"]


def run_local(tmp_path, overrides=(), *, name="run", grid_hook=None, **kwargs):
    """Run an experiment over an in-process grid of the four Fed-Heart-Disease hospitals."""
    from fedmeta.client.app import app as client_app
    from fedmeta.common.config import load_config
    from fedmeta.server.driver import run_experiment
    from fedmeta.server.local_grid import LocalGrid

    cfg = load_config(None, [*FAST, *overrides])
    grid = LocalGrid(client_app, [{"partition-id": i} for i in range(4)])
    if grid_hook:
        grid_hook(grid)
    summary = run_experiment(grid, cfg, tmp_path / name, expected_nodes=4, progress=lambda _: None, **kwargs)
    return summary, grid


@pytest.fixture
def local_run():
    """``local_run(tmp_path, overrides, name=..., grid_hook=..., **run_experiment_kwargs)``."""
    return run_local
