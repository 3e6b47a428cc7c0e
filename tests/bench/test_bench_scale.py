"""``fedmeta bench scale``'s pieces: its experiment is a valid one for every size, and the memory
it reports is the process tree's, summed (checked against psutil on a tree of known children)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedmeta.bench.scale import QUICK_SIZES, SIZES, _tree_rss, overrides
from fedmeta.common.config import load_config

psutil = pytest.importorskip("psutil")


@pytest.mark.parametrize("n_sites", [*QUICK_SIZES, *SIZES])
def test_the_experiment_is_the_same_at_every_size(n_sites: int) -> None:
    cfg = load_config(None, overrides(n_sites, 10))
    assert (cfg.algorithm, cfg.rounds, cfg.data.synth_sites, cfg.federation.min_nodes) == \
        ("reptile", 10, n_sites, n_sites)
    assert cfg.model.hidden == (32, 32) and cfg.eval.bootstrap == 0
    # every site's greeting must fit the wait: 200 Ray actors on 2 cores greet about 2.5 a second
    assert cfg.federation.timeout_s >= max(120, 3 * n_sites)


def test_the_run_s_memory_is_its_process_tree_summed() -> None:
    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        proc = psutil.Process(parent.pid)
        import time

        for _ in range(100):
            if proc.children(recursive=True):
                break
            time.sleep(0.05)
        children = proc.children(recursive=True)
        assert len(children) == 1
        own, total = _tree_rss(proc)
        assert own == pytest.approx(proc.memory_info().rss, rel=0.2)
        assert total == pytest.approx(own + children[0].memory_info().rss, rel=0.2)
        assert total > own > 0
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()
