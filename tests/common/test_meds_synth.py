"""The MEDS export of the synthetic consortium: the same stays as synth-ehr, the same features where
the two overlap (raw and after preprocessing), per-site coding, labels, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fedmeta.common.data.ehr import load_ehr_site
from fedmeta.common.data.meds.config import Aggregations, load_meds_site_config
from fedmeta.common.data.meds.schema import data_shards
from fedmeta.common.data.meds.site import load_meds_site, tabularise_site
from fedmeta.common.data.meds.synth import ALT_CODES, CODES, write_synth_meds
from fedmeta.common.data.meds.validate import validate_meds_dataset
from fedmeta.common.data.meds.vocabulary import Vocabulary
from fedmeta.common.data.schema import encode
from fedmeta.common.data.site_config import load_site_config
from fedmeta.common.data.synth_ehr import ADMISSION_TYPES, OUTCOMES, UNITS, ehr_schema

SEED = 2  # with 3 sites: hospital-01 reports glucose, hospital-02 lactate in whole blood


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth-meds")
    write_synth_meds(out, sites=3, seed=SEED, stays=80)
    return out


def _coding(out: Path, name: str) -> dict[str, str]:
    hospitals = json.loads((out / "generator.json").read_text())["hospitals"]
    return next(h["coding"] for h in hospitals if h["name"] == name)


def _vocabulary() -> Vocabulary:
    codes = {*CODES.values(), *ALT_CODES.values(), "MEDS_BIRTH"}
    codes |= {f"GENDER//{s}" for s in ("F", "M")}
    codes |= {f"ADMISSION//{a.upper()}" for a in ADMISSION_TYPES}
    codes |= {f"ICU_ADMISSION//{u}" for u in UNITS}
    return Vocabulary(
        codes=tuple(sorted(codes)),
        numeric_codes=tuple(sorted({*CODES.values(), *ALT_CODES.values()})),
        windows=("24h", "all"),
        aggregations=Aggregations(numeric=("last", "count", "present"), other=("present",)),
    )


def _meds_name_of(flat_name: str, coding: dict[str, str]) -> str:
    """The MEDS feature holding a flat-table encoded column."""
    if flat_name == "age":
        return "MEDS_BIRTH/age_years"
    if flat_name.endswith("__missing"):
        return f"all/{coding[flat_name.removesuffix('__missing')]}/present"  # 1 - this
    if "=" in flat_name:
        col, value = flat_name.split("=")
        prefix = {"sex": "GENDER", "admission_type": "ADMISSION", "first_careunit": "ICU_ADMISSION"}[col]
        return f"all/{prefix}//{value.upper() if col == 'admission_type' else value}/present"
    return f"all/{coding[flat_name]}/last"


@pytest.mark.parametrize("site", ["hospital-01", "hospital-02", "hospital-03"])
def test_flat_and_meds_tabularise_to_the_same_features(consortium: Path, site: str) -> None:
    frame = pd.read_parquet(consortium / "flat" / site / "stays.parquet")
    flat = encode(frame, ehr_schema(), source=site, missing_indicators=True)
    names = ehr_schema().encoded_names(missing_indicators=True)
    feats = tabularise_site(load_meds_site_config(consortium / site / "site.yaml"), _vocabulary())
    assert feats.subject_id.tolist() == frame["stay_id"].tolist()  # the same stays, same order
    coding = _coding(consortium, site)
    index = {n: j for j, n in enumerate(feats.feature_names)}
    for j, name in enumerate(names):
        if name == "age__missing":  # no birth event, no age
            got = np.isnan(feats.x[:, index["MEDS_BIRTH/age_years"]]).astype(np.float64)
        else:
            got = feats.x[:, index[_meds_name_of(name, coding)]].astype(np.float64)
        if name.endswith("__missing") and name != "age__missing":
            got = 1.0 - got
        np.testing.assert_allclose(got, flat[:, j], rtol=1e-6, equal_nan=True, err_msg=name)
    # outcomes: one label file per outcome, -1 where the flat table has no label
    for j, o in enumerate(OUTCOMES):
        want = pd.to_numeric(frame[o]).fillna(-1).to_numpy(dtype=np.int64)
        np.testing.assert_array_equal(feats.y[:, j], want, err_msg=o)


def test_after_preprocessing_the_two_sites_hold_the_same_matrices(consortium: Path) -> None:
    """Same split (the seeded split by subject is the flat tables' split), same training
    statistics, 0/1 columns unscaled in both: every column of the flat site is a column of the
    MEDS site (a missing indicator is 1 - present)."""
    site = "hospital-02"
    flat = load_ehr_site(load_site_config(consortium / "flat" / site / "site.yaml")).site
    meds = load_meds_site(load_meds_site_config(consortium / site / "site.yaml"), _vocabulary())
    frame = pd.read_parquet(consortium / "flat" / site / "stays.parquet")
    stay = frame["stay_id"].to_numpy()
    assert meds.n_train == flat.n_train and meds.n_test == flat.n_test
    assert list(meds.row_ids_train) == stay[np.isin(stay, meds.row_ids_train)].tolist()
    np.testing.assert_array_equal(flat.y_train, meds.y_train)
    np.testing.assert_array_equal(flat.y_test, meds.y_test)
    coding = _coding(consortium, site)
    index = {n: j for j, n in enumerate(meds.feature_names)}
    for j, name in enumerate(flat.feature_names):
        if name == "age__missing":
            continue  # constant 0 in the table; MEDS has no separate column for it
        k = index[_meds_name_of(name, coding)]
        for split in ("train", "test"):
            got = getattr(meds, f"x_{split}")[:, k]
            if name.endswith("__missing"):
                got = 1.0 - got
            np.testing.assert_allclose(got, getattr(flat, f"x_{split}")[:, j], atol=2e-5,
                                       err_msg=f"{name} ({split})")


def test_sites_code_labs_differently(consortium: Path) -> None:
    recoded = {h["name"]: h["recoded"] for h in json.loads((consortium / "generator.json").read_text())["hospitals"]}
    assert recoded == {"hospital-01": ["glucose"], "hospital-02": ["lactate"], "hospital-03": []}
    for site, features in recoded.items():
        codes: set[str] = set()
        for shard in data_shards(consortium / site / "meds"):
            codes |= set(pc.unique(pq.read_table(shard, columns=["code"]).column("code")).to_pylist())
        for f, alt in ALT_CODES.items():
            assert (alt in codes) == (f in features), (site, f)
            assert (CODES[f] in codes) == (f not in features), (site, f)


def test_every_site_validates_and_its_future_holds_the_outcomes(consortium: Path) -> None:
    for k in (1, 2, 3):
        site = f"hospital-0{k}"
        cfg = load_meds_site_config(consortium / site / "site.yaml")
        info = validate_meds_dataset(cfg)
        frame = pd.read_parquet(consortium / "flat" / site / "stays.parquet")
        assert info.n_subjects == len(frame) == info.n_static_events  # one GENDER event each
        events = pd.concat(pd.read_parquet(s) for s in data_shards(cfg.path))
        labels = pd.read_parquet(cfg.labels["mortality"])
        p = labels.set_index("subject_id")["prediction_time"]
        death = events[events["code"] == "MEDS_DEATH"]
        assert sorted(death["subject_id"]) == sorted(frame.loc[frame["mortality"] == 1, "stay_id"])
        assert (death["time"].to_numpy() > p.loc[death["subject_id"]].to_numpy()).all()
        admitted = events[events["code"].str.startswith("ADMISSION//")].set_index("subject_id")["time"]
        assert (p - admitted.loc[p.index] == pd.Timedelta(hours=48)).all()
        readmission = pd.read_parquet(cfg.labels["readmission_30d"])
        assert len(readmission) == int(frame["readmission_30d"].notna().sum())


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_arguments_same_bytes_and_subject_splits(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        write_synth_meds(out, sites=1, seed=9, stays=50, subject_splits=True, shard_subjects=20)
    assert _digest(a) == _digest(b)
    splits = pd.read_parquet(a / "hospital-01" / "meds" / "metadata" / "subject_splits.parquet")
    frame = pd.read_parquet(a / "flat" / "hospital-01" / "stays.parquet")
    assert sorted(splits["subject_id"]) == sorted(frame["stay_id"])
    assert set(splits["split"]) == {"train", "tuning", "held_out"}
    assert len(data_shards(a / "hospital-01" / "meds")) == -(-len(frame) // 20)
    cfg = load_meds_site_config(a / "hospital-01" / "site.yaml")
    site = load_meds_site(cfg, _vocabulary())
    held_out = set(splits.loc[splits["split"] == "held_out", "subject_id"])
    assert set(site.row_ids_test) == held_out
    assert set(site.row_ids_train) == set(splits["subject_id"]) - held_out


def test_synth_meds_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmeta.cli import main as cli_main

    code = cli_main.main(["data", "synth-meds", "--sites", "2", "--out", str(tmp_path), "--seed", "4",
                          "--stays", "60", "--vitals-every", "120", "--recode-rate", "0"])
    assert code == 0, capsys.readouterr().err
    assert "wrote 2 MEDS hospitals" in capsys.readouterr().out
    gen = json.loads((tmp_path / "generator.json").read_text())
    assert gen["vitals_every_min"] == 120 and all(h["recoded"] == [] for h in gen["hospitals"])
    assert (tmp_path / "hospital-02" / "site.yaml").is_file()
    assert (tmp_path / "flat" / "hospital-02" / "stays.parquet").is_file()
