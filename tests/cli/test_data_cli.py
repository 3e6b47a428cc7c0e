"""``fedmeta data``: the commands run end to end, and bad data exits 2 with the message only."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from fedmeta.cli import main as cli_main


@pytest.fixture
def run(monkeypatch, capsys):
    """Run ``fedmeta ARGS`` in-process; returns (exit code, stdout, stderr)."""
    if "data" not in cli_main.COMMAND_MODULES:  # asserted on its own below
        monkeypatch.setattr(cli_main, "COMMAND_MODULES", (*cli_main.COMMAND_MODULES, "data"))

    def _run(*args: str) -> tuple[int, str, str]:
        code = cli_main.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def test_data_command_is_registered() -> None:
    assert "data" in cli_main.COMMAND_MODULES


def test_synth_ehr_then_check(run, tmp_path) -> None:
    code, out, _ = run(
        "data", "synth-ehr", "--sites", "2", "--out", str(tmp_path), "--seed", "3", "--stays", "120"
    )
    assert code == 0 and "wrote 2 hospitals" in out
    site = tmp_path / "hospital-01" / "site.yaml"
    n = len(pd.read_csv(tmp_path / "hospital-01" / "stays.csv"))
    code, out, err = run("data", "check", "--site", str(site))
    assert code == 0, err
    assert f"rows: {n} (train" in out
    assert "mortality" in out and "lactate" in out and "ok: the site's data is valid" in out


def test_synth_images_then_check(run, tmp_path) -> None:
    code, out, _ = run(
        "data",
        "synth-images",
        "--sites",
        "1",
        "--out",
        str(tmp_path),
        "--train-per-class",
        "4",
        "--val-per-class",
        "1",
        "--test-per-class",
        "2",
    )
    assert code == 0
    code, out, _ = run(
        "data", "check", "--site", str(tmp_path / "site-01"), "--support", "2", "--query", "2"
    )
    assert code == 0
    assert "images: 84 (train 60, test 24)" in out  # 12 classes x (4 train + 1 val, 2 test)
    assert "image shape: (1, 28, 28)" in out


def test_bad_cell_exits_2_with_message_and_no_traceback(run, tmp_path) -> None:
    run("data", "synth-ehr", "--sites", "1", "--out", str(tmp_path), "--stays", "100")
    csv = tmp_path / "hospital-01" / "stays.csv"
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[4, "creatinine"] = "1,3"
    frame.to_csv(csv, index=False)
    code, out, err = run("data", "check", "--site", str(tmp_path / "hospital-01" / "site.yaml"))
    assert code == 2
    assert "fedmeta: error:" in err and "column 'creatinine'" in err
    assert "row 5 (line 6) holds '1,3'" in err
    assert "Traceback" not in err and "ok:" not in out


def test_too_few_patients_for_tasks_exits_2(run, tmp_path) -> None:
    run("data", "synth-ehr", "--sites", "1", "--out", str(tmp_path), "--stays", "100")
    code, _, err = run("data", "check", "--site", str(tmp_path / "hospital-01"), "--support", "500")
    assert code == 2 and "a task needs support 500" in err and "Traceback" not in err


def test_missing_site_file_exits_2(run, tmp_path) -> None:
    code, _, err = run("data", "check", "--site", str(tmp_path / "none.yaml"))
    assert code == 2 and "none.yaml: site file not found" in err and "Traceback" not in err


def test_bad_generator_argument_exits_2(run, tmp_path) -> None:
    code, _, err = run("data", "synth-ehr", "--sites", "0", "--out", str(tmp_path))
    assert code == 2 and "sites = 0: must be >= 1" in err


def test_synth_meds_then_check_prints_the_meds_summary(run, tmp_path) -> None:
    code, out, _ = run("data", "synth-meds", "--sites", "1", "--out", str(tmp_path), "--seed", "4",
                       "--stays", "70")
    assert code == 0 and "wrote 1 MEDS hospitals" in out
    code, out, err = run("data", "check", "--site", str(tmp_path / "hospital-01" / "site.yaml"))
    assert code == 0, err
    labels = pd.read_parquet(tmp_path / "hospital-01" / "labels" / "mortality.parquet")
    events = pd.read_parquet(tmp_path / "hospital-01" / "meds" / "data")
    assert "site hospital-01 (meds)" in out and f"events: {len(events):,}" in out
    assert re.search(rf"mortality +{labels['boolean_value'].mean():.1%} of {len(labels)} ", out)
    assert "events at or after the prediction time (never used)" in out
    # what the site would share: codes seen in >= 20 of its labelled patients, recounted here
    last = labels.groupby("subject_id")["prediction_time"].max()
    ev = events.merge(last.rename("limit"), left_on="subject_id", right_index=True)
    seen = ev[ev["time"].isna() | (ev["time"] < ev["limit"])].groupby("code")["subject_id"].nunique()
    assert f"would share patient counts of {int((seen >= 20).sum())} codes" in out
    assert "at least k = 20 patients" in out and "ok: the site's data is valid" in out


def test_bad_meds_site_exits_2_with_message_and_no_traceback(run, tmp_path) -> None:
    run("data", "synth-meds", "--sites", "1", "--out", str(tmp_path), "--stays", "40")
    site = tmp_path / "hospital-01"
    shard = next((site / "meds" / "data").rglob("*.parquet"))
    frame = pd.read_parquet(shard)
    frame["code"] = frame["code"].astype(object)
    frame.loc[3, "code"] = None  # a MEDS event needs a code
    frame.to_parquet(shard, index=False)
    code, out, err = run("data", "check", "--site", str(site))
    assert code == 2 and "fedmeta: error:" in err and str(shard) in err and "'code'" in err
    assert "Traceback" not in err and "ok:" not in out
    (site / "site.yaml").write_text((site / "site.yaml").read_text() + "windows: [2 days]\n")
    code, _, err = run("data", "check", "--site", str(site))
    assert code == 2 and "site.yaml: windows = ['2 days']" in err and "Traceback" not in err
