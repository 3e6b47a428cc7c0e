"""EHR cohort reader: split counts, training-only preprocessing, tasks, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmeta.common.data.ehr import check_k_shot, load_ehr_cohort, split_by_unit
from fedmeta.common.data.schema import Feature, Schema
from fedmeta.common.data.tabular_tasks import sample_tabular_tasks
from fedmeta.common.errors import DataError

SCHEMA = Schema(
    (
        Feature("age", "numeric"),
        Feature("lactate", "numeric"),
        Feature("unit", "categorical", ("MICU", "SICU")),
    )
)


def _frame() -> pd.DataFrame:
    """30 stays: death = 1 for stays 0-9 (10 events, 20 non-events); los missing for stays 0-4."""
    n = 30
    rng = np.random.default_rng(0)
    age = np.arange(40, 40 + n).astype(float)  # unique, so rows can be recognised
    lactate = np.round(rng.uniform(0.5, 4, n), 2).astype(object)
    lactate[[3, 17, 25]] = None
    los = (np.arange(n) % 3 == 0).astype(object)
    los[:5] = None
    return pd.DataFrame(
        {
            "stay_id": np.arange(1000, 1000 + n),
            "age": age,
            "lactate": lactate,
            "unit": np.where(np.arange(n) % 2 == 0, "MICU", "SICU"),
            "death": (np.arange(n) < 10).astype(int),
            "los": los,
        }
    )


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def _load(path: Path, **kw):
    kw.setdefault("test_fraction", 0.3)
    kw.setdefault("seed", 1)
    return load_ehr_cohort(
        path, SCHEMA, ["death", "los"], name="h1", unit_column="unit", id_column="stay_id", **kw
    )


def test_split_counts_and_class_balance(tmp_path) -> None:
    c = _load(_write(_frame(), tmp_path / "stays.csv"))
    # stratified on death: 10 events -> 3 test, 20 non-events -> 6 test
    assert (c.site.n_train, c.site.n_test) == (21, 9)
    assert int((c.site.y_train[:, 0] == 1).sum()) == 7
    assert int((c.site.y_test[:, 0] == 1).sum()) == 3
    assert sorted(np.concatenate([c.train_rows, c.test_rows]).tolist()) == list(range(30))
    assert c.prevalence["death"] == pytest.approx(10 / 30)
    # los labels: rows 5..29 labelled (25), events at multiples of 3 from 6 to 27 (8)
    assert c.labelled == {"death": 30, "los": 25}
    assert c.prevalence["los"] == pytest.approx(8 / 25)
    assert int((c.site.y_train[:, 1] == -1).sum() + (c.site.y_test[:, 1] == -1).sum()) == 5
    assert c.missing["lactate"] == pytest.approx(3 / 30)
    assert c.site.feature_names == (
        "age",
        "lactate",
        "unit=MICU",
        "unit=SICU",
        "age__missing",
        "lactate__missing",
    )
    assert c.site.x_train.dtype == np.float32 and c.site.y_train.dtype == np.int64


def test_split_is_seeded(tmp_path) -> None:
    path = _write(_frame(), tmp_path / "stays.csv")
    a, b, other = _load(path, seed=5), _load(path, seed=5), _load(path, seed=6)
    np.testing.assert_array_equal(a.test_rows, b.test_rows)
    assert not np.array_equal(a.test_rows, other.test_rows)


def test_scaling_statistics_come_from_training_rows_only(tmp_path) -> None:
    frame = _frame()
    c = _load(_write(frame, tmp_path / "stays.csv"))
    train = frame.iloc[c.train_rows]
    lact = pd.to_numeric(train["lactate"]).dropna().to_numpy()
    np.testing.assert_allclose(c.preprocessor.mean, [train["age"].mean(), lact.mean()])
    np.testing.assert_allclose(c.preprocessor.std, [train["age"].std(ddof=0), lact.std()])
    np.testing.assert_allclose(c.preprocessor.median[1], np.median(lact))
    # z-scored training ages have mean 0, test ages generally not
    assert abs(float(c.site.x_train[:, 0].mean())) < 1e-5
    expected_test_age = (frame["age"].iloc[c.test_rows] - train["age"].mean()) / train["age"].std(
        ddof=0
    )
    np.testing.assert_allclose(c.site.x_test[:, 0], expected_test_age, rtol=1e-5)


def test_parquet_reads_like_csv(tmp_path) -> None:
    a = _load(_write(_frame(), tmp_path / "stays.csv"))
    b = _load(_write(_frame(), tmp_path / "stays.parquet"))
    np.testing.assert_array_equal(a.site.x_train, b.site.x_train)
    np.testing.assert_array_equal(a.site.y_test, b.site.y_test)


def test_tasks_query_never_in_support(tmp_path) -> None:
    c = _load(_write(_frame(), tmp_path / "stays.csv"), test_fraction=0.2)
    batch = sample_tabular_tasks(
        c.site, n_tasks=20, support=6, query=6, rng=np.random.default_rng(0)
    )
    for t in range(batch.n_tasks):
        support_ages = set(batch.xs[t, :, 0].tolist())
        query_ages = set(batch.xq[t, :, 0].tolist())
        assert len(support_ages) == 6 and len(query_ages) == 6
        assert not support_ages & query_ages


def test_split_by_unit(tmp_path) -> None:
    c = _load(_write(_frame(), tmp_path / "stays.csv"))
    units = split_by_unit(c)
    assert [u.name for u in units] == ["h1/MICU", "h1/SICU"]
    assert sum(u.n_train for u in units) == c.site.n_train
    assert sum(u.n_test for u in units) == c.site.n_test
    micu = units[0]
    np.testing.assert_array_equal(micu.x_train[:, 2], np.ones(micu.n_train))  # unit=MICU one-hot


def test_check_k_shot(tmp_path) -> None:
    c = _load(_write(_frame(), tmp_path / "stays.csv"))
    n_los = int((c.site.y_train[:, 1] >= 0).sum())  # fewer labelled rows than death's 21
    assert n_los < 21
    check_k_shot(c.site, support=10, query=n_los - 10)  # exactly enough
    with pytest.raises(
        DataError,
        match=rf"outcome 'los': {n_los} labelled training patients.*"
        rf"support 10 \+ query {n_los - 9} = {n_los + 1}",
    ):
        check_k_shot(c.site, support=10, query=n_los - 9, source="site.yaml")


# --- bad input -------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: data file not found"):
        _load(tmp_path / "nope.csv")


def test_empty_file(tmp_path) -> None:
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"e\.csv: data file is empty"):
        _load(tmp_path / "e.csv")


def test_header_only_file(tmp_path) -> None:
    (tmp_path / "h.csv").write_text("stay_id,age,lactate,unit,death,los\n")
    with pytest.raises(DataError, match=r"h\.csv: data file has a header but no rows"):
        _load(tmp_path / "h.csv")


def test_unsupported_format(tmp_path) -> None:
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"t\.xlsx: unsupported table format"):
        _load(tmp_path / "t.xlsx")


def test_missing_outcome_column(tmp_path) -> None:
    path = _write(_frame().drop(columns=["los"]), tmp_path / "s.csv")
    with pytest.raises(DataError, match=r"s\.csv: column\(s\) \['los'\] are missing"):
        _load(path)


def test_missing_feature_column(tmp_path) -> None:
    path = _write(_frame().drop(columns=["lactate"]), tmp_path / "s.csv")
    with pytest.raises(DataError, match=r"s\.csv: feature column\(s\) \['lactate'\] are missing"):
        _load(path)


def test_non_numeric_value_names_row_and_line(tmp_path) -> None:
    frame = _frame()
    frame["age"] = frame["age"].astype(object)
    frame.loc[6, "age"] = "old"
    with pytest.raises(DataError, match=r"s\.csv: column 'age' .* row 7 \(line 8\) holds 'old'"):
        _load(_write(frame, tmp_path / "s.csv"))


def test_category_outside_schema(tmp_path) -> None:
    frame = _frame()
    frame.loc[11, "unit"] = "NICU"
    with pytest.raises(DataError, match=r"column 'unit' row 12 \(line 13\) holds 'NICU'"):
        _load(_write(frame, tmp_path / "s.csv"))


def test_bad_outcome_value(tmp_path) -> None:
    frame = _frame()
    frame["death"] = frame["death"].astype(object)
    frame.loc[2, "death"] = 2
    with pytest.raises(DataError, match=r"outcome column 'death' row 3 \(line 4\) holds '2'"):
        _load(_write(frame, tmp_path / "s.csv"))


def test_single_class_outcome(tmp_path) -> None:
    frame = _frame()
    frame["los"] = 0
    with pytest.raises(
        DataError,
        match=r"s\.csv: outcome 'los' has only class 0 among 30 "
        r"labelled rows at site 'h1'",
    ):
        _load(_write(frame, tmp_path / "s.csv"))


def test_single_class_in_training_split(tmp_path) -> None:
    frame = _frame()
    frame["los"] = 0
    frame.loc[0, "los"] = 1  # death stratum 1 -> this one event can land in test
    seeds = [
        s for s in range(20) if 0 in _load(_write(_frame(), tmp_path / "ok.csv"), seed=s).test_rows
    ]
    with pytest.raises(
        DataError,
        match=r"outcome 'los' has a single class among the \d+ "
        r"labelled training rows",
    ):
        _load(_write(frame, tmp_path / "s.csv"), seed=seeds[0])


def test_duplicate_stay_id(tmp_path) -> None:
    frame = _frame()
    frame.loc[4, "stay_id"] = 1001
    with pytest.raises(DataError, match=r"id column 'stay_id' row 5 \(line 6\) repeats id"):
        _load(_write(frame, tmp_path / "s.csv"))


def test_semicolon_csv_reads_like_comma_csv(tmp_path) -> None:
    frame = _frame()
    a = _load(_write(frame, tmp_path / "comma.csv"))
    frame.to_csv(tmp_path / "semi.csv", index=False, sep=";")
    b = _load(tmp_path / "semi.csv")
    np.testing.assert_array_equal(a.site.x_train, b.site.x_train)
