"""The site's disclosure budget: counted per run and per day, kept across restarts and runs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedmeta.sitecore.ledger import RequestLedger
from fedmeta.sitecore.policy import PolicyRefusal, SitePolicy

POLICY = SitePolicy(max_evaluations_per_run=3, max_train_requests_per_run=5, max_requests_per_day=7)


def test_each_run_has_its_own_evaluation_and_training_ceiling(tmp_path: Path) -> None:
    ledger = RequestLedger(tmp_path / "ledger.json", today=lambda: "2026-12-07")
    for _ in range(3):
        ledger.charge(POLICY, run_id=1, kind="evaluate")
    with pytest.raises(PolicyRefusal, match="run 1 has had 3 evaluate requests, this site's "
                                            "max_evaluations_per_run = 3"):
        ledger.charge(POLICY, run_id=1, kind="evaluate")
    assert ledger.used(1) == {"evaluate": 3, "train": 0}  # a refused request counts nothing
    ledger.charge(POLICY, run_id=2, kind="evaluate")  # another run starts from zero
    assert ledger.used(2) == {"evaluate": 1, "train": 0}


def test_the_day_s_budget_survives_a_restart_and_new_runs(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    first = RequestLedger(path, today=lambda: "2026-12-07")
    for run in range(3):
        for _ in range(2):
            first.charge(POLICY, run_id=run, kind="train")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restarted = RequestLedger(path, today=lambda: "2026-12-07")  # the site restarted
    restarted.charge(POLICY, run_id=9, kind="query")
    with pytest.raises(PolicyRefusal, match="served 7 requests today, its max_requests_per_day = 7"):
        restarted.charge(POLICY, run_id=10, kind="evaluate")
    tomorrow = RequestLedger(path, today=lambda: "2026-12-08")
    tomorrow.charge(POLICY, run_id=10, kind="evaluate")
    # a day more than a month old is forgotten
    later = RequestLedger(path, today=lambda: "2027-02-01")
    later.charge(POLICY, run_id=11, kind="train")
    assert set(json.loads(path.read_text())["days"]) == {"2027-02-01"}


def test_a_corrupt_ledger_stops_the_site_rather_than_resetting_its_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a request ledger"):
        RequestLedger(path)
