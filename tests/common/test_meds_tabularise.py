"""Tabularisation of MEDS events: a hand-computed tiny dataset, a planted future event, static
events, several prediction times per subject, and a pandas reference on random data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fedmeta.common.data.meds.config import Aggregations, parse_meds_site
from fedmeta.common.data.meds.labels import build_samples, read_label_file
from fedmeta.common.data.meds.schema import data_shards
from fedmeta.common.data.meds.site import tabularise_site
from fedmeta.common.data.meds.tabularise import tabularise_shards
from fedmeta.common.data.meds.vocabulary import Vocabulary, local_code_counts
from fedmeta.common.data.meds.writer import write_labels, write_meds_dataset
from fedmeta.common.errors import DataError

ALL_NUMERIC = ("count", "present", "first", "last", "mean", "min", "max")


def _events(rows: list[tuple[int, str | None, str, float | None]]) -> pa.Table:
    """Rows ``(subject, ISO time or None for static, code, value)`` as a MEDS data table."""
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array(
                [None if r[1] is None else np.datetime64(r[1], "us") for r in rows],
                pa.timestamp("us"),
            ),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
        }
    )


def _labels(rows: list[tuple[int, str, bool]]) -> pa.Table:
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "prediction_time": pa.array([np.datetime64(r[1], "us") for r in rows], pa.timestamp("us")),
            "boolean_value": pa.array([r[2] for r in rows], pa.bool_()),
        }
    )


def _site(root: Path, events: pa.Table, labels: dict[str, pa.Table], *, shard_subjects: int = 1000,
          windows: tuple[str, ...] = ("24h", "all")):
    write_meds_dataset(root / "meds", events, shard_subjects=shard_subjects)
    write_labels(root / "labels", labels)
    return parse_meds_site(
        {
            "kind": "meds",
            "path": "meds",
            "labels": {o: f"labels/{o}.parquet" for o in labels},
            "windows": list(windows),
            "min_subjects": 1,
        },
        source=root / "site.yaml",
    )


TINY = [
    (1, None, "GENDER//F", None),
    (1, "1980-01-02T12:00", "MEDS_BIRTH", None),
    (1, "2019-12-01T00:00", "DX//A", None),
    (1, "2020-01-01T08:00", "HR", 100.0),  # 28 h before p: history only
    (1, "2020-01-01T12:00", "LAB//X", 5.0),  # exactly p - 24 h: inside the 24 h window
    (1, "2020-01-01T14:00", "HR", 90.0),
    (1, "2020-01-02T10:00", "HR", 80.0),
    (1, "2020-01-02T11:00", "DX//A", None),
    (2, None, "GENDER//M", None),
    (2, None, "HEIGHT", 170.0),
    (2, "2020-05-01T00:00", "HEIGHT", 172.0),
    (2, "2020-05-31T20:00", "HR", 70.0),
    (2, "2020-05-31T21:00", "LAB//Y", 3.0),  # not in the vocabulary
]
FUTURE = [  # at and after each prediction time: must change nothing
    (1, "2020-01-02T12:00", "HR", 500.0),
    (1, "2020-01-02T12:00", "DX//A", None),
    (1, "2020-01-03T00:00", "LAB//X", 999.0),
    (1, "2020-01-03T00:00", "MEDS_DEATH", None),
    (2, "2020-06-01T00:00", "HR", -40.0),
    (2, "2020-06-02T00:00", "HEIGHT", 1.0),
]
TINY_LABELS = {"death": _labels([(1, "2020-01-02T12:00", True), (2, "2020-06-01T00:00", False)])}
VOCAB = Vocabulary(
    codes=("DX//A", "GENDER//F", "GENDER//M", "HEIGHT", "HR", "LAB//X", "MEDS_BIRTH"),
    numeric_codes=("HEIGHT", "HR", "LAB//X"),
    windows=("24h", "all"),
    aggregations=Aggregations(numeric=ALL_NUMERIC, other=("count", "present")),
)


def _by_name(x: np.ndarray, names: tuple[str, ...], row: int) -> dict[str, float]:
    return dict(zip(names, x[row].tolist(), strict=True))


def _sorted(rows: list[tuple[int, str | None, str, float | None]]) -> list:
    """MEDS order: by subject, static first, then time (stable)."""
    return sorted(rows, key=lambda r: (r[0], r[1] is not None, r[1] or ""))


def test_tiny_dataset_matches_hand_computation(tmp_path: Path) -> None:
    cfg = _site(tmp_path, _events(TINY), TINY_LABELS)
    f = tabularise_site(cfg, VOCAB)
    assert f.feature_names == VOCAB.feature_names()
    assert f.subject_id.tolist() == [1, 2] and f.y.tolist() == [[1], [0]]
    s1, s2 = _by_name(f.x, f.feature_names, 0), _by_name(f.x, f.feature_names, 1)
    nan = float("nan")
    want1 = {
        "24h/DX//A/count": 1, "24h/DX//A/present": 1, "24h/GENDER//F/count": 1,
        "24h/GENDER//M/present": 0, "24h/HEIGHT/count": 0, "24h/HEIGHT/mean": nan,
        "24h/HR/count": 2, "24h/HR/first": 90, "24h/HR/last": 80, "24h/HR/mean": 85,
        "24h/HR/min": 80, "24h/HR/max": 90, "24h/LAB//X/count": 1, "24h/LAB//X/last": 5,
        "all/DX//A/count": 2, "all/GENDER//F/present": 1, "all/HR/count": 3, "all/HR/first": 100,
        "all/HR/last": 80, "all/HR/mean": 90, "all/HR/min": 80, "all/HR/max": 100,
        "all/LAB//X/mean": 5, "MEDS_BIRTH/age_years": 40.0,
    }
    want2 = {
        "24h/DX//A/count": 0, "24h/GENDER//M/count": 1, "24h/GENDER//F/present": 0,
        # the static height belongs to every window; a timed value is later than a static one
        "24h/HEIGHT/count": 1, "24h/HEIGHT/first": 170, "24h/HEIGHT/last": 170,
        "all/HEIGHT/count": 2, "all/HEIGHT/first": 170, "all/HEIGHT/last": 172,
        "all/HEIGHT/mean": 171, "all/HEIGHT/min": 170, "all/HEIGHT/max": 172,
        "24h/HR/count": 1, "24h/HR/first": 70, "24h/HR/last": 70, "24h/HR/min": 70,
        "24h/LAB//X/count": 0, "24h/LAB//X/present": 0, "24h/LAB//X/last": nan,
        "all/LAB//X/max": nan, "MEDS_BIRTH/age_years": nan,
    }
    for got, want in ((s1, want1), (s2, want2)):
        for name, value in want.items():
            assert got[name] == pytest.approx(value, nan_ok=True), name


def test_events_at_or_after_the_prediction_time_are_ignored(tmp_path: Path) -> None:
    clean = tabularise_site(_site(tmp_path / "a", _events(TINY), TINY_LABELS), VOCAB)
    planted_cfg = _site(tmp_path / "b", _events(_sorted(TINY + FUTURE)), TINY_LABELS)
    planted = tabularise_site(planted_cfg, VOCAB)
    assert planted.n_events == clean.n_events + len(FUTURE)
    np.testing.assert_array_equal(planted.x, clean.x)  # NaNs in the same places too
    # and a code seen only after the prediction time is not even counted for the vocabulary
    assert "MEDS_DEATH" not in local_code_counts(planted_cfg, min_subjects=1)


def test_static_events_after_timed_ones_give_the_same_features(tmp_path: Path) -> None:
    reordered = [r for r in TINY if r[1] is not None] + [r for r in TINY if r[1] is None]
    reordered = sorted(reordered, key=lambda r: r[0])  # subjects contiguous, statics last
    a = tabularise_site(_site(tmp_path / "a", _events(TINY), TINY_LABELS), VOCAB)
    b = tabularise_site(_site(tmp_path / "b", _events(reordered), TINY_LABELS), VOCAB)
    np.testing.assert_array_equal(a.x, b.x)


def test_several_prediction_times_per_subject_each_see_their_own_past(tmp_path: Path) -> None:
    labels = {
        "a": _labels([(1, "2020-01-01T13:00", False), (1, "2020-01-02T12:00", True)]),
        "b": _labels([(1, "2020-01-02T12:00", False), (2, "2020-06-01T00:00", True)]),
    }
    f = tabularise_site(_site(tmp_path, _events(TINY), labels), VOCAB)
    assert f.subject_id.tolist() == [1, 1, 2]
    assert f.y.tolist() == [[0, -1], [1, 0], [-1, 1]]  # -1: no label in that file
    early = _by_name(f.x, f.feature_names, 0)  # 2020-01-01 13:00
    assert early["all/HR/count"] == 1 and early["all/HR/last"] == 100
    assert early["24h/HR/count"] == 1  # 08:00 is 5 h before
    assert early["24h/LAB//X/count"] == 1 and early["24h/DX//A/count"] == 0
    assert early["all/DX//A/count"] == 1
    late = _by_name(f.x, f.feature_names, 1)
    assert late["all/HR/count"] == 3 and late["24h/HR/count"] == 2


def test_a_labelled_subject_missing_from_the_data_is_an_error(tmp_path: Path) -> None:
    cfg = _site(tmp_path, _events(TINY), {"d": _labels([(3, "2020-01-01T00:00", True)])})
    samples = build_samples([read_label_file(p, o) for o, p in cfg.labels.items()])
    with pytest.raises(DataError, match="subject 3 has a label but is in no shard"):
        tabularise_shards(data_shards(cfg.path), samples, VOCAB)


# -- pandas reference ------------------------------------------------------------------------------
def _random_site(root: Path, seed: int):
    rng = np.random.default_rng(seed)
    t_base = np.datetime64("2021-03-01T00:00", "us")
    codes = ["N0", "N1", "N2", "C0", "C1", "RARE"]
    rows = []
    label_a, label_b = [], []
    for s in range(1, 31):
        for _ in range(rng.integers(0, 3)):
            code = str(rng.choice(["N2", "C1"]))
            rows.append((s, None, code, float(rng.normal()) if code == "N2" else None))
        n = int(rng.integers(1, 40))
        minutes = np.sort(rng.integers(0, 10 * 1440, n))
        minutes[1::7] = minutes[::7][: minutes[1::7].size]  # some ties in time
        minutes = np.sort(minutes)
        for m in minutes:
            code = str(rng.choice(codes, p=[0.3, 0.2, 0.1, 0.2, 0.15, 0.05]))
            value = float(np.round(rng.normal(10, 3), 3)) if code.startswith("N") and rng.random() < 0.85 else None
            rows.append((s, str(t_base + np.timedelta64(int(m), "m")), code, value))
        for k in range(int(rng.integers(1, 4))):
            p = str(t_base + np.timedelta64(int(rng.integers(60, 11 * 1440)), "m"))
            (label_a if k % 2 == 0 else label_b).append((s, p, bool(rng.random() < 0.4)))
    rows = _sorted(rows)
    label_b = [r for r in label_b if (r[0], r[1]) not in {(a[0], a[1]) for a in label_a}]
    labels = {"a": _labels(label_a), "b": _labels(label_b)}
    return _site(root, _events(rows), labels, shard_subjects=7, windows=("2h", "1d", "all")), rows


def _pandas_reference(rows: list, samples: pd.DataFrame, vocab: Vocabulary) -> np.ndarray:
    """Per sample and window: select the events with pandas, then ``groupby(code)``."""
    ev = pd.DataFrame(rows, columns=["subject_id", "time", "code", "value"])
    ev["time"] = pd.to_datetime(ev["time"])
    ev["value"] = ev["value"].astype(float).astype(np.float32).astype(float)
    ev["timed"] = ev["time"].notna()
    ev["order"] = np.arange(len(ev))
    ev = ev.sort_values(["subject_id", "timed", "order"])  # statics first, then file order
    windows = {"2h": pd.Timedelta(hours=2), "1d": pd.Timedelta(days=1), "all": None}
    out = np.full((len(samples), vocab.width), np.nan)
    index = {c: j for j, c in enumerate(vocab.columns())}
    for i, (sid, p) in enumerate(zip(samples["subject_id"], samples["prediction_time"], strict=True)):
        mine = ev[ev["subject_id"] == sid]
        for w, length in windows.items():
            inw = ~mine["timed"] | (mine["time"] < p)
            if length is not None:
                inw &= ~mine["timed"] | (mine["time"] >= p - length)
            grouped = mine[inw].groupby("code")
            stats = grouped["value"].agg(["first", "last", "mean", "min", "max"])
            sizes = grouped.size()
            for (w2, code, agg), j in index.items():
                if w2 != w:
                    continue
                n = int(sizes.get(code, 0))
                if agg == "count":
                    out[i, j] = n
                elif agg == "present":
                    out[i, j] = float(n > 0)
                elif code in stats.index:
                    out[i, j] = stats.loc[code, agg]
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_a_pandas_groupby_on_random_events(tmp_path: Path, seed: int) -> None:
    cfg, rows = _random_site(tmp_path, seed)
    vocab = Vocabulary(
        codes=("C0", "C1", "N0", "N1", "N2"),
        numeric_codes=("N0", "N1", "N2"),
        windows=("2h", "1d", "all"),
        aggregations=Aggregations(numeric=ALL_NUMERIC, other=("count", "present")),
    )
    samples = build_samples([read_label_file(p, o) for o, p in cfg.labels.items()])
    # tiny batches and chunks: subjects cut across record batches, samples across chunks
    x, n_events = tabularise_shards(
        data_shards(cfg.path), samples, vocab, batch_rows=50, max_elements=64
    )
    assert n_events == len(rows) and len(data_shards(cfg.path)) == 5
    frame = pd.DataFrame(
        {"subject_id": samples.subject_id,
         "prediction_time": pd.to_datetime(samples.prediction_time.astype("datetime64[us]"))}
    )
    want = _pandas_reference(rows, frame, vocab)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_two_worker_processes_give_the_same_matrix(tmp_path: Path) -> None:
    cfg, _ = _random_site(tmp_path, 3)
    vocab = Vocabulary(codes=("C0", "N0", "N1"), numeric_codes=("N0", "N1"), windows=("1d", "all"))
    one = tabularise_site(cfg, vocab)
    two = tabularise_site(cfg, vocab, workers=2)
    np.testing.assert_array_equal(one.x, two.x)
    assert one.n_events == two.n_events
