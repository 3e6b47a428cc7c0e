"""``algorithm: auto`` chooses by the sites' validation log-loss and never looks at a test label."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from fedmeta.common.config import load_config
from fedmeta.server import selection as S

FEW = ["selection.candidates=[glm, glm-l2-10, reptile-linear]", "rounds=4", "selection.every=2",
       "tasks.meta_batch=4", "eval.adapt_steps=5", "eval.repeats=1"]


def _select(local_run, tmp_path, name):  # type: ignore[no-untyped-def]
    summary, _ = local_run(tmp_path, ["algorithm=auto", *FEW], name=name)
    return summary


def test_permuting_the_test_labels_changes_no_choice(local_run, tmp_path, monkeypatch) -> None:
    import fedmeta.sitecore.data as D

    monkeypatch.setattr(D, "_LOADED", {})
    plain = _select(local_run, tmp_path, "plain")
    load = D.load_site

    def shuffled(cfg, name):  # type: ignore[no-untyped-def]
        site = load(cfg, name)
        rng = np.random.default_rng(len(name))
        return dataclasses.replace(site, y_test=site.y_test[rng.permutation(site.n_test)])

    monkeypatch.setattr(D, "_LOADED", {})
    monkeypatch.setattr(D, "load_site", shuffled)
    permuted = _select(local_run, tmp_path, "permuted")
    # every candidate's validation score, and so the choice, is the same to the last bit
    assert json.dumps(permuted["selection"]["candidates"]) == json.dumps(plain["selection"]["candidates"])
    assert (permuted["selection"]["chosen"], permuted["selection"]["rounds"]) == (
        plain["selection"]["chosen"], plain["selection"]["rounds"])
    # control: the permutation reached the test split (the final model's test scores moved)
    assert permuted["mean"]["after"]["auroc"] != plain["mean"]["after"]["auroc"]


def test_a_selection_run_writes_every_candidate_and_its_choice(local_run, tmp_path) -> None:
    summary = _select(local_run, tmp_path, "plain")
    sel = summary["selection"]
    rows = sel["candidates"]
    assert {r["candidate"] for r in rows} == {"glm", "glm-l2-10", "reptile-linear"}
    assert sorted(r["rounds"] for r in rows if r["candidate"] == "reptile-linear") == [2, 4]  # early stopping
    lowest = min(rows, key=lambda r: r["val_log_loss"])
    assert (sel["lowest"]["candidate"], sel["lowest"]["rounds"]) == (lowest["candidate"], lowest["rounds"])
    # the one-standard-error rule: the first candidate (grid order), fewest rounds, within 1 SE
    within = [r for r in rows if r["val_log_loss"] <= lowest["val_log_loss"] + lowest["val_log_loss_se"]]
    order = ["glm", "glm-l2-10", "reptile-linear"]
    first = min(within, key=lambda r: (order.index(r["candidate"]), r["rounds"]))
    assert (sel["chosen"], sel["rounds"]) == (first["candidate"], first["rounds"])
    assert all(0 < r["val_log_loss_se"] < 0.1 for r in rows)
    assert all(math.isfinite(r["val_log_loss"]) and r["val_patients"] == rows[0]["val_patients"] for r in rows)
    # the validation patients are a quarter of the training rows, stratified, per site
    from fedmeta.sitecore.data import site_for_node

    cfg = load_config(None, ["data.score_on=validation"])
    assert rows[0]["val_patients"] == sum(site_for_node({"partition-id": i}, cfg).n_test for i in range(4))
    assert summary["algorithm"] == dict(a.split("=") for a in S.CANDIDATES[sel["chosen"]])["algorithm"]
    on_disk = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert on_disk["selection"]["chosen"] == sel["chosen"]
    assert (tmp_path / "plain" / "selection.json").exists()
    assert (tmp_path / "plain" / "selection" / "glm" / "summary.json").exists()
    # the choice travels with the parameters (a new hospital's model card) and into the report
    from fedmeta.cli.report import write_report
    from fedmeta.common import params as P

    _, meta = P.load(tmp_path / "plain" / "final.safetensors")
    assert json.loads(meta["selection"])["chosen"] == sel["chosen"]
    write_report(tmp_path / "plain", tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"Chosen by `algorithm: auto`: **{sel['chosen']}**" in report
    assert report.count("| glm") >= 1 and "reptile-linear" in report


def test_the_pooled_validation_log_loss_and_its_standard_error_by_hand() -> None:
    """Two sites: 3 patients with losses 0.1, 0.2, 0.3 and 2 with 0.5, 0.7, sent as means."""
    a, b = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.7])
    sites = {"A": {"n_test": 3, "after": {"loss": a.mean(), "loss_sq": (a ** 2).mean()}},
             "B": {"n_test": 2, "after": {"loss": b.mean(), "loss_sq": (b ** 2).mean()}}}
    loss, n, se = S.pooled_log_loss(sites, {"A", "B"})
    both = np.r_[a, b]
    assert n == 5 and loss == pytest.approx(both.mean())
    assert se == pytest.approx(both.std(ddof=0) / np.sqrt(5))


def test_with_no_validation_score_released_auto_runs_its_first_candidate_and_says_so(tmp_path) -> None:
    """Every site's validation split (a tenth of its training rows) has fewer events or non-events
    than its floor of 20, so no site releases a validation log-loss: nothing can be chosen."""
    from fedmeta.client.app import app
    from fedmeta.server.driver import run_experiment
    from fedmeta.server.local_grid import LocalGrid

    grid = LocalGrid(app, [{"partition-id": i, "min-patients": 20} for i in range(4)])
    said: list[str] = []
    cfg = load_config(None, ["algorithm=auto", *FEW, "data.validation_fraction=0.1"])
    summary = run_experiment(grid, cfg, tmp_path / "run", expected_nodes=4, progress=said.append)
    assert summary["algorithm"] == "glm" and summary["selection"]["method"].startswith("fallback")
    assert summary["selection"]["candidates"] == []
    assert any("no site released a validation log-loss for every candidate" in x and
               "running the first candidate, glm, without a choice" in x for x in said)
