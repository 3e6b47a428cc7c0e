"""MEDS label files (one per prediction task) and the samples they define.

A label file (:class:`meds.LabelSchema`) has one row per ``(subject_id, prediction_time)`` with a
``boolean_value``. A *sample* is one ``(subject, prediction time)`` pair found in any of a site's
label files; it becomes one row of the site's table, with one outcome column per label file and
-1 where that file has no row for the sample (for example, 30-day readmission is not defined for
a patient who died).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmeta.common.data.meds.schema import check_label_schema
from fedmeta.common.errors import DataError


@dataclass(frozen=True)
class LabelFile:
    """One task's labels, in file order: subject, prediction time (µs since 1970), 0/1 label."""

    outcome: str
    path: Path
    subject_id: np.ndarray
    prediction_time: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return int(self.subject_id.shape[0])


def read_label_file(path: Path, outcome: str) -> LabelFile:
    """Read and check one label file: MEDS label types, at least one row, no null subject,
    prediction time or ``boolean_value``, no repeated ``(subject_id, prediction_time)``."""
    check_label_schema(path)
    try:
        table = pq.read_table(path, columns=["subject_id", "prediction_time", "boolean_value"])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read the label file: {e}") from e
    if table.num_rows == 0:
        raise DataError(f"{path}: label file for outcome {outcome!r} has no rows")
    for col in ("subject_id", "prediction_time", "boolean_value"):
        c = table.column(col)
        if c.null_count:
            i = int(np.flatnonzero(c.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(
                f"{path}: column {col!r} row {i + 1} is null; every label row needs a subject, "
                "a prediction time and a boolean_value (leave out rows whose label is unknown)"
            )
    sid = table.column("subject_id").to_numpy().astype(np.int64, copy=False)
    ptime = table.column("prediction_time").cast(pa.int64()).to_numpy().astype(np.int64)
    value = table.column("boolean_value").to_numpy(zero_copy_only=False).astype(np.int8)
    order = np.lexsort((ptime, sid))
    dup = (np.diff(sid[order]) == 0) & (np.diff(ptime[order]) == 0)
    if dup.any():
        rows = np.sort(order[np.flatnonzero(dup)[0] : np.flatnonzero(dup)[0] + 2])
        raise DataError(
            f"{path}: column 'prediction_time' row {int(rows[1]) + 1} repeats subject "
            f"{int(sid[rows[1]])} at the same prediction time as row {int(rows[0]) + 1}; one "
            "label per subject and prediction time"
        )
    return LabelFile(outcome, path, sid, ptime, value)


@dataclass(frozen=True)
class Samples:
    """Every ``(subject, prediction time)`` of a site's label files, sorted by subject then time.

    ``y[i, j]``: the label of sample ``i`` for ``outcomes[j]`` (0, 1, or -1 when that label file
    has no row for the sample).
    """

    subject_id: np.ndarray
    prediction_time: np.ndarray
    y: np.ndarray
    outcomes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.subject_id.shape[0])


def build_samples(files: Sequence[LabelFile]) -> Samples:
    """Merge label files into :class:`Samples` (the union of their rows)."""
    if not files:
        raise DataError("no label files: a MEDS site needs at least one task")
    sid = np.concatenate([f.subject_id for f in files])
    pt = np.concatenate([f.prediction_time for f in files])
    order = np.lexsort((pt, sid))
    new = np.ones(order.size, dtype=bool)
    new[1:] = (np.diff(sid[order]) != 0) | (np.diff(pt[order]) != 0)
    sample_of_sorted = np.cumsum(new) - 1
    inverse = np.empty(order.size, dtype=np.int64)
    inverse[order] = sample_of_sorted
    first = order[new]
    y = np.full((first.size, len(files)), -1, dtype=np.int64)
    at = 0
    for j, f in enumerate(files):
        y[inverse[at : at + len(f)], j] = f.value
        at += len(f)
    return Samples(sid[first], pt[first], y, tuple(f.outcome for f in files))
