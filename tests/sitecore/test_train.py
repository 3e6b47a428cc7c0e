"""The engine settings of the config reach every algorithm's training step at a site."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmeta.common import algorithms
from fedmeta.common.config import load_config
from fedmeta.common.data.registry import data_spec, load_site
from fedmeta.common.experiment import initial_parameters
from fedmeta.sitecore.train import train_update


@pytest.mark.parametrize("algorithm", ["reptile", "maml", "fomaml", "metasgd"])
def test_before_stats_is_off_by_default_and_changes_nothing_but_the_statistic(algorithm):
    def step(*overrides):  # type: ignore[no-untyped-def]
        cfg = load_config(None, [f"algorithm={algorithm}", *overrides])
        spec = data_spec(cfg.data)
        site = load_site(cfg.data, "Cleveland")
        state = algorithms.get(algorithm).initial_state(initial_parameters(cfg, spec), cfg)  # Meta-SGD: + rates
        return train_update(cfg, spec, site, state, rng=np.random.default_rng(3))

    plain, counted = step(), step("engine.before_stats=true")
    # Off by default: the extra forward pass is skipped and the statistic is NaN (not sent) ...
    assert math.isnan(plain.stats.query_loss_before)
    # ... on, it is θ's query loss before adaptation: higher than after for these first steps.
    assert math.isfinite(counted.stats.query_loss_before)
    assert counted.stats.query_loss_before > counted.stats.query_loss_after
    # The update itself is the same bit for bit.
    assert plain.arrays.keys() == counted.arrays.keys()
    for k in plain.arrays:
        np.testing.assert_array_equal(plain.arrays[k], counted.arrays[k])
    assert plain.stats.query_loss_after == counted.stats.query_loss_after
