"""``fedmeta bench hosts``: how its figures are read from what it saw (the benchmark itself needs
root and runs by hand; its 3-host core runs in ``tests/deploy/test_hosts.py``)."""

from __future__ import annotations

import pytest

from fedmeta.bench import hosts as B
from fedmeta.bench import netns


def test_the_death_is_noticed_and_the_return_seen_in_the_rounds_after_each_event() -> None:
    seen = [B.Seen(1.0, {"round": 1, "accepted": ["a", "b"], "missing": []}),
            B.Seen(2.0, {"round": 2, "accepted": ["b"], "missing": ["a"]}),  # before the kill: not it
            B.Seen(6.0, {"round": 3, "accepted": ["b"], "missing": ["a"]}),
            B.Seen(7.0, {"round": 4, "accepted": ["a", "b"], "missing": []})]
    kill = 3.0
    noticed = B.first_after(seen, kill, "a", "missing")
    assert noticed is not None and noticed.record["round"] == 3
    back = B.first_after(seen, noticed.t, "a", "accepted")
    assert back is not None and back.record["round"] == 4
    assert B.first_after(seen, 7.0, "a", "accepted") is None


def test_percentiles_and_the_superlink_s_cpu_share() -> None:
    assert B.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert B.percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    s = B.Samples(cpu=[(10.0, 1.0), (12.0, 1.5), (20.0, 3.0)])
    assert s.cpu_share() == (2.0, pytest.approx(0.2))


def test_the_experiment_is_the_scale_benchmark_s() -> None:
    from fedmeta.common.config import load_config

    cfg = load_config(None, [], base=B.experiment(40))
    assert (cfg.algorithm, cfg.rounds, cfg.model.hidden, cfg.federation.min_nodes) == ("reptile", 40, (32, 32), 2)


@pytest.mark.parametrize("names", [[], ["co", "co"], ["co", "br"], ["Site-A"], ["toolonghost"]])
def test_host_names_are_checked_before_anything_is_made(names: list[str]) -> None:
    with pytest.raises(ValueError), netns.separate_hosts(names):
        pass


def test_only_this_module_s_namespaces_are_swept() -> None:
    assert netns._OURS.match("fmh123-co") and netns._OURS.match("fmh9-br")
    assert not netns._OURS.match("fm123co") and not netns._OURS.match("other") and not netns._OURS.match("fmhx-co")
