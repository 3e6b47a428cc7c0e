"""Smoke tests of the evaluation benchmarks: each one runs in its reduced ``quick`` setting into a
temporary folder and must return well-formed rows and write its JSON and plots.

These check behaviour (schema, ranges, files), not the figures themselves: the benchmarks' numbers
are results, published in BENCHMARKS.md, not test expectations.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# name on the command line -> module, as in fedmeta.cli.bench
BENCHMARKS = {"flamby": "flamby", "new-site": "new_site", "ehr": "ehr", "imaging": "imaging", "comm": "comm",
              "ceiling": "ceiling"}
BOUNDED = ("accuracy", "auroc", "val_accuracy", "final_accuracy")


def _check_rows(name: str, rows: list[dict]) -> None:
    assert rows, f"{name}: no rows"
    for r in rows:
        for key in ("benchmark", "method", "metric", "value", "site"):
            assert key in r, f"{name}: row without {key!r}: {r}"
        assert r["benchmark"] == name
        assert isinstance(r["method"], str) and r["method"]
        assert isinstance(r["site"], str) and r["site"]
        if r.get("k") is not None:
            assert isinstance(r["k"], int) and r["k"] > 0
        v = r["value"]
        assert v is None or (isinstance(v, float) and math.isfinite(v)), f"{name}: bad value {r}"
        if v is not None and r["metric"] in BOUNDED:
            assert 0.0 <= v <= 1.0, f"{name}: {r['metric']} out of [0, 1]: {r}"
        if v is not None and (r["metric"].startswith("bytes") or r["metric"] in ("runtime_s", "total_bytes")):
            assert v >= 0.0
    assert any(r["site"] == "mean" for r in rows), f"{name}: no mean-over-sites row"
    scored = [r for r in rows if r["metric"] in ("accuracy", "auroc", "final_accuracy") and r["value"] is not None]
    assert scored, f"{name}: no accuracy/AUROC row with a value"
    json.dumps(rows, allow_nan=False)  # strict JSON


_RESULTS: dict[str, tuple[list[dict], Path]] = {}


def _quick(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """Run a benchmark's quick setting once per test session (several tests read its rows)."""
    if name not in _RESULTS:
        out = tmp_path_factory.mktemp(name)
        module = importlib.import_module(f"fedmeta.bench.{BENCHMARKS[name]}")
        _RESULTS[name] = (module.run(quick=True, out_dir=out), out)
    return _RESULTS[name]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_quick_benchmark(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    rows, tmp_path = _quick(name, tmp_path_factory)
    _check_rows(name, rows)
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(saved) == len(rows)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs, f"{name}: no plot written"
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / f"{name}.md").read_text().strip(), f"{name}: no table written"


def test_flamby_rows_cover_every_hospital_and_the_published_references(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from fedmeta.common.data.heart import HOSPITALS

    rows, _ = _quick("flamby", tmp_path_factory)
    acc = [r for r in rows if r["metric"] == "accuracy"]
    for method in ("pooled", "local", "FedAvg", "fedmeta Reptile + adaptation"):
        assert {r["site"] for r in acc if r["method"] == method} == {*HOSPITALS, "mean"}, method
        per_site = [r["value"] for r in acc if r["method"] == method and r["site"] != "mean"]
        mean = next(r["value"] for r in acc if r["method"] == method and r["site"] == "mean")
        assert mean == pytest.approx(sum(per_site) / len(per_site))  # unweighted over hospitals
    published = {r["method"]: r["value"] for r in acc if r["method"].startswith("flamby-published:")}
    assert published["flamby-published:FedAvg"] == 0.685
    assert published["flamby-published:Pooled"] == 0.735


def test_bytes_to_reach_counts_up_and_down_until_the_first_round_at_target() -> None:
    from fedmeta.bench.comm import bytes_to_reach

    curve = [
        {"round": 1, "bytes_up": 10, "bytes_down": 20, "acc": 0.5},
        {"round": 2, "bytes_up": 10, "bytes_down": 20, "acc": 0.8},
        {"round": 3, "bytes_up": 10, "bytes_down": 20, "acc": 0.7},
    ]
    assert bytes_to_reach(curve, "acc", 0.75) == (60.0, 2)
    assert bytes_to_reach(curve, "acc", 0.5) == (30.0, 1)
    assert bytes_to_reach(curve, "acc", 0.9) == (None, None)


def test_aggregate_seeds_mean_and_std_by_hand() -> None:
    from fedmeta.bench.rows import aggregate_seeds, row

    rows = [row("b", "m", "accuracy", v, site="mean", seed=i) for i, v in enumerate((0.6, 0.8, None))]
    (agg,) = aggregate_seeds(rows, by=("method", "metric", "site"))
    assert agg["value"] == pytest.approx(0.7)
    assert agg["std"] == pytest.approx(0.1)  # population std of (0.6, 0.8)
    assert agg["n"] == 2 and "seed" not in agg


def test_validation_source_never_uses_the_test_split() -> None:
    from fedmeta.bench import runner, sources

    sources.register_validation_sources("fed-heart")
    full = runner.load_sites(runner.config(["data.source=fed-heart"]), ["Hungary"])["Hungary"]
    val = runner.load_sites(runner.config(["data.source=fed-heart-val"]), ["Hungary"])["Hungary"]
    assert val.n_train + val.n_test == full.n_train
    train_rows = {tuple(r) for r in full.x_train.round(5)}
    test_rows = {tuple(r) for r in full.x_test.round(5)}
    for r in val.x_test.round(5):
        assert tuple(r) in train_rows
    assert not any(tuple(r) in test_rows - train_rows for r in val.x_train.round(5))


def test_ceiling_intercept_is_the_maximum_likelihood_one() -> None:
    """The refitted intercept solves the score equation: predicted and observed positives agree."""
    from fedmeta.bench.ceiling import _fit_intercept

    rng = np.random.default_rng(3)
    z = rng.normal(size=200)
    y = (rng.random(200) < 1 / (1 + np.exp(-(z - 1.3)))).astype(float)
    b = _fit_intercept(z, y, 0.0)
    assert (1 / (1 + np.exp(-(z + b)))).sum() == pytest.approx(y.sum(), abs=1e-8)
