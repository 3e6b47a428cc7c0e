"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

#: Markers of the slow end-to-end set: deselected unless ``--full`` (the README's test command and
#: CI pass it); ``pytest -q`` alone is the quick loop.
SLOW_MARKERS = ("ray", "deployment", "slow")


def pytest_addoption(parser):  # type: ignore[no-untyped-def]
    parser.addoption("--full", action="store_true",
                     help="also run the slow end-to-end set (Ray simulations, real deployments, benchmarks)")


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    if config.getoption("--full"):
        return
    slow = [i for i in items if any(i.get_closest_marker(m) for m in SLOW_MARKERS)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if i not in slow]


FAST = ["algorithm=reptile", "rounds=3", "eval.adapt_steps=5", "tasks.meta_batch=4"]


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


# -- what may leave a site ---------------------------------------------------------------------------
#: Metrics a site's train and greeting replies may hold (scalars), and the k of a count reply.
ALLOWED_METRICS = {"num-examples", "n-tasks", "n-query", "query-loss-before", "query-loss-after",
                   "n-train", "n-test", "layout-ok", "layout-extra", "min-subjects"}
#: An evaluation reply: metrics over the test split (and their intervals), their spread over
#: draws, released risk bins, counts — per outcome (``o<j>.``); nothing else.
EVAL_KEY = (r"^(o\d+\.)?((before|after)\.[a-z_]+(\.(lo|hi))?|spread\.(before|after)\.[a-z_]+"
            r"|rel\.(before|after)\.\d\.(n|risk|observed)"
            r"|n_train|n_test|events|adapt_steps|adapt_scope|draws|withheld)$")
#: The feature agreement's records: code -> patients, only codes seen in >= k patients.
COUNT_RECORDS = ("code-counts", "numeric-counts")


def reply_record(message_type, reply):
    """A site's reply as plain data: ``{"type", "arrays", "metrics", "configs"}``."""
    from fedmeta.protocol.records import arrays_from_record

    record = {"type": message_type, "arrays": {}, "metrics": {}, "configs": {}}
    if reply.has_content():
        for name, rec in reply.content.array_records.items():
            record["arrays"][name] = arrays_from_record(rec)
        for name, rec in reply.content.metric_records.items():
            record["metrics"][name] = dict(rec)
        for name, rec in reply.content.config_records.items():
            record["configs"][name] = dict(rec)
    return record


def assert_only_aggregates(records, shapes, patient_rows):
    """Every reply a site sent holds parameter-shaped arrays (exactly θ's names and shapes, no row
    of a weight matrix equal to a patient's feature vector), scalar aggregates under known keys,
    short names, and — for the feature agreement's count reply only — patients per code for codes
    seen in at least the site's k patients, and nothing else."""
    import re

    import numpy as np

    eval_key = re.compile(EVAL_KEY)
    for r in records:
        for rec_name, arrays in r["arrays"].items():
            assert rec_name == "update" and r["type"] == "train"
            assert {k: v.shape for k, v in arrays.items()} == shapes  # exactly θ's names and shapes
            for v in arrays.values():
                assert v.dtype == np.float32
                if v.ndim == 2 and v.shape[1] == patient_rows.shape[1]:
                    # no row of a weight matrix is a patient's feature vector
                    d = np.abs(v[:, None, :] - patient_rows[None, :, :]).max(axis=2)
                    assert d.min() > 1e-4
        counts = {n: rec for n, rec in r["metrics"].items() if n in COUNT_RECORDS}
        if counts:  # the count reply: k, then codes with >= k patients, and nothing else
            assert r["type"] == "query" and set(counts) == set(COUNT_RECORDS)
            assert set(r["metrics"]) == {"metrics", *COUNT_RECORDS} and not r["arrays"]
            assert set(r["metrics"]["metrics"]) == {"min-subjects"}
            k = r["metrics"]["metrics"]["min-subjects"]
            assert isinstance(k, int) and k >= 1
            for rec in counts.values():
                for code, n in rec.items():
                    assert isinstance(code, str) and 0 < len(code) < 200
                    assert isinstance(n, int) and not isinstance(n, bool) and n >= k, (code, n, k)
            numeric, codes = counts["numeric-counts"], counts["code-counts"]
            assert all(c in codes and n <= codes[c] for c, n in numeric.items())
        for name, rec in r["metrics"].items():
            if name in COUNT_RECORDS:
                continue
            assert all(k in ALLOWED_METRICS or eval_key.match(k) for k in rec), sorted(rec)
            assert "min-subjects" not in rec or counts  # only beside the counts
            for value in rec.values():
                assert isinstance(value, int | float)  # scalars only: no per-example lists
        for rec in r["configs"].values():
            assert set(rec) <= {"name", "method", "describe"}
            # names are short; "describe" is the greeting's layout check (feature names, not values)
            assert all(isinstance(v, str) and len(v) < (501 if k == "describe" else 64) for k, v in rec.items())


@pytest.fixture
def only_aggregates():
    """``only_aggregates(records, shapes, patient_rows)``: see :func:`assert_only_aggregates`."""
    return assert_only_aggregates


@pytest.fixture
def as_record():
    """``as_record(message_type, reply)``: see :func:`reply_record`."""
    return reply_record
