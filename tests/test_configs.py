"""Every experiment in configs/ loads and validates; each Fed-Heart-Disease one runs a round."""

from pathlib import Path

import pytest

from fedmeta.cli.simulate import simulate
from fedmeta.common import algorithms
from fedmeta.common.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_is_a_heart_config_per_algorithm():
    algos = {load_config(p).algorithm for p in CONFIGS if p.name.startswith("heart")}
    assert algos == {"auto", *algorithms.names()}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.rounds >= 1


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("heart")], ids=lambda p: p.name)
def test_heart_config_runs_a_round(path, tmp_path):
    cfg = load_config(path, ["rounds=1", "eval.adapt_steps=2"])
    summary = simulate(cfg, tmp_path / "run", backend="local")
    assert len(summary["sites"]) == 4


@pytest.mark.parametrize("algorithm", ["protonet", "matching", "matching-fce", "relation", "fedavg"])
def test_imaging_config_runs_a_round(algorithm, tmp_path):
    """The episodic metric learners and FedAvg's plain classifier (one output per meta-training class)."""
    cfg = load_config(Path(__file__).parent.parent / "configs" / "imaging-synth.yaml",
                      [f"algorithm={algorithm}", "rounds=1", "eval.adapt_steps=2", "tasks.meta_batch=2"])
    summary = simulate(cfg, tmp_path / "run", backend="local")
    assert len(summary["sites"]) == 10
    assert 0.0 <= summary["mean"]["after"]["accuracy"] <= 1.0
