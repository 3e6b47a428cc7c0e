"""Streaming a shard: batches hold whole subjects, rows are numbered as in the file, codes map to
ids through the batch dictionaries, and a subject longer than a batch stays whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedmeta.common.data.meds.reader import CodeTable, iter_event_batches


def _shard(path: Path, sizes: list[int]) -> pa.Table:
    """Subjects 1..n with ``sizes[i]`` events each: a static event then hourly ones."""
    sid, time, code, value = [], [], [], []
    t0 = np.datetime64("2020-01-01T00:00", "us")
    for s, n in enumerate(sizes, start=1):
        for k in range(n):
            sid.append(s)
            time.append(None if k == 0 else t0 + np.timedelta64(k, "h"))
            code.append(f"C{(s + k) % 3}")
            value.append(float(k) if k % 2 else None)
    table = pa.table(
        {
            "subject_id": pa.array(sid, pa.int64()),
            "time": pa.array(time, pa.timestamp("us")),
            "code": pa.array(code, pa.string()),
            "numeric_value": pa.array(value, pa.float32()),
        }
    )
    pq.write_table(table, path, row_group_size=7)  # record batches cut inside subjects
    return table


@pytest.mark.parametrize("batch_rows", [1, 5, 16, 1000])
def test_batches_hold_whole_subjects_in_file_order(tmp_path: Path, batch_rows: int) -> None:
    sizes = [3, 40, 2, 9, 1, 12]
    table = _shard(tmp_path / "s.parquet", sizes)
    codes = CodeTable()
    batches = list(iter_event_batches(tmp_path / "s.parquet", codes, batch_rows=batch_rows))
    seen: list[int] = []
    row = 0
    for b in batches:
        assert b.first_row == row
        row += len(b)
        subjects, _, lengths = b.subject_runs()
        assert all(s not in seen for s in subjects)
        seen += subjects.tolist()
        assert lengths.tolist() == [sizes[s - 1] for s in subjects]  # no subject split
    assert row == table.num_rows and seen == [1, 2, 3, 4, 5, 6]
    sid = np.concatenate([b.subject_id for b in batches])
    np.testing.assert_array_equal(sid, table.column("subject_id").to_numpy())
    names = [codes.codes[i] for b in batches for i in b.code]
    assert names == table.column("code").to_pylist()
    static = np.concatenate([b.static for b in batches])
    np.testing.assert_array_equal(static, table.column("time").is_null().to_numpy(zero_copy_only=False))
    value = np.concatenate([b.value for b in batches])
    want = np.array([np.nan if v is None else v for v in table.column("numeric_value").to_pylist()])
    np.testing.assert_array_equal(value, want)
    if batch_rows == 1:
        assert len(batches) == len(sizes)  # one subject per batch, the 40-event one included
    if batch_rows == 1000:
        assert len(batches) == 1


def test_bad_batch_size(tmp_path: Path) -> None:
    _shard(tmp_path / "s.parquet", [2])
    with pytest.raises(ValueError, match="batch_rows = 0"):
        next(iter_event_batches(tmp_path / "s.parquet", CodeTable(), batch_rows=0))
