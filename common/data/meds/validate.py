"""Full validation of a MEDS site before it joins: every file, type and row that fedmeta relies on.

:func:`validate_meds_dataset` reads the whole dataset once (streamed, bounded memory) and raises
:class:`~fedmeta.common.errors.DataError` naming the file, the column and the 1-based row of the
first problem:

- the dataset root, ``data/`` and at least one shard exist; ``metadata/dataset.json`` and
  ``metadata/codes.parquet``, when present, match the MEDS schemas;
- every shard has MEDS column types (:class:`meds.DataSchema`), at least one event, no null
  ``subject_id`` or ``code``, each subject contiguous and its timed events sorted; no subject in
  two shards;
- every label file has MEDS label types and a non-null ``boolean_value`` per row; every labelled
  subject exists in the data, and no prediction time is before the subject's first timed event
  (there would be nothing to predict from; it usually means a time-zone or date-shift mismatch);
- ``metadata/subject_splits.parquet``, when present, gives every labelled subject exactly one of
  ``train`` / ``tuning`` / ``held_out``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common.data.meds.config import MedsSiteConfig
from fedmeta.common.data.meds.labels import LabelFile, read_label_file
from fedmeta.common.data.meds.reader import CodeTable, iter_event_batches
from fedmeta.common.data.meds.schema import (
    CODES_PARQUET,
    check_codes_schema,
    data_shards,
    read_dataset_metadata,
)
from fedmeta.common.data.meds.splits import SubjectSplits, read_subject_splits
from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)

_NO_TIME = np.iinfo(np.int64).max


@dataclass(frozen=True)
class ShardInfo:
    """One event shard: events (static ones among them) and subjects."""

    path: Path
    n_events: int
    n_static: int
    n_subjects: int


@dataclass(frozen=True)
class LabelInfo:
    """One task's label file: rows, distinct subjects, positive labels."""

    outcome: str
    path: Path
    n_rows: int
    n_subjects: int
    n_positive: int


@dataclass(frozen=True)
class MedsDatasetInfo:
    """What :func:`validate_meds_dataset` found (aggregates only)."""

    root: Path
    metadata: dict[str, Any]
    shards: tuple[ShardInfo, ...]
    n_subjects: int
    n_events: int
    n_static_events: int
    n_codes: int
    labels: tuple[LabelInfo, ...]
    splits: Path | None


@dataclass(frozen=True)
class _Scan:
    shards: tuple[ShardInfo, ...]
    subjects: np.ndarray  # sorted
    first_time: np.ndarray  # first timed event per subject, _NO_TIME if none
    n_codes: int


def _scan_shards(root: Path, *, batch_rows: int) -> _Scan:
    codes = CodeTable()
    infos: list[ShardInfo] = []
    subj_parts: list[np.ndarray] = []
    first_parts: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    shards = data_shards(root)
    for k, shard in enumerate(shards):
        n_events = n_static = n_subj = 0
        for b in iter_event_batches(shard, codes, batch_rows=batch_rows, values=False):
            ids, _, lengths = b.subject_runs()
            run = np.repeat(np.arange(ids.size), lengths)
            timed = np.flatnonzero(~b.static)
            runs, first = np.unique(run[timed], return_index=True)
            first_time = np.full(ids.size, _NO_TIME, dtype=np.int64)
            first_time[runs] = b.time[timed[first]]
            subj_parts.append(ids)
            first_parts.append(first_time)
            owner.append(np.full(ids.size, k))
            n_events += len(b)
            n_static += int(b.static.sum())
            n_subj += ids.size
        infos.append(ShardInfo(shard, n_events, n_static, n_subj))
    subjects = np.concatenate(subj_parts)
    first_time = np.concatenate(first_parts)
    shard_of = np.concatenate(owner)
    order = np.argsort(subjects, kind="stable")
    dup = np.flatnonzero(np.diff(subjects[order]) == 0)
    if dup.size:
        a, b2 = order[dup[0]], order[dup[0] + 1]
        raise DataError(
            f"{shards[shard_of[b2]]}: column 'subject_id': subject {int(subjects[a])} is also in "
            f"{shards[shard_of[a]]}; MEDS keeps each subject in exactly one shard"
        )
    return _Scan(tuple(infos), subjects[order], first_time[order], len(codes))


def _check_labels(f: LabelFile, scan: _Scan) -> None:
    pos = np.clip(np.searchsorted(scan.subjects, f.subject_id), 0, scan.subjects.size - 1)
    known = scan.subjects[pos] == f.subject_id
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        raise DataError(
            f"{f.path}: column 'subject_id' row {i + 1}: subject {int(f.subject_id[i])} is not in "
            f"the dataset's data ({int((~known).sum())} unknown subject(s)). Hint: label files and "
            "data must come from the same export"
        )
    first = scan.first_time[pos]
    early = f.prediction_time < first
    if early.any():
        i = int(np.flatnonzero(early)[0])
        pt = np.datetime64(int(f.prediction_time[i]), "us")
        if first[i] == _NO_TIME:
            why = "who has no timed event"
        else:
            why = f"whose first event is at {np.datetime64(int(first[i]), 'us')}"
        raise DataError(
            f"{f.path}: column 'prediction_time' row {i + 1}: {pt} is before any event of "
            f"subject {int(f.subject_id[i])}, {why} ({int(early.sum())} such row(s)); there is "
            "nothing to predict from. Hint: check time zones and date shifting in the ETL"
        )


def _check_splits(splits: SubjectSplits, labels: list[LabelFile]) -> None:
    for f in labels:
        names = splits.lookup(f.subject_id)
        if (names == "").any():
            i = int(np.flatnonzero(names == "")[0])
            raise DataError(
                f"{splits.path}: subject {int(f.subject_id[i])} (label file {f.path}, row "
                f"{i + 1}) has no split; the split file must list every labelled subject"
            )


def validate_meds_dataset(cfg: MedsSiteConfig, *, batch_rows: int = 1_000_000) -> MedsDatasetInfo:
    """Validate the site's MEDS dataset and label files (module docstring); returns a summary."""
    root = cfg.path
    metadata = read_dataset_metadata(root)
    if (root / CODES_PARQUET).is_file():
        check_codes_schema(root / CODES_PARQUET)
    scan = _scan_shards(root, batch_rows=batch_rows)
    labels = []
    infos = []
    for outcome, path in cfg.labels.items():
        f = read_label_file(path, outcome)
        _check_labels(f, scan)
        labels.append(f)
        infos.append(
            LabelInfo(outcome, path, len(f), int(np.unique(f.subject_id).size), int(f.value.sum()))
        )
    splits = read_subject_splits(root)
    if splits is not None:
        _check_splits(splits, labels)
    info = MedsDatasetInfo(
        root=root,
        metadata=metadata,
        shards=scan.shards,
        n_subjects=int(scan.subjects.size),
        n_events=sum(s.n_events for s in scan.shards),
        n_static_events=sum(s.n_static for s in scan.shards),
        n_codes=scan.n_codes,
        labels=tuple(infos),
        splits=splits.path if splits is not None else None,
    )
    log.info(
        "meds site %s: valid: %d shards, %d subjects, %d events, %d codes, %d label files",
        cfg.name, len(info.shards), info.n_subjects, info.n_events, info.n_codes, len(labels),
    )
    return info
