"""Train/test split of a MEDS site's samples, always by subject.

When the dataset ships ``metadata/subject_splits.parquet`` (:class:`meds.SubjectSplitSchema`), its
assignment is used: ``train`` and ``tuning`` subjects form the training split, ``held_out``
subjects the test split. Otherwise subjects are split with fedmeta's seeded stratified split
(:func:`fedmeta.common.data.partition.stratified_split`, stratified on the first outcome of each
subject's first sample, -1 when unlabelled), as the table sites are. Either way every sample of a
subject lands on the same side, so no patient is in both splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmeta.common.data.meds.labels import Samples
from fedmeta.common.data.meds.schema import (
    HELD_OUT_SPLIT,
    SPLITS_PARQUET,
    TRAIN_SPLIT,
    TUNING_SPLIT,
    check_splits_schema,
)
from fedmeta.common.data.partition import stratified_split
from fedmeta.common.errors import DataError

TRAINING_SPLITS = (TRAIN_SPLIT, TUNING_SPLIT)
TEST_SPLITS = (HELD_OUT_SPLIT,)


@dataclass(frozen=True)
class SubjectSplits:
    """``metadata/subject_splits.parquet``: subject ids (sorted) and their split names."""

    path: Path
    subject_id: np.ndarray
    split: np.ndarray

    def lookup(self, subjects: np.ndarray) -> np.ndarray:
        """Split name of each subject; ``""`` for a subject the file does not list."""
        pos = np.clip(np.searchsorted(self.subject_id, subjects), 0, max(self.subject_id.size - 1, 0))
        found = self.subject_id[pos] == subjects if self.subject_id.size else np.zeros(subjects.size, bool)
        out = np.full(subjects.size, "", dtype=object)
        out[found] = self.split[pos[found]]
        return out


def read_subject_splits(root: Path) -> SubjectSplits | None:
    """The dataset's subject splits, or ``None`` when it has no split file. A subject listed
    twice, a null and a split name other than train/tuning/held_out raise :class:`DataError`."""
    path = root / SPLITS_PARQUET
    if not path.is_file():
        return None
    check_splits_schema(path)
    try:
        table = pq.read_table(path, columns=["subject_id", "split"])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read the split file: {e}") from e
    for col in ("subject_id", "split"):
        c = table.column(col)
        if c.null_count:
            i = int(np.flatnonzero(c.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: column {col!r} row {i + 1} is null")
    sid = table.column("subject_id").to_numpy().astype(np.int64)
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    allowed = TRAINING_SPLITS + TEST_SPLITS
    bad = ~np.isin(split, allowed)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: column 'split' row {i + 1} is {split[i]!r}; fedmeta uses {list(allowed)} "
            "(train and tuning train, held_out tests)"
        )
    order = np.argsort(sid, kind="stable")
    dup = np.flatnonzero(np.diff(sid[order]) == 0)
    if dup.size:
        first, again = sorted(order[dup[0] : dup[0] + 2])
        raise DataError(
            f"{path}: column 'subject_id' row {again + 1} lists subject {int(sid[again])} again "
            f"(first at row {first + 1}); a subject belongs to exactly one split"
        )
    return SubjectSplits(path, sid[order], split[order])


def split_samples(
    samples: Samples,
    splits: SubjectSplits | None,
    *,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices ``(train, test)``, each sorted, split by subject (module docstring)."""
    subjects, first = np.unique(samples.subject_id, return_index=True)
    if splits is not None:
        names = splits.lookup(subjects)
        missing = names == ""
        if missing.any():
            raise DataError(
                f"{splits.path}: subject {int(subjects[np.flatnonzero(missing)[0]])} has a label "
                f"but no split ({int(missing.sum())} such subject(s)); list every labelled subject"
            )
        test_subjects = subjects[np.isin(names, TEST_SPLITS)]
    else:
        strata = samples.y[first, 0]
        _, test_idx = stratified_split(strata, test_fraction=test_fraction, seed=seed)
        test_subjects = subjects[test_idx]
    is_test = np.isin(samples.subject_id, test_subjects)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
