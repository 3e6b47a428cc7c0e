"""MEDS validation: a valid dataset's summary by hand, and one error naming file, column and row
for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedmeta.common.data.meds.config import MedsSiteConfig, parse_meds_site
from fedmeta.common.data.meds.validate import validate_meds_dataset
from fedmeta.common.data.meds.writer import write_labels, write_meds_dataset
from fedmeta.common.errors import DataError

T0 = np.datetime64("2020-01-01T00:00", "us")


def _events(rows: list[tuple[int, int | None, str, float | None]]) -> pa.Table:
    """Rows ``(subject, hours after T0 or None for static, code, value)``."""
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([None if r[1] is None else T0 + np.timedelta64(r[1], "h") for r in rows],
                             pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
        }
    )


def _labels(rows: list[tuple[int, int, bool | None]]) -> pa.Table:
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "prediction_time": pa.array([T0 + np.timedelta64(r[1], "h") for r in rows], pa.timestamp("us")),
            "boolean_value": pa.array([r[2] for r in rows], pa.bool_()),
        }
    )


ROWS = [
    (1, None, "SEX//F", None), (1, 0, "HR", 80.0), (1, 5, "HR", 82.0), (1, 6, "DX", None),
    (2, None, "SEX//M", None), (2, 2, "HR", 70.0),
    (3, 1, "HR", 90.0), (3, 3, "LAB", 1.5),
]
LABELS = {"death": [(1, 10, True), (2, 10, False), (3, 4, False)]}


def _site(root: Path, rows=ROWS, labels=LABELS, *, shard_subjects: int = 2) -> MedsSiteConfig:
    write_meds_dataset(root / "meds", _events(rows), shard_subjects=shard_subjects)
    write_labels(root / "labels", {o: _labels(r) for o, r in labels.items()})
    return parse_meds_site(
        {"kind": "meds", "path": "meds", "labels": {o: f"labels/{o}.parquet" for o in labels}},
        source=root / "site.yaml",
    )


def test_valid_dataset_summary_by_hand(tmp_path: Path) -> None:
    info = validate_meds_dataset(_site(tmp_path))
    assert [(s.path.name, s.n_events, s.n_static, s.n_subjects) for s in info.shards] == [
        ("0.parquet", 6, 2, 2), ("1.parquet", 2, 0, 1),
    ]
    assert (info.n_subjects, info.n_events, info.n_static_events, info.n_codes) == (3, 8, 2, 5)
    (lab,) = info.labels
    assert (lab.outcome, lab.n_rows, lab.n_subjects, lab.n_positive) == ("death", 3, 3, 1)
    assert info.metadata["etl_name"] == "fedmeta synth-meds" and info.splits is None


def _shard(cfg: MedsSiteConfig, i: int = 0) -> Path:
    return cfg.path / "data" / f"{i}.parquet"


def test_wrong_type_names_file_column_and_types(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    t = pq.read_table(_shard(cfg))
    bad = t.set_column(3, "numeric_value", pa.array([str(v) for v in t.column(3).to_pylist()]))
    pq.write_table(bad, _shard(cfg))
    with pytest.raises(DataError, match=r"0\.parquet: column 'numeric_value' has type string; a MEDS "
                                        r"data shard needs float"):
        validate_meds_dataset(cfg)


def test_int32_subject_ids_are_refused(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    t = pq.read_table(_shard(cfg, 1))
    pq.write_table(t.set_column(0, "subject_id", t.column(0).cast(pa.int32())), _shard(cfg, 1))
    with pytest.raises(DataError, match=r"1\.parquet: column 'subject_id' has type int32; .* needs int64"):
        validate_meds_dataset(cfg)


def test_missing_column(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    pq.write_table(pq.read_table(_shard(cfg)).drop(["code"]), _shard(cfg))
    with pytest.raises(DataError, match=r"0\.parquet: column\(s\) \['code'\] missing"):
        validate_meds_dataset(cfg)


def test_empty_shard(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    pq.write_table(pq.read_table(_shard(cfg, 1)).slice(0, 0), _shard(cfg, 1))
    with pytest.raises(DataError, match=r"1\.parquet: empty shard \(0 events\)"):
        validate_meds_dataset(cfg)


def test_null_code_names_the_row(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    t = pq.read_table(_shard(cfg))
    codes = t.column("code").to_pylist()
    codes[4] = None
    pq.write_table(t.set_column(2, "code", pa.array(codes, pa.string())), _shard(cfg))
    with pytest.raises(DataError, match=r"0\.parquet: column 'code' row 5 is null"):
        validate_meds_dataset(cfg)


def test_unsorted_times_name_the_row(tmp_path: Path) -> None:
    rows = [(1, 0, "HR", 1.0), (1, 5, "HR", 2.0), (1, 3, "HR", 3.0), (2, 1, "HR", 4.0)]
    cfg = _site(tmp_path, rows, {"d": [(1, 9, True), (2, 9, False)]})
    with pytest.raises(DataError, match=r"0\.parquet: column 'time' row 3: subject 1's events are not sorted"):
        validate_meds_dataset(cfg)


def test_subject_not_contiguous_names_the_row(tmp_path: Path) -> None:
    rows = [(1, 0, "HR", 1.0), (2, 1, "HR", 4.0), (1, 5, "HR", 2.0)]
    write_labels_only = {"d": [(1, 9, True), (2, 9, False)]}
    cfg = _site(tmp_path, [(1, 0, "HR", 1.0), (2, 1, "HR", 4.0)], write_labels_only)
    pq.write_table(_events(rows), _shard(cfg))
    with pytest.raises(DataError, match=r"0\.parquet: column 'subject_id' row 3: subject 1 appears again"):
        validate_meds_dataset(cfg)


def test_subject_in_two_shards_names_both(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    pq.write_table(_events([(2, 9, "HR", 1.0)]), cfg.path / "data" / "9.parquet")
    with pytest.raises(DataError, match=r"9\.parquet: column 'subject_id': subject 2 is also in .*0\.parquet"):
        validate_meds_dataset(cfg)


def test_label_of_an_unknown_subject(tmp_path: Path) -> None:
    cfg = _site(tmp_path, labels={"death": [(1, 10, True), (7, 10, False)]})
    with pytest.raises(DataError, match=r"death\.parquet: column 'subject_id' row 2: subject 7 is not in "
                                        r"the dataset's data \(1 unknown subject"):
        validate_meds_dataset(cfg)


def test_prediction_time_before_any_event(tmp_path: Path) -> None:
    cfg = _site(tmp_path, labels={"death": [(1, 10, True), (3, 0, False)]})  # subject 3 starts at 1 h
    with pytest.raises(DataError, match=r"death\.parquet: column 'prediction_time' row 2: "
                                        r"2020-01-01T00:00:00\.000000 is before any event of subject 3, "
                                        r"whose first event is at 2020-01-01T01:00"):
        validate_meds_dataset(cfg)


def test_prediction_time_of_a_subject_with_static_events_only(tmp_path: Path) -> None:
    rows = [(1, 0, "HR", 1.0), (2, None, "SEX//F", None)]
    cfg = _site(tmp_path, rows, {"d": [(1, 9, True), (2, 9, False)]})
    with pytest.raises(DataError, match=r"row 2: .* subject 2, who has no timed event"):
        validate_meds_dataset(cfg)


def test_null_label_and_missing_boolean_value(tmp_path: Path) -> None:
    cfg = _site(tmp_path, labels={"death": [(1, 10, True), (2, 10, None)]})
    with pytest.raises(DataError, match=r"death\.parquet: column 'boolean_value' row 2 is null"):
        validate_meds_dataset(cfg)
    pq.write_table(_labels([(1, 10, True)]).drop(["boolean_value"]), cfg.labels["death"])
    with pytest.raises(DataError, match=r"death\.parquet: column 'boolean_value' missing"):
        validate_meds_dataset(cfg)


def test_label_file_with_an_extra_column_or_wrong_time_type(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    t = _labels(LABELS["death"])
    pq.write_table(t.append_column("note", pa.array(["a", "b", "c"])), cfg.labels["death"])
    with pytest.raises(DataError, match=r"column\(s\) \['note'\] are not allowed in a MEDS label file"):
        validate_meds_dataset(cfg)
    pq.write_table(t.set_column(1, "prediction_time", t.column(1).cast(pa.timestamp("ms"))),
                   cfg.labels["death"])
    with pytest.raises(DataError, match=r"column 'prediction_time' has type timestamp\[ms\]"):
        validate_meds_dataset(cfg)


def test_repeated_label_row(tmp_path: Path) -> None:
    cfg = _site(tmp_path, labels={"death": [(1, 10, True), (2, 10, False), (1, 10, False)]})
    with pytest.raises(DataError, match=r"column 'prediction_time' row 3 repeats subject 1 .* as row 1"):
        validate_meds_dataset(cfg)


def _splits(cfg: MedsSiteConfig, rows: list[tuple[int, str]]) -> None:
    pq.write_table(
        pa.table({"subject_id": pa.array([r[0] for r in rows], pa.int64()),
                  "split": pa.array([r[1] for r in rows], pa.string())}),
        cfg.path / "metadata" / "subject_splits.parquet",
    )


def test_split_file_problems(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    _splits(cfg, [(1, "train"), (2, "held_out"), (3, "tuning")])
    assert validate_meds_dataset(cfg).splits == cfg.path / "metadata" / "subject_splits.parquet"
    _splits(cfg, [(1, "train"), (2, "held_out"), (1, "held_out"), (3, "train")])
    with pytest.raises(DataError, match=r"subject_splits\.parquet: column 'subject_id' row 3 lists subject 1 "
                                        r"again \(first at row 1\); a subject belongs to exactly one split"):
        validate_meds_dataset(cfg)
    _splits(cfg, [(1, "train"), (2, "validation"), (3, "train")])
    with pytest.raises(DataError, match=r"column 'split' row 2 is 'validation'"):
        validate_meds_dataset(cfg)
    _splits(cfg, [(1, "train"), (2, "held_out")])
    with pytest.raises(DataError, match=r"subject 3 \(label file .*death\.parquet, row 3\) has no split"):
        validate_meds_dataset(cfg)


def test_dataset_layout_problems(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    (cfg.path / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": 3}))
    with pytest.raises(DataError, match=r"dataset\.json: does not match the MEDS dataset metadata schema"):
        validate_meds_dataset(cfg)
    (cfg.path / "metadata" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not readable JSON"):
        validate_meds_dataset(cfg)
    (cfg.path / "metadata" / "dataset.json").unlink()  # optional
    assert validate_meds_dataset(cfg).metadata == {}
    for shard in (cfg.path / "data").glob("*.parquet"):
        shard.unlink()
    with pytest.raises(DataError, match=r"data: no \.parquet shard found"):
        validate_meds_dataset(cfg)
    other = parse_meds_site({"kind": "meds", "path": "nowhere", "labels": {"d": "d.parquet"}},
                            source=tmp_path / "site.yaml")
    with pytest.raises(DataError, match=r"nowhere: MEDS dataset folder not found"):
        validate_meds_dataset(other)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    _shard(cfg).write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"0\.parquet: not a readable Parquet file"):
        validate_meds_dataset(cfg)


def test_lossless_variants_are_accepted(tmp_path: Path) -> None:
    """``code`` as large_string or dictionary, ``text_value`` as string, no ``numeric_value``."""
    cfg = _site(tmp_path)
    t = pq.read_table(_shard(cfg))
    t = t.append_column("text_value", pa.array(["x"] * t.num_rows, pa.string()))
    pq.write_table(t.set_column(2, "code", t.column("code").cast(pa.large_string())), _shard(cfg))
    t1 = pq.read_table(_shard(cfg, 1)).drop(["numeric_value"])
    pq.write_table(t1.set_column(2, "code", t1.column("code").dictionary_encode()), _shard(cfg, 1))
    info = validate_meds_dataset(cfg)
    assert (info.n_events, info.n_codes) == (8, 5)


def test_time_zone_aware_times_are_refused(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    t = pq.read_table(_shard(cfg))
    pq.write_table(t.set_column(1, "time", t.column("time").cast(pa.timestamp("us", tz="UTC"))), _shard(cfg))
    with pytest.raises(DataError, match=r"column 'time' has type timestamp\[us, tz=UTC\]; a MEDS data shard "
                                        r"needs timestamp\[us\]"):
        validate_meds_dataset(cfg)
