"""Writing a MEDS dataset and label files (the synthetic generator's output, small test datasets).

:func:`write_meds_dataset` writes events (a :class:`meds.DataSchema` table, each subject
contiguous) as shards of whole subjects plus the metadata files; :func:`write_labels` writes one
:class:`meds.LabelSchema` file per outcome. Both check the tables against the ``meds`` schemas
first. Same tables, same bytes (``created_at`` is fixed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmeta.common.data.meds.schema import CODES_PARQUET, DATA_DIR, DATASET_JSON, SPLITS_PARQUET
from fedmeta.common.errors import DataError

#: Bumped whenever the same arguments would produce different synthetic data.
GENERATOR_VERSION = 1
_CREATED_AT = "2026-01-01T00:00:00"


def write_meds_dataset(
    root: Path,
    events: pa.Table,
    *,
    shard_subjects: int = 1000,
    dataset_name: str = "fedmeta-synthetic",
    descriptions: Mapping[str, str] | None = None,
    splits: Mapping[int, str] | None = None,
) -> list[Path]:
    """Write ``events`` (sorted so each subject is contiguous) as a MEDS dataset at ``root``:
    shards of ``shard_subjects`` whole subjects, ``dataset.json``, ``codes.parquet`` (every code,
    with its description when known) and, when ``splits`` is given, ``subject_splits.parquet``.
    Returns the shard paths."""
    if shard_subjects < 1:
        raise DataError(f"shard_subjects = {shard_subjects}: must be >= 1")
    meds.DataSchema.validate(events.schema)
    sid = events.column("subject_id").to_numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(sid)) + 1]
    cuts = np.r_[starts[::shard_subjects], sid.size]
    (root / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (root / DATASET_JSON).parent.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(cuts.size - 1):
        path = root / DATA_DIR / f"{i}.parquet"
        pq.write_table(events.slice(int(cuts[i]), int(cuts[i + 1] - cuts[i])), path)
        shards.append(path)
    (root / DATASET_JSON).write_text(
        json.dumps(
            {
                "dataset_name": dataset_name,
                "dataset_version": str(GENERATOR_VERSION),
                "etl_name": "fedmeta synth-meds",
                "etl_version": str(GENERATOR_VERSION),
                "meds_version": meds.__version__,
                "created_at": _CREATED_AT,
            },
            indent=1,
        )
    )
    codes = sorted(set(events.column("code").to_pylist()))
    desc = descriptions or {}
    pq.write_table(
        pa.table(
            {
                "code": pa.array(codes, pa.string()),
                "description": pa.array([desc.get(c) for c in codes], pa.string()),
                "parent_codes": pa.array([None] * len(codes), pa.list_(pa.string())),
            }
        ),
        root / CODES_PARQUET,
    )
    if splits is not None:
        keys = sorted(splits)
        pq.write_table(
            pa.table(
                {
                    "subject_id": pa.array(keys, pa.int64()),
                    "split": pa.array([splits[k] for k in keys], pa.string()),
                }
            ),
            root / SPLITS_PARQUET,
        )
    return shards


def write_labels(folder: Path, labels: Mapping[str, pa.Table]) -> dict[str, Path]:
    """Write each outcome's label table as ``folder/<outcome>.parquet``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for o, table in labels.items():
        meds.LabelSchema.validate(table.schema)
        pq.write_table(table, folder / f"{o}.parquet")
        out[o] = folder / f"{o}.parquet"
    return out
