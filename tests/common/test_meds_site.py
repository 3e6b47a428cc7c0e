"""Loading a MEDS site into a TabularSite (split by subject, scaling fitted on training rows only)
and the ``fedmeta data check`` summary, against pandas on the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedmeta.common.data.meds import (
    check_meds_site,
    load_meds_site,
    load_meds_site_config,
    site_vocabulary,
    tabularise_site,
)
from fedmeta.common.data.meds.config import MedsSiteConfig
from fedmeta.common.data.meds.labels import Samples
from fedmeta.common.data.meds.schema import data_shards
from fedmeta.common.data.meds.splits import split_samples
from fedmeta.common.data.meds.synth import write_synth_meds
from fedmeta.common.errors import DataError


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("meds-site")
    write_synth_meds(out, sites=1, seed=11, stays=150, shard_subjects=40)
    return out / "hospital-01"


def _cfg(site_dir: Path) -> MedsSiteConfig:
    return load_meds_site_config(site_dir / "site.yaml")


def test_rows_columns_and_missing_labels(site_dir: Path) -> None:
    cfg = _cfg(site_dir)
    vocab = site_vocabulary(cfg)
    site = load_meds_site(cfg, vocab)
    assert site.feature_names == vocab.feature_names()
    assert site.outcomes == ("mortality", "los_gt_7d", "readmission_30d", "aki")
    y = np.concatenate([site.y_train, site.y_test])
    deaths = int((y[:, 0] == 1).sum())
    assert int((y[:, 2] == -1).sum()) == deaths  # readmission undefined exactly for the deaths
    assert set(site.row_ids_train).isdisjoint(site.row_ids_test)
    assert site.x_train.dtype == np.float32 and np.isfinite(site.x_train).all()
    assert np.isfinite(site.x_test).all()


def test_scaling_uses_training_rows_only(site_dir: Path) -> None:
    cfg = _cfg(site_dir)
    vocab = site_vocabulary(cfg)
    feats = tabularise_site(cfg, vocab)
    train, test = split_samples(
        Samples(feats.subject_id, feats.prediction_time, feats.y, feats.outcomes), None,
        test_fraction=0.34, seed=43,
    )
    x = feats.x.astype(np.float64)
    want_train, want_test = x[train].copy(), x[test].copy()
    present = [n.endswith("/present") for n in feats.feature_names]
    assert any(present) and not all(present)
    for j in range(x.shape[1]):  # median-impute, then z-score, with training statistics
        if present[j]:
            continue  # 0/1 columns pass through, like one-hot columns
        seen = x[train, j][~np.isnan(x[train, j])]
        med, mu, sd = (np.median(seen), seen.mean(), seen.std()) if seen.size else (0.0, 0.0, 1.0)
        sd = sd if sd > 0 else 1.0
        want_train[:, j] = (np.where(np.isnan(x[train, j]), med, x[train, j]) - mu) / sd
        want_test[:, j] = (np.where(np.isnan(x[test, j]), med, x[test, j]) - mu) / sd
    site = load_meds_site(cfg, vocab)
    np.testing.assert_allclose(site.x_train, want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(site.x_test, want_test, rtol=1e-5, atol=1e-5)
    assert list(site.row_ids_test) == feats.subject_id[test].tolist()


def test_subject_splits_file_is_honoured(site_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(site_dir)
    feats = tabularise_site(cfg, site_vocabulary(cfg))
    subjects = np.unique(feats.subject_id)
    names = np.array(["train", "tuning", "held_out"])[np.arange(subjects.size) % 3]
    splits = cfg.path / "metadata" / "subject_splits.parquet"
    pq.write_table(pa.table({"subject_id": pa.array(subjects, pa.int64()), "split": names}), splits)
    try:
        site = load_meds_site(cfg, site_vocabulary(cfg), test_fraction=0.5, seed=1)
        assert sorted(site.row_ids_test) == subjects[names == "held_out"].tolist()
        assert sorted(site.row_ids_train) == subjects[names != "held_out"].tolist()
        summary = check_meds_site(cfg)
        assert summary["split_source"] == "metadata/subject_splits.parquet"
        assert summary["split_subjects"] == {s: int((names == s).sum()) for s in ("held_out", "train", "tuning")}
    finally:
        splits.unlink()


def test_split_keeps_every_sample_of_a_subject_together() -> None:
    sid = np.array([1, 1, 1, 2, 3, 3, 4, 5, 5, 6])
    y = np.array([[0], [1], [1], [0], [1], [0], [0], [1], [1], [0]])
    samples = Samples(sid, np.arange(sid.size) * 10, y, ("o",))
    for seed in range(20):
        train, test = split_samples(samples, None, test_fraction=0.4, seed=seed)
        assert set(sid[train]).isdisjoint(sid[test])
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(sid.size))


def test_outcome_with_one_class_is_refused(site_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(site_dir)
    labels = pq.read_table(cfg.labels["aki"])
    constant = labels.set_column(2, "boolean_value", pa.array([False] * labels.num_rows))
    path = tmp_path / "aki.parquet"
    pq.write_table(constant, path)
    bad = cfg.model_copy(update={"labels": {**cfg.labels, "aki": path}})
    with pytest.raises(DataError, match=r"aki\.parquet: outcome 'aki' has a single class \(0\) among the "
                                        r"site's \d+ labelled rows"):
        load_meds_site(bad, site_vocabulary(cfg))


def test_check_summary_against_pandas(site_dir: Path) -> None:
    cfg = _cfg(site_dir)
    s = check_meds_site(cfg)
    shards = data_shards(cfg.path)
    events = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    assert s["shards"] == len(shards) == 4
    assert [x["events"] for x in s["shard_events"]] == [len(pd.read_parquet(p)) for p in shards]
    assert s["events"] == len(events) and s["subjects"] == events["subject_id"].nunique()
    assert s["codes"] == events["code"].nunique()
    assert s["static_events"] == int(events["time"].isna().sum())
    labels = {o: pd.read_parquet(p) for o, p in cfg.labels.items()}
    latest = pd.concat(labels.values()).groupby("subject_id")["prediction_time"].max()
    after = events["time"] >= events["subject_id"].map(latest)
    assert s["dropped_after_prediction_time"]["all_outcomes"] == int(after.sum()) > 0
    for o, lab in labels.items():
        p = events["subject_id"].map(lab.set_index("subject_id")["prediction_time"])
        assert s["dropped_after_prediction_time"]["by_outcome"][o] == int((events["time"] >= p).sum())
        assert s["labels"][o]["rows"] == len(lab)
        assert s["labels"][o]["prevalence"] == pytest.approx(lab["boolean_value"].mean())
        by = s["labels"][o]["by_split"]
        assert by["train"]["rows"] + by["test"]["rows"] == len(lab)
        assert by["train"]["positive"] + by["test"]["positive"] == int(lab["boolean_value"].sum())
    assert s["events_of_unlabelled_subjects"] == 0
    assert s["split_source"].startswith("seeded by subject")
    assert s["dataset"]["meds_version"] == "0.4.1"


def test_check_summary_as_text(site_dir: Path) -> None:
    from fedmeta.common.data.meds.check import summary_lines

    s = check_meds_site(_cfg(site_dir))
    text = "\n".join(summary_lines(s))
    assert f"subjects: {s['subjects']:,}, events: {s['events']:,}" in text
    assert "mortality" in text and "readmission_30d" in text
    n = s["dropped_after_prediction_time"]["all_outcomes"]
    assert f"events at or after the prediction time (never used): {n:,}" in text
