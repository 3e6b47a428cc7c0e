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


# -- the ε ledger -------------------------------------------------------------------------------
DP = SitePolicy(require_dp=True, max_epsilon=10.0, dp_epsilon_budget=20.0, dp_delta=1e-5)


def _dp_cfg(*overrides: str):  # type: ignore[no-untyped-def]
    from fedmeta.common.config import load_config

    return load_config(None, ["algorithm=reptile", "privacy.dp=true", "privacy.noise_multiplier=2",
                              "rounds=10", *overrides])


def _hand_epsilon(rounds_and_z: list[tuple[int, float]], delta: float) -> float:
    """The RDP bound by hand, independent of dp-accounting: the Gaussian mechanism's RDP at order
    α is α/(2z²) per round and adds up over rounds and runs; converted once (Balle et al. 2020)."""
    import math

    from fedmeta.common.privacy import RDP_ORDERS

    rho = sum(t / (2.0 * z * z) for t, z in rounds_and_z)
    return min(a * rho + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in RDP_ORDERS)


def test_control_runs_each_under_max_epsilon_together_exceed_the_budget() -> None:
    """The hollow requirement: the per-run check passes every run of σ = 2 over 10 rounds
    (ε = 8.08 at δ = 1e-5, under max_epsilon = 10), however many there are; five of them are
    ε = 22.0 together, past a budget of 20."""
    from fedmeta.common.privacy import composed_epsilon
    from fedmeta.sitecore.policy import check_experiment

    cfg = _dp_cfg()
    for _ in range(5):
        check_experiment(DP, cfg)  # the check that held before the ledger: per run only
    assert composed_epsilon([(10, 2.0)] * 5, delta=1e-5) == pytest.approx(22.0199, abs=1e-3)
    assert composed_epsilon([(10, 2.0)] * 5, delta=1e-5) > DP.dp_epsilon_budget  # type: ignore[operator]


def test_epsilon_is_spent_across_runs_composed_in_rdp_and_the_run_that_would_overspend_is_refused(
        tmp_path: Path) -> None:
    ledger = RequestLedger(tmp_path / "ledger.json")
    cfg = _dp_cfg()
    expected = [8.0794, 12.3017, 15.8504, 19.0536]  # ε(10 k rounds at σ = 2), k = 1..4
    for run, eps in enumerate(expected, start=1):
        ledger.spend_epsilon(DP, cfg, run_id=run, release=False)  # the greeting: checked, not spent
        ledger.spend_epsilon(DP, cfg, run_id=run, release=True)   # its first training request
        assert ledger.epsilon_spent(DP) == pytest.approx(eps, abs=1e-3)
        assert ledger.epsilon_spent(DP) == pytest.approx(_hand_epsilon([(10, 2.0)] * run, 1e-5), rel=1e-9)
    # the fifth run would bring it to 22.0: refused at its greeting and at its first release
    message = (r"run 5's 10 rounds at noise_multiplier 2 would bring this site's ε to 22 \(at δ = 1e-05, "
               r"19.1 spent before\), past its dp_epsilon_budget = 20")
    for release in (False, True):
        with pytest.raises(PolicyRefusal, match=message):
            ledger.spend_epsilon(DP, cfg, run_id=5, release=release)
    assert len(ledger.charges()) == 4  # a refused run charges nothing
    # a run with more noise still fits: σ = 8 over 10 rounds adds little (composed, by hand)
    ledger.spend_epsilon(DP, _dp_cfg("privacy.noise_multiplier=8"), run_id=6, release=True)
    assert ledger.epsilon_spent(DP) == pytest.approx(_hand_epsilon([(10, 2.0)] * 4 + [(10, 8.0)], 1e-5), rel=1e-9)
    from fedmeta.common.privacy import epsilon

    summed = 4 * epsilon(rounds=10, noise_multiplier=2.0, delta=1e-5) + epsilon(rounds=10, noise_multiplier=8.0, delta=1e-5)
    assert ledger.epsilon_spent(DP) < 20 < summed  # basic composition (summing) would have refused runs 3 to 6


def test_a_run_that_sends_more_rounds_than_it_declared_is_refused_at_the_first_extra_one(tmp_path: Path) -> None:
    ledger = RequestLedger(tmp_path / "ledger.json")
    cfg = _dp_cfg("rounds=3")
    for _ in range(3):
        ledger.spend_epsilon(DP, cfg, run_id=1, release=True)
    with pytest.raises(PolicyRefusal, match="run 1 declared 3 rounds and has had 3 DP releases; "
                                            "this site charged ε for 3 only"):
        ledger.spend_epsilon(DP, cfg, run_id=1, release=True)
    # the same run with another experiment (another candidate, or a coordinator varying it) is
    # charged again in full: the site pays for 3 + 3 rounds, never fewer than were released
    ledger.spend_epsilon(DP, _dp_cfg("rounds=3", "seed=1"), run_id=1, release=True)
    assert ledger.epsilon_spent(DP) == pytest.approx(_hand_epsilon([(6, 2.0)], 1e-5), rel=1e-9)


def test_the_epsilon_ledger_survives_a_restart_without_spending_twice_or_forgetting(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    first = RequestLedger(path)
    cfg = _dp_cfg("rounds=3")
    for run in (1, 2):
        first.spend_epsilon(DP, cfg, run_id=run, release=True)
    first.spend_epsilon(DP, cfg, run_id=2, release=True)
    spent = first.epsilon_spent(DP)
    assert spent == pytest.approx(_hand_epsilon([(6, 2.0)], 1e-5), rel=1e-9)
    restarted = RequestLedger(path)  # the worker restarted in the middle of run 2
    assert restarted.epsilon_spent(DP) == pytest.approx(spent, rel=1e-12)
    restarted.spend_epsilon(DP, cfg, run_id=2, release=True)  # run 2's third round: no new charge
    assert restarted.epsilon_spent(DP) == pytest.approx(spent, rel=1e-12)
    with pytest.raises(PolicyRefusal, match="run 2 declared 3 rounds and has had 3 DP releases"):
        restarted.spend_epsilon(DP, cfg, run_id=2, release=True)
    # charges are never forgotten, however old (the request counts are after a month)
    later = RequestLedger(path, today=lambda: "2030-01-01")
    later.charge(DP, run_id=99, kind="query")
    assert later.epsilon_spent(DP) == pytest.approx(spent, rel=1e-12)
    assert [c["run"] for c in json.loads(path.read_text())["dp"]["charges"].values()] == [1, 2]


def test_two_ledgers_on_one_state_folder_do_not_underspend(tmp_path: Path) -> None:
    """Two processes on the same ledger (a restarted worker beside one still finishing): each
    reads the file again under its lock, so the second sees the first's charges."""
    path = tmp_path / "ledger.json"
    a, b = RequestLedger(path), RequestLedger(path)  # both loaded while the ledger was empty
    cfg = _dp_cfg()
    for run in range(1, 5):
        (a if run % 2 else b).spend_epsilon(DP, cfg, run_id=run, release=True)
    with pytest.raises(PolicyRefusal, match="19.1 spent before"):
        b.spend_epsilon(DP, cfg, run_id=5, release=True)
    assert a.epsilon_spent(DP) == b.epsilon_spent(DP) == pytest.approx(19.0536, abs=1e-3)


def test_without_privacy_dp_or_a_budget_the_epsilon_ledger_spends_nothing(tmp_path: Path) -> None:
    ledger = RequestLedger(tmp_path / "ledger.json")
    ledger.spend_epsilon(SitePolicy(), _dp_cfg(), run_id=1, release=True)  # no budget: DP optional
    ledger.spend_epsilon(DP, _dp_cfg("privacy.dp=false"), run_id=1, release=True)  # check_privacy refuses it
    assert ledger.charges() == [] and not (tmp_path / "ledger.json").exists()
