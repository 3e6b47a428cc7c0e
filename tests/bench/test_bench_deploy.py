"""``fedmeta bench deploy``'s arithmetic: per-round times read back from run folders, medians and
their ratio (the benchmark itself starts a deployment and is run by hand; see BENCHMARKS.md)."""

import json

import pytest

from fedmeta.bench.deploy import SITES, compare, overrides, round_times
from fedmeta.common.config import load_config


def test_round_times_and_their_medians(tmp_path):
    for name, times in (("local", [1.0, 3.0, 2.0, 100.0]), ("deployed", [4.0, 5.0, 9.0])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rounds.jsonl").write_text(
            "".join(json.dumps({"round": i + 1, "wall_s": t}) + "\n" for i, t in enumerate(times)))
    local, deployed = round_times(tmp_path / "local"), round_times(tmp_path / "deployed")
    assert local == [1.0, 3.0, 2.0, 100.0]
    c = compare(local, deployed)
    assert c == {"local_median_s": 2.5, "deployed_median_s": 5.0, "ratio": pytest.approx(2.0)}


def test_both_runs_share_one_valid_experiment_on_three_sites():
    cfg = load_config(None, overrides(3))
    assert cfg.rounds == 3 and cfg.federation.min_nodes == len(SITES) == 3
    assert tuple(cfg.data.sites) == SITES
