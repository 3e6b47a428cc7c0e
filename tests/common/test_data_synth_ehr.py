"""Synthetic MIMIC-style hospitals: layout, determinism, shared physiology and site differences."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedmeta.common.data.ehr import load_ehr_site
from fedmeta.common.data.schema import load_schema
from fedmeta.common.data.site_config import EhrSiteConfig, load_site_config
from fedmeta.common.data.synth_ehr import OUTCOMES, draw_hospitals, ehr_schema, write_synth_ehr
from fedmeta.common.errors import DataError


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, write_synth_ehr(out, sites=4, seed=7, mean_stays=300)


def test_layout_and_site_files(consortium) -> None:
    out, paths = consortium
    assert [p.parent.name for p in paths] == [f"hospital-0{k}" for k in range(1, 5)]
    assert load_schema(out / "schema.yaml") == ehr_schema()
    config = load_site_config(paths[0])
    assert isinstance(config, EhrSiteConfig)
    assert config.outcomes == OUTCOMES and config.unit_column == "first_careunit"
    assert config.path == paths[0].parent / "stays.csv"


def test_rows_and_prevalence_match_generator_record(consortium) -> None:
    out, paths = consortium
    record = json.loads((out / "generator.json").read_text())
    for p, h in zip(paths, record["hospitals"], strict=True):
        frame = pd.read_csv(p.parent / "stays.csv")
        assert len(frame) == h["n_stays"]
        assert frame["stay_id"].is_unique
        for o in OUTCOMES:
            assert frame[o].mean() == pytest.approx(h["prevalence"][o])
        # readmission is undefined (empty) exactly for the patients who died
        assert (frame["readmission_30d"].isna() == (frame["mortality"] == 1)).all()
        # age is never missing; lactate is the most often missing lab
        assert frame["age"].notna().all()
        features = list(ehr_schema().names)
        assert frame["lactate"].isna().mean() == frame[features].isna().mean().max()


def test_deterministic(consortium, tmp_path) -> None:
    out, paths = consortium
    again = write_synth_ehr(tmp_path / "a", sites=4, seed=7, mean_stays=300)
    for p, q in zip(paths, again, strict=True):
        assert (p.parent / "stays.csv").read_bytes() == (q.parent / "stays.csv").read_bytes()
    other = write_synth_ehr(tmp_path / "b", sites=1, seed=8, mean_stays=300)
    assert (other[0].parent / "stays.csv").read_bytes() != (
        paths[0].parent / "stays.csv"
    ).read_bytes()


def test_real_reader_loads_every_site(consortium) -> None:
    _, paths = consortium
    for p in paths:
        config = load_site_config(p)
        assert isinstance(config, EhrSiteConfig)
        c = load_ehr_site(config)
        assert c.site.n_features == 42  # 16 numeric + 2 + 3 + 5 one-hot + 16 indicators
        assert c.site.outcomes == OUTCOMES


def test_outcomes_correlated_and_learnable_across_sites(consortium) -> None:
    _, paths = consortium
    sites = [load_ehr_site(load_site_config(p)).site for p in paths]  # type: ignore[arg-type]
    pooled = np.concatenate([s.y_train for s in sites])
    died, long_stay = pooled[:, 0], pooled[:, 1]
    assert np.corrcoef(died, long_stay)[0, 1] > 0.1
    # shared physiology: a mortality model fitted at hospital 1 ranks hospital 2's patients
    a, b = sites[0], sites[1]
    model = LogisticRegression(max_iter=2000).fit(a.x_train, a.y_train[:, 0])
    assert roc_auc_score(b.y_test[:, 0], model.decision_function(b.x_test)) > 0.7


def test_shift_controls_site_differences() -> None:
    same = draw_hospitals(5, seed=0, shift=0.0)
    assert {h.age_mean for h in same} == {65.0}
    assert all(v == 1.0 for h in same for v in h.lab_scale.values())
    varied = draw_hospitals(20, seed=0)
    ages = [h.age_mean for h in varied]
    assert max(ages) - min(ages) > 10
    offsets = [h.outcome_offset["mortality"] for h in varied]
    assert np.std(offsets) > 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": 0}, r"sites = 0: must be >= 1"),
        ({"sites": 2, "outcomes": ["death"]}, r"outcomes \['death'\]: choose from"),
        ({"sites": 2, "file_format": "xlsx"}, r"format 'xlsx'"),
        ({"sites": 2, "mean_stays": 10}, r"mean_stays = 10"),
    ],
)
def test_bad_arguments(tmp_path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        write_synth_ehr(tmp_path, **kwargs)


def test_parquet_output(tmp_path) -> None:
    paths = write_synth_ehr(tmp_path, sites=1, seed=0, mean_stays=100, file_format="parquet")
    config = load_site_config(paths[0])
    assert config.path.name == "stays.parquet"
    assert isinstance(config, EhrSiteConfig)
    assert load_ehr_site(config).n_rows == len(pd.read_parquet(config.path))
