"""Algorithms are records read by both sides: adding one is a file plus one registration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmeta.common import algorithms
from fedmeta.common import params as P
from fedmeta.common.algorithms.base import Algorithm, SiteWork, StepResult
from fedmeta.common.config import load_config
from fedmeta.common.errors import ConfigError
from fedmeta.common.meta.types import MetaStats


def _constant_gradient(work: SiteWork) -> StepResult:
    """A toy "meta-gradient": 1 for every entry, with the examples of one meta-batch."""
    tasks = work.draw_tasks()  # draws from the site's own data, as a real algorithm would
    n = tasks.n_examples
    ones = {k: torch.ones_like(v) for k, v in work.theta.items()}
    return StepResult(ones, MetaStats(n_tasks=tasks.n_tasks, n_examples=n, n_query=0,
                                      query_loss_before=0.0, query_loss_after=0.0))


TOY = Algorithm(name="toy-ones", title="Toy", paper="none", update_kind="gradient",
                site_step=_constant_gradient)


@pytest.fixture
def toy():
    algorithms.register(TOY)
    yield TOY
    algorithms.unregister(TOY.name)


def test_a_registered_toy_algorithm_runs_federated(tmp_path, toy, local_run) -> None:
    # θ after R rounds of outer SGD on a constant gradient of 1: θ₀ − R · lr, entry by entry.
    summary, _ = local_run(tmp_path, ["algorithm=toy-ones", "outer.lr=0.1", "rounds=3"])
    theta, meta = P.load(tmp_path / "run" / "final.safetensors")
    cfg = load_config(None, ["algorithm=toy-ones"])
    from fedmeta.common.data.registry import data_spec
    from fedmeta.common.experiment import initial_parameters

    theta0 = initial_parameters(cfg, data_spec(cfg.data))
    for k, v in theta0.items():
        np.testing.assert_allclose(theta[k], v - 0.3, rtol=0, atol=1e-6)
    assert summary["algorithm"] == "toy-ones" and json.loads(str(meta["config"]))["algorithm"] == "toy-ones"
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert all(len(x["accepted"]) == 4 for x in lines)


def test_unknown_and_duplicate_algorithms_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"algorithm = 'toy-ones': expected one of 'auto', 'reptile'"):
        load_config(None, ["algorithm=toy-ones"])
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register(algorithms.get("reptile"))
    with pytest.raises(ValueError, match="extra state needs an extra_prefix"):
        Algorithm(name="x", title="x", paper="x", update_kind="delta", site_step=_constant_gradient,
                  extra_state=lambda theta, cfg: {})


def test_builtin_records_say_what_each_algorithm_is() -> None:
    assert algorithms.names()[:10] == ("reptile", "fomaml", "maml", "metasgd", "protonet", "matching", "matching-fce",
                                      "relation", "fedavg", "glm")
    assert {a: algorithms.get(a).metric.name for a in algorithms.names() if algorithms.get(a).metric} == {
        "protonet": "prototypes", "matching": "matching", "matching-fce": "matching-fce", "relation": "relation"}
    assert algorithms.get("fomaml").first_order and not algorithms.get("maml").first_order
    assert algorithms.get("reptile").update_kind == "delta" == algorithms.get("fedavg").update_kind
    metasgd = algorithms.get("metasgd")
    theta = {"w": np.ones((2, 2), np.float32)}
    state = metasgd.initial_state(theta, load_config(None, ["inner.lr=0.2"]))
    assert set(state) == {"w", "lr::w"} and np.all(state["lr::w"] == np.float32(0.2))
    assert metasgd.split(state) == ({"w": state["w"]}, {"w": state["lr::w"]})
    # The outer optimiser descends −Δ̄ for deltas (θ + βΔ̄) and ḡ itself for gradients.
    d = {"w": np.array([1.0, -2.0])}
    np.testing.assert_array_equal(algorithms.get("reptile").direction(d)["w"], [-1.0, 2.0])
    np.testing.assert_array_equal(algorithms.get("maml").direction(d)["w"], [1.0, -2.0])


def test_renamed_setting_says_its_new_name() -> None:
    with pytest.raises(ConfigError, match=r"tasks.meta_steps was renamed: use tasks.meta_batches"):
        load_config(None, ["tasks.meta_steps=2"])
